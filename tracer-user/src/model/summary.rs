//! The end-of-run summary object of the JSON outputs (one line,
//! `kind: summary`). Keys it shares with a capture's report have the same
//! types ([`TopFlow`], [`CounterAgreement`], [`ProbeCounts`]), so the two
//! compare key by key. Built from a run by `crate::summary::Summary`.

use std::collections::BTreeMap;

use super::{
    occupancy::Occupancy,
    report::{CounterAgreement, TopFlow},
    ProbeCounts, SummaryKind,
};

/// Every field an output writes is here, typed.
#[derive(serde::Serialize)]
pub struct SummaryLine<'a> {
    pub kind: SummaryKind,
    pub duration_s: f64,
    pub drops_total: u64,
    /// Every cause, also those with none.
    pub drops_by_cause: BTreeMap<&'static str, u64>,
    /// Namespace inode (or `unknown`) to drops.
    pub drops_by_netns: BTreeMap<String, u64>,
    pub inferred_by_budget: u64,
    /// Namespace inode to its name, where it has one.
    pub netns_names: BTreeMap<String, Option<String>>,
    pub events_lost: u64,
    pub events_sent: u64,
    /// `kfree_skb` runs the kernel skipped (the program was already
    /// running on that CPU): drops no count saw.
    pub kfree_skb_skipped: u64,
    pub decode_errors: u64,
    pub flows_tracked: usize,
    pub flows_untracked: u64,
    pub top_flows: Vec<TopFlow>,
    /// Count mode only: how the per-flow detail was sampled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flow_sampling: Option<FlowSamplingLine>,
    pub kernel_counters: Vec<CounterAgreement>,
    pub filtered: bool,
    /// Per probe label; null when no probe was sent.
    pub probes: Option<BTreeMap<&'a str, &'a ProbeCounts>>,
    pub tier: &'static str,
    pub mechanisms: Vec<MechanismLine<'a>>,
    pub conntrack_events: Vec<CtEvents>,
    pub echo_losses: Vec<EchoLoss>,
    pub echo_losses_not_kept: u64,
    pub occupancy: Vec<&'a Occupancy>,
    /// Advice items (their shape is the advice renderer's, as in a report).
    pub advice: serde_json::Value,
}

/// Count mode's per-flow sampling: flows (`top_flows`, `flows_tracked`,
/// `flows_untracked`) come from `sampled_drops` drops, 1 in `one_in` on
/// average; when `estimated`, their drops and bytes are sampled counts
/// times `one_in`. `drops_total` and the by-cause and by-namespace totals
/// count every drop.
#[derive(serde::Serialize)]
pub struct FlowSamplingLine {
    pub one_in: u32,
    pub sampled_drops: u64,
    pub estimated: bool,
}

/// How one signal was traced (the attach mechanism chosen, or why none).
#[derive(serde::Serialize)]
pub struct MechanismLine<'a> {
    pub signal: &'static str,
    pub mechanism: Option<&'a str>,
    pub note: &'a str,
}

/// Conntrack path events in one namespace (probe tier).
#[derive(serde::Serialize)]
pub struct CtEvents {
    pub netns: u32,
    #[serde(flatten)]
    pub counts: tracer_common::CtEventCounts,
}

/// Lost echo requests of one ping ctdrop did not send.
#[derive(serde::Serialize)]
pub struct EchoLoss {
    pub src: String,
    pub dst: String,
    pub icmp_id: u16,
    pub lost_seqs: Vec<u16>,
    pub causes: BTreeMap<&'static str, u64>,
}
