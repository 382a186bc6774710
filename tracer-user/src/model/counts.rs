//! Count mode's periodic line (`live --count-only --json`): what the kernel
//! counted during one period.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::CountsKind;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CountsLine {
    pub kind: CountsKind,
    /// Unix-epoch nanoseconds at the end of the period.
    pub ts_ns: u64,
    pub interval_s: f64,
    /// Drops in this period, and since the start.
    pub drops: u64,
    pub drops_total: u64,
    /// Drops in this period by cause name (only causes that occurred).
    pub drops_by_cause: BTreeMap<String, u64>,
    pub drops_by_netns: Vec<NetnsCounts>,
}

/// One namespace's drops in a period, with its table fill then.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetnsCounts {
    pub netns: u32,
    pub netns_name: Option<String>,
    pub drops: u64,
    pub ct_count: Option<u64>,
    pub ct_max: Option<u64>,
}
