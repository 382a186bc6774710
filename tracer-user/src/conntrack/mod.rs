//! Conntrack as the kernel reports it: counters and fill per namespace.
pub mod netns;
pub mod stats;

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use crate::events::CtFill;
use netns::NsRegistry;
use stats::{CtCounters, CtLimits};

/// Table fill per namespace, read from userspace near each drop: this
/// kernel hides the per-namespace count from BPF (it sits behind
/// `net_generic`), so the kernel programs cannot read it.
pub struct FillSampler {
    pub registry: NsRegistry,
    fresh: Duration,
    last: HashMap<u32, (Instant, Option<u64>)>,
    limits: Option<(Instant, Option<CtLimits>)>,
}

impl FillSampler {
    /// `fresh`: how old a sample may be before a drop triggers a new read.
    pub fn new(registry: NsRegistry, fresh: Duration) -> Self {
        FillSampler { registry, fresh, last: HashMap::new(), limits: None }
    }

    pub fn limits(&mut self) -> Option<CtLimits> {
        self.limits_at(Instant::now())
    }

    fn limits_at(&mut self, now: Instant) -> Option<CtLimits> {
        match self.limits {
            Some((t, l)) if now.saturating_duration_since(t) < Duration::from_secs(1) => l,
            _ => {
                let l = CtLimits::read();
                self.limits = Some((now, l));
                l
            }
        }
    }

    pub fn fill(&mut self, netns: u32) -> Option<CtFill> {
        // One clock read per drop: this runs for every record of a flood.
        let now = Instant::now();
        let max = self.limits_at(now)?.max;
        let count = match self.last.get(&netns) {
            Some((t, c)) if now.saturating_duration_since(*t) < self.fresh => *c,
            _ => {
                let c = self.registry.get(netns).and_then(|h| h.counters()).map(|c| c.entries());
                self.last.insert(netns, (now, c));
                c
            }
        }?;
        // The kernel raises its count before checking the limit and lowers
        // it again when allocation fails; a sample can land in between and
        // read max+1, which means "full", not "over".
        Some(CtFill { count: count.min(max), max, sampled: true })
    }

    pub fn counters(&mut self, netns: u32) -> Option<CtCounters> {
        self.registry.get(netns)?.counters()
    }
}
