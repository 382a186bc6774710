//! A capture's report (`ctdrop report --format json`). Keys shared with the
//! live summary (`drops_total`, `drops_by_cause`, `top_flows`,
//! `kernel_counters`, `probes`, ...) have the same names and meaning, so a
//! capture and the live run it recorded compare key by key; the shared
//! pieces ([`TopFlow`], [`CounterAgreement`], [`ProbeTotals`]) are the
//! summary's to use too.

use std::{collections::BTreeMap, net::IpAddr};

use serde::{Deserialize, Serialize};

use super::{
    capture::{CaptureFilter, WatchTrailer},
    occupancy::Occupancy,
    ProbeCounts, ProbeVerdict, ReportKind,
};
use crate::cause::Cause;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReportDoc {
    pub kind: ReportKind,
    pub file: String,
    /// The capture ended with its trailer.
    pub complete: bool,
    /// Why reading stopped early, in one sentence.
    pub stopped: Option<String>,
    pub capture: CaptureInfo,
    pub duration_s: f64,
    pub drops_total: u64,
    pub drops_per_s: f64,
    /// Every cause by name, zeros included.
    pub drops_by_cause: BTreeMap<String, u64>,
    /// Namespace inode (or `unknown`) to drops.
    pub drops_by_netns: BTreeMap<String, u64>,
    pub drops_by_interface: Vec<InterfaceDrops>,
    pub drops_per_second: Vec<u64>,
    /// The HTML plot's data (drops per second by cause, fill, lost probes).
    pub timeline: serde_json::Value,
    pub top_flows: Vec<TopFlow>,
    pub flows_tracked: usize,
    pub flows_untracked: u64,
    pub events_lost: Option<u64>,
    pub events_sent: Option<u64>,
    pub decode_errors: Option<u64>,
    pub kernel_counters: Option<Vec<CounterAgreement>>,
    pub kernel_counters_agree: Option<bool>,
    pub filtered: bool,
    /// Per probed host; null without probes.
    pub probes: Option<BTreeMap<String, ProbeTotals>>,
    /// Advice items (their shape is the advice renderer's).
    pub advice: serde_json::Value,
    /// Table snapshots, the fullest per namespace.
    pub occupancy: Vec<Occupancy>,
    pub watch: Option<WatchTrailer>,
}

/// What, where and how the capture was taken.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CaptureInfo {
    pub format_version: u32,
    pub ctdrop_version: String,
    pub host: String,
    pub kernel_release: String,
    pub started_ts_ns: u64,
    pub ended_ts_ns: u64,
    pub mechanisms: BTreeMap<String, String>,
    pub filter: CaptureFilter,
    pub headers: bool,
    pub conntrack_max: Option<u64>,
    pub conntrack_buckets: Option<u64>,
    pub command: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfaceDrops {
    pub netns: Option<u32>,
    pub netns_name: Option<String>,
    pub ifindex: u32,
    pub ifname: Option<String>,
    pub drops: u64,
}

/// One of the flows that lost the most packets.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopFlow {
    pub netns: Option<u32>,
    pub proto: String,
    pub src: Option<IpAddr>,
    pub dst: Option<IpAddr>,
    pub sport: u16,
    pub dport: u16,
    /// With `sampled_drops`: an estimate, the sampled drops times the
    /// summary's `flow_sampling.one_in`.
    pub drops: u64,
    pub cause: Cause,
    /// Unix-epoch nanoseconds of its first and last drop (of its first and
    /// last sampled drop when sampled).
    pub first_ts_ns: u64,
    pub last_ts_ns: u64,
    /// Count mode with sampling: the drops of this flow the kernel sampled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampled_drops: Option<u64>,
}

/// One namespace's conntrack counters against ctdrop's records.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CounterAgreement {
    pub netns: u32,
    pub netns_name: Option<String>,
    /// Counter increases over the run.
    pub drop: u64,
    pub insert_failed: u64,
    pub early_drop: u64,
    /// Table entries at the end.
    pub entries: u64,
    pub table_full_records: u64,
    pub insert_failed_records: u64,
    /// `drop` equals the table-full plus insert-failed records.
    pub agree: bool,
    pub unrecorded: u64,
}

/// One probed host's verdicts over a run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProbeTotals {
    #[serde(flatten)]
    pub counts: ProbeCounts,
    pub loss_pct: f64,
    pub lost_probes: Vec<ProbeVerdict>,
}
