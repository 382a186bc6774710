//! A probe's outcome as ctdrop emits it: a `live --json` line, a capture
//! record (typed from format 3 on), a report's lost probe.

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
