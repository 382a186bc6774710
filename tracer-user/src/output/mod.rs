//! How drops reach the operator: human lines, JSON lines.
pub mod human;
pub mod json;
pub mod symbols;

use crate::{cause::Cause, events::DropEvent};

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
