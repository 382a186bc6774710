//! A capture file's header and trailer blocks: JSON, written once each,
//! so they can grow fields without a format version change (readers ignore
//! what they do not know; every field added later must be optional). The
//! format itself is `crate::capture`'s; these are the objects in it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What, where and how a capture was taken: enough to read it on another
/// machine (drop-reason names of *that* kernel, clock offset, limits).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Header {
    pub format_version: u32,
    pub ctdrop_version: String,
    pub host: String,
    pub kernel_release: String,
    pub started_wall_ns: u64,
    /// CLOCK_MONOTONIC at start: drop timestamps are on this clock.
    pub started_mono_ns: u64,
    /// Add to a monotonic timestamp to get Unix-epoch nanoseconds.
    pub boot_offset_ns: u64,
    /// Mechanism per signal, e.g. "drops": "tp_btf/kfree_skb".
    pub mechanisms: BTreeMap<String, String>,
    /// This kernel's `enum skb_drop_reason`, value to short name.
    pub drop_reasons: BTreeMap<u32, String>,
    pub conntrack_max: Option<u64>,
    pub conntrack_buckets: Option<u64>,
    pub counters_at_start: Vec<NsCounters>,
    pub filter: CaptureFilter,
    /// Packet headers were captured (pcap-ng export possible).
    pub headers: bool,
    /// Seconds asked for with --duration.
    pub duration_s: Option<f64>,
    /// Probe targets as given (--ping/--probe).
    pub probes: Vec<String>,
    pub command: Vec<String>,
    /// --max-flows of the run, so a report tracks the same flows.
    #[serde(default)]
    pub max_flows: Option<usize>,
}

/// `/proc/net/stat/nf_conntrack` of one namespace, summed over CPUs.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct NsCounters {
    pub netns: u32,
    pub netns_name: Option<String>,
    pub counters: BTreeMap<String, u64>,
}

/// The trace filters in force; a filtered capture cannot match the kernel
/// counters, and a report says so.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct CaptureFilter {
    /// The first of `netns_all` (what files before repeatable filters held).
    pub netns: Option<u32>,
    pub proto: Option<u8>,
    /// The first of `hosts`.
    pub host: Option<String>,
    /// The first of `ports`.
    pub port: Option<u16>,
    pub all_reasons: bool,
    /// Every --netns, --host (address or prefix), --port and --ifname
    /// (as namespace inode and interface index).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub netns_all: Vec<u32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<(u32, u32)>,
}

/// How a capture ended.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Trailer {
    pub ended_wall_ns: u64,
    pub ended_mono_ns: u64,
    pub duration_s: f64,
    pub events_sent: u64,
    /// Records the kernel could not put in the ring buffer (full).
    pub events_lost: u64,
    pub decode_errors: u64,
    pub drops_written: u64,
    pub probes_written: u64,
    /// Counter increase per namespace where the kernel counted conntrack
    /// drops or ctdrop recorded some: what the report checks records against.
    pub kernel_counters: Vec<CounterDelta>,
    /// Every namespace's counters at the end (exact where a delta is
    /// given, else as read at the last once-a-second tick).
    pub counters_at_end: Vec<NsCounters>,
    /// Written by `ctdrop watch`: what triggered this capture and what its
    /// in-memory buffer could not keep.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watch: Option<Box<WatchTrailer>>,
}

/// Why `ctdrop watch` wrote a capture, and over which window.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct WatchTrailer {
    /// first_drop, drop_rate, fill, signal or shutdown.
    pub trigger: String,
    pub netns: Option<u32>,
    pub netns_name: Option<String>,
    /// The namespace's table count and `nf_conntrack_max` at the trigger.
    pub entries: Option<u64>,
    pub max: Option<u64>,
    pub triggered_wall_ns: u64,
    pub pre_s: f64,
    pub post_s: f64,
    /// The recorder's in-memory cap (records), and the drops inside this
    /// window it could not keep because the cap was reached.
    pub buffer_cap: usize,
    pub drops_not_kept: u64,
    /// The run ended (SIGTERM) before the post-trigger window did.
    pub cut_by_shutdown: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CounterDelta {
    pub netns: u32,
    pub netns_name: Option<String>,
    pub delta: BTreeMap<String, u64>,
}
