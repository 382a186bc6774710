//! How drops, probe verdicts and summaries reach the operator. Each output
//! is a [`Sink`]; the session hands every event to each sink it was given.
pub mod csv;
pub mod fold;
pub mod http;
pub mod human;
pub mod json;
pub mod metrics;
pub mod pcapng;
pub mod symbols;
pub mod writer;

use std::{collections::BTreeMap, time::Duration};

use tracer_common::FilterConfig;

use crate::{
    cause::Cause,
    conntrack::{
        netns::NsRegistry,
        stats::{CtCounters, CtLimits},
    },
    events::DropEvent,
    flows::Tally,
    kernel::{attach::KernelStats, btf::DropReasons, tier::Mechanism},
    probe::Outcome,
    summary::Summary,
};

/// Facts about the run that a sink may record before any event.
pub struct SessionInfo<'a> {
    pub reasons: &'a DropReasons,
    /// Mechanism per signal (or why none).
    pub mechanisms: Vec<Mechanism>,
    pub boot_offset_ns: u64,
    pub limits: Option<CtLimits>,
    pub counters_at_start: &'a BTreeMap<u32, CtCounters>,
    pub filter: &'a FilterConfig,
    /// Names namespaces, as every output does.
    pub namespaces: &'a NsRegistry,
}

/// Local wall-clock time of day with microseconds.
// The libc crate marks musl's `time_t` deprecated ahead of musl's 64-bit
// time_t change; it is 64 bits on both targets we ship (x86_64, aarch64).
#[allow(deprecated)]
pub fn clock(wall_ns: u64) -> String {
    let secs = (wall_ns / 1_000_000_000) as libc::time_t;
    // SAFETY: an all-zero tm is a valid value; localtime_r only writes it.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are to live locals of the right types.
    unsafe { libc::localtime_r(&secs, &mut tm) };
    format!(
        "{:02}:{:02}:{:02}.{:06}",
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec,
        (wall_ns % 1_000_000_000) / 1000
    )
}

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

/// The run so far, handed to every sink once a second.
pub struct Progress<'a> {
    pub elapsed: Duration,
    /// --duration, when given.
    pub duration: Option<Duration>,
    /// CLOCK_MONOTONIC now (the drops' clock).
    pub mono_ns: u64,
    pub stats: KernelStats,
    pub tally: &'a Tally,
    /// Conntrack counters per namespace (name, counters); read only when a
    /// sink asked for them with [`Sink::wants_counters`], else empty.
    pub counters: &'a BTreeMap<u32, (Option<String>, CtCounters)>,
}

pub trait Sink {
    /// Called once after attaching, before any event.
    fn start(&mut self, _info: &SessionInfo) -> std::io::Result<()> {
        Ok(())
    }
    fn drop_event(&mut self, s: &Shown) -> std::io::Result<()>;
    fn probe(&mut self, p: &ProbeShown) -> std::io::Result<()>;
    /// Count mode's periodic line; outputs that only store records skip it.
    fn counts(&mut self, _c: &CountsShown) -> std::io::Result<()> {
        Ok(())
    }
    /// A conntrack table snapshot taken because the table was full.
    fn occupancy(&mut self, _o: &crate::conntrack::occupancy::Occupancy) -> std::io::Result<()> {
        Ok(())
    }
    fn summary(&mut self, s: &Summary) -> std::io::Result<()>;
    fn flush(&mut self) -> std::io::Result<()>;
    /// Once a second. An error stops the session (the sink cannot go on,
    /// e.g. its disk is full); the sink reports it again from `summary`.
    fn tick(&mut self, _p: &Progress) -> std::io::Result<()> {
        Ok(())
    }
    /// SIGUSR1 arrived (services only, see `SessionOptions::service`).
    fn user_signal(&mut self) {}
    /// Whether [`Progress::counters`] should be read for this sink.
    fn wants_counters(&self) -> bool {
        false
    }
    /// Every 50 ms: for a sink that reads input or redraws between events
    /// (the `top` screen). An error stops the session, as from `tick`.
    fn poll(&mut self) -> std::io::Result<()> {
        Ok(())
    }
    /// The sink asks the session to stop, as Ctrl-C would (`top`'s `q`).
    fn wants_stop(&self) -> bool {
        false
    }
}
