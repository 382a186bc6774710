//! A probe's outcome as ctdrop emits it: a `live --json` line, a capture
//! record (typed from format 3 on), a report's lost probe.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{DropLine, ProbeLineKind};
use crate::cause::Cause;

/// One probe verdict. A lost probe carries the drop that explains it,
/// when one was seen.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProbeVerdict {
    pub kind: ProbeLineKind,
    /// Unix-epoch nanoseconds of the send.
    pub ts_ns: u64,
    /// The target as given (`--ping`/`--probe`).
    pub host: String,
    pub probe: ProbeKind,
    /// 1-based probe number for this target.
    pub seq: u64,
    pub icmp_id: Option<u16>,
    pub icmp_seq: Option<u16>,
    /// The local port of a TCP/UDP probe.
    pub local_port: Option<u16>,
    pub status: ProbeStatus,
    pub rtt_ms: Option<f64>,
    /// The explaining drop's cause (lost probes with a drop only).
    pub cause: Option<Cause>,
    /// Why it was lost, in one phrase (lost probes only).
    pub verdict: Option<String>,
    pub drop: Option<DropLine<'static>>,
}

/// One probed host's counts over a run: kept live by the matcher, rebuilt
/// from the verdicts by a report.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeCounts {
    pub sent: u64,
    pub answered: u64,
    /// Declared lost at their timeout.
    pub lost: u64,
    /// Answered after their timeout (already counted lost).
    pub late: u64,
    /// Lost probes explained by a drop, per cause name.
    pub lost_by_cause: BTreeMap<String, u64>,
    pub lost_unexplained: u64,
}

impl ProbeCounts {
    /// A probe declared lost, explained by a drop of `cause` or by none.
    pub fn count_lost(&mut self, cause: Option<Cause>) {
        self.lost += 1;
        match cause {
            Some(c) => {
                *self
                    .lost_by_cause
                    .entry(c.as_str().to_string())
                    .or_default() += 1
            }
            None => self.lost_unexplained += 1,
        }
    }

    pub fn loss_pct(&self) -> f64 {
        if self.sent == 0 {
            0.0
        } else {
            100.0 * self.lost as f64 / self.sent as f64
        }
    }

    /// `12.5% (1/8)`: the loss as the text and HTML comparisons show it.
    pub fn loss_text(&self) -> String {
        format!("{:.1}% ({}/{})", self.loss_pct(), self.lost, self.sent)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProbeKind {
    Icmp,
    Tcp,
    Udp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProbeStatus {
    Ok,
    Lost,
    /// Answered after its timeout: it already counted as lost.
    Late,
}
