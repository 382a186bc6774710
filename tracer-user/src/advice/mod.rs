//! What to change, with numbers, from what a run saw: a bigger table and
//! hash for `conntrack_table_full`, NOTRACK rules for the stateless flows
//! that fill it, what insert clashes mean, and a warning when filter rules
//! drop the ICMP errors path-MTU discovery needs. Advice is only ever
//! printed: ctdrop never changes a host's rules or sysctls by itself.
//!
//! - this module: what advice is made of (the evidence of a namespace, host
//!   facts, an advice item and its steps);
//! - [`rules`]: what to advise from the evidence;
//! - [`render`]: advice as text, Markdown and JSON.

mod render;
mod rules;
#[cfg(test)]
mod tests;

use std::net::IpAddr;

use serde::Serialize;

use crate::conntrack::{occupancy::Occupancy, stats::CtLimits};

pub use render::{to_json, write_human, write_markdown};
pub use rules::{for_icmp_blocked, for_namespace, from_run, hashsize_for_max, max_for_peak};

/// Headroom over the observed peak: a quarter more, then the next power of
/// two (the sizes operators and the kernel's own defaults use).
pub(super) const HEADROOM: f64 = 1.25;
/// A port group must hold this share of the table to be worth untracking.
pub(super) const NOTRACK_MIN_SHARE: f64 = 0.10;
pub(super) const NOTRACK_MAX_RULES: usize = 3;
/// A namespace whose table never held this share of `nf_conntrack_max`
/// (and turned nothing away) gets no capacity and no NOTRACK advice:
/// there is no pressure to relieve.
pub const NEAR_FULL: f64 = 0.80;
/// One source (or one port) holding this share of the entries, or sending
/// this share of the turned-away packets, is a flood to limit at its
/// origin before any limit is raised.
pub const ONE_SOURCE_SHARE: f64 = 0.50;
/// Fewer entries or drops than this say nothing about concentration.
pub(super) const CONCENTRATION_MIN: u64 = 8;
/// New flows per second one source may open before the advised hashlimit
/// rule drops the rest (a start; tune to the source's legitimate rate).
pub(super) const SOURCE_RATE: u32 = 50;
/// Name of the nft table the advised NOTRACK rules live in.
pub const NFT_TABLE: &str = "ctdrop_notrack";

/// What a run saw in one namespace.
#[derive(Clone, Debug, Default)]
pub struct NsEvidence<'a> {
    pub netns: Option<u32>,
    pub netns_name: Option<String>,
    pub table_full_drops: u64,
    /// Distinct flows that found no room: each wanted one more entry.
    pub table_full_flows: u64,
    pub insert_failed: u64,
    /// Highest entry count seen (a full table counts as `max`).
    pub peak_entries: u64,
    pub occupancy: Option<&'a Occupancy>,
    pub limits: Option<CtLimits>,
    /// Sources of the table-full drops, most first (from the drop records).
    pub drop_sources: Vec<(IpAddr, u64)>,
}

/// ICMP errors for path-MTU discovery that a filter rule dropped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IcmpBlocked {
    pub netns: Option<u32>,
    pub netns_name: Option<String>,
    pub src: Option<IpAddr>,
    pub dst: Option<IpAddr>,
    pub drops: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Step {
    /// A command to run (inside the namespace, for per-namespace ones).
    Run { argv: Vec<String>, in_netns: bool },
    /// A line to put in a file, to survive a reboot.
    Persist { file: String, line: String },
    /// An nft script (`nft -f FILE`).
    Nft { script: String },
}

impl Step {
    pub(super) fn run(argv: &[&str], in_netns: bool) -> Step {
        Step::Run {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            in_netns,
        }
    }

    /// The command as an operator pastes it into a shell.
    pub fn command_line(&self) -> Option<String> {
        match self {
            Step::Run { argv, .. } => Some(
                argv.iter()
                    .map(|a| shell_quote(a))
                    .collect::<Vec<_>>()
                    .join(" "),
            ),
            _ => None,
        }
    }
}

fn shell_quote(a: &str) -> String {
    let plain = !a.is_empty()
        && a.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_./=:,+-@%".contains(&b));
    if plain {
        a.to_string()
    } else {
        format!("'{}'", a.replace('\'', "'\\''"))
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Advice {
    /// The cause this answers (`Cause::as_str`), or `conntrack_table_full`
    /// for both the capacity and the NOTRACK items.
    pub cause: &'static str,
    /// capacity | notrack | nat | insert_clash | icmp_error_blocked
    pub topic: &'static str,
    pub netns: Option<u32>,
    pub netns_name: Option<String>,
    pub headline: String,
    pub notes: Vec<String>,
    pub steps: Vec<Step>,
    /// The numbers behind the advice, for tools.
    pub values: serde_json::Value,
}

/// How nf_conntrack sits in this kernel: that decides where hashsize goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModuleKind {
    Loadable,
    BuiltIn,
    Unknown,
}

impl ModuleKind {
    /// A loadable module has `initstate` in sysfs; built-in ones do not.
    pub fn detect() -> ModuleKind {
        let m = std::path::Path::new("/sys/module/nf_conntrack");
        if m.join("initstate").exists() {
            ModuleKind::Loadable
        } else if m.exists() {
            ModuleKind::BuiltIn
        } else {
            ModuleKind::Unknown
        }
    }
}

/// Host facts advice depends on, read once.
#[derive(Clone, Copy, Debug)]
pub struct Host {
    pub module: ModuleKind,
    /// Bytes per entry in the kernel's slab cache, when readable.
    pub entry_bytes: Option<u64>,
}

impl Host {
    pub fn detect() -> Host {
        Host {
            module: ModuleKind::detect(),
            entry_bytes: slab_entry_bytes(),
        }
    }
}

fn slab_entry_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/slabinfo").ok()?;
    let l = s
        .lines()
        .find(|l| l.split_whitespace().next() == Some("nf_conntrack"))?;
    l.split_whitespace().nth(3)?.parse().ok()
}

/// How advice names a namespace.
pub(super) fn label(netns: Option<u32>, name: &Option<String>) -> String {
    crate::conntrack::netns::label(netns, name.as_deref())
}
