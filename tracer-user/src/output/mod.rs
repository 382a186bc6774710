//! How drops, probe verdicts and summaries reach the operator. Each output
//! is a [`Sink`]; the session hands every event to each sink it was given.
pub mod human;
pub mod json;
pub mod symbols;

use crate::{cause::Cause, events::DropEvent, probe::Outcome, summary::Summary};

/// A decoded drop with everything resolved that an output shows.
pub struct Shown<'a> {
    pub ev: &'a DropEvent,
    pub cause: Cause,
    /// Unix-epoch nanoseconds of the drop.
    pub wall_ns: u64,
    pub reason: &'a str,
    pub netns_name: Option<&'a str>,
    pub ifname: Option<&'a str>,
    pub location: &'a str,
}

/// A probe verdict with the counts the operator's ping loop would show.
pub struct ProbeShown<'a> {
    pub label: &'a str,
    pub outcome: &'a Outcome,
    /// Unix-epoch nanoseconds of the send.
    pub wall_ns: u64,
    pub lost: u64,
    pub sent: u64,
}

/// Count mode: what the kernel counted during one period.
pub struct CountsShown<'a> {
    /// Unix-epoch nanoseconds at the end of the period.
    pub wall_ns: u64,
    pub interval_s: f64,
    /// Drops in this period, and since the start.
    pub drops: u64,
    pub drops_total: u64,
    /// Drops in this period by cause (only causes that occurred).
    pub by_cause: &'a [(Cause, u64)],
    /// Drops in this period by namespace: (inode, name, drops, table fill then).
    pub by_netns: &'a [(u32, Option<String>, u64, Option<crate::events::CtFill>)],
}

pub trait Sink {
    /// Called once after attaching, before any event.
    fn start(&mut self, _info: &crate::session::SessionInfo) -> std::io::Result<()> {
        Ok(())
    }
    fn drop_event(&mut self, s: &Shown) -> std::io::Result<()>;
    fn probe(&mut self, p: &ProbeShown) -> std::io::Result<()>;
    /// Count mode's periodic line; outputs that only store records skip it.
    fn counts(&mut self, _c: &CountsShown) -> std::io::Result<()> {
        Ok(())
    }
    fn summary(&mut self, s: &Summary) -> std::io::Result<()>;
    fn flush(&mut self) -> std::io::Result<()>;
}
