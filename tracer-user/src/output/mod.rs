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

pub trait Sink {
    /// Called once after attaching, before any event.
    fn start(&mut self, _info: &crate::session::SessionInfo) -> std::io::Result<()> {
        Ok(())
    }
    fn drop_event(&mut self, s: &Shown) -> std::io::Result<()>;
    fn probe(&mut self, p: &ProbeShown) -> std::io::Result<()>;
    fn summary(&mut self, s: &Summary) -> std::io::Result<()>;
    fn flush(&mut self) -> std::io::Result<()>;
}
