//! Conntrack as the kernel reports it: counters, fill and table occupancy
//! per namespace.
pub mod netns;
pub mod occupancy;
pub mod owner;
pub mod stats;

use std::{
    collections::{HashMap, VecDeque},
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
    history: HashMap<u32, History>,
    /// Namespaces with recent conntrack-drop candidates: sampled often so
    /// each drop has a reading shortly before it.
    active: HashMap<u32, Instant>,
}

/// One reading of a namespace's counters, on the kernel's monotonic clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sample {
    pub mono_ns: u64,
    pub entries: u64,
    pub drop: u64,
    pub insert_failed: u64,
    /// Conntrack drops of packets without an entry already attributed to
    /// the window that ends at this sample.
    used: u64,
}

impl Sample {
    pub fn new(mono_ns: u64, c: &CtCounters) -> Sample {
        Sample {
            mono_ns,
            entries: c.entries(),
            drop: c.get("drop"),
            insert_failed: c.get("insert_failed"),
            used: 0,
        }
    }
}

/// Recent counter readings of one namespace. The `drop` counter is the
/// kernel's own tally of conntrack drops (table full, insert clash); by
/// comparing readings around a drop we know whether the kernel counted it,
/// which a table-fill reading alone cannot tell once the table has changed
/// (a flush right after a drop, say).
#[derive(Debug, Default)]
pub struct History {
    samples: VecDeque<Sample>,
}

/// Readings kept per namespace (at 10 ms while active: several seconds).
const HISTORY_LEN: usize = 512;

/// How far from a drop a counter increase may be to count as its own.
const BORROW_NS: u64 = 50_000_000;

impl History {
    pub fn push(&mut self, s: Sample) {
        if self.samples.back().is_some_and(|b| b.mono_ns >= s.mono_ns) {
            return;
        }
        if self.samples.len() == HISTORY_LEN {
            self.samples.pop_front();
        }
        self.samples.push_back(s);
    }

    pub fn has_after(&self, t: u64) -> bool {
        self.samples.back().is_some_and(|b| b.mono_ns > t)
    }

    /// Conntrack drops without an entry that the window holds, minus those
    /// already attributed.
    fn room(&self, i: usize) -> u64 {
        let (a, b) = (&self.samples[i - 1], &self.samples[i]);
        let budget = b
            .drop
            .saturating_sub(a.drop)
            .saturating_sub(b.insert_failed.saturating_sub(a.insert_failed));
        budget.saturating_sub(b.used)
    }

    /// Did the kernel count a conntrack drop (of a packet without an entry)
    /// for a drop at `t`, not yet claimed by another record? The window
    /// around `t` is asked first; then its neighbours, nearest first, within
    /// [`BORROW_NS`]: the counter rises a moment before the packet is freed
    /// (a reading can fall in between), a per-CPU sum can miss an increment
    /// in flight, and two CPUs' records reach us slightly out of order. None
    /// without a reading before and after `t`.
    pub fn judge(&mut self, t: u64) -> Option<bool> {
        let i = self.samples.partition_point(|s| s.mono_ns <= t);
        if i == 0 || i == self.samples.len() {
            return None;
        }
        let near = |h: &Self, w: usize| {
            let (a, b) = (h.samples[w - 1].mono_ns, h.samples[w].mono_ns);
            a <= t + BORROW_NS && b + BORROW_NS >= t
        };
        for d in 0..self.samples.len() {
            let mut any_near = false;
            for w in [i.checked_sub(d), (d > 0).then_some(i + d)]
                .into_iter()
                .flatten()
            {
                if w < 1 || w >= self.samples.len() || !near(self, w) {
                    continue;
                }
                any_near = true;
                if self.room(w) > 0 {
                    self.samples[w].used += 1;
                    return Some(true);
                }
            }
            if !any_near {
                break;
            }
        }
        Some(false)
    }

    /// Table count just before `t`.
    pub fn entries_before(&self, t: u64) -> Option<u64> {
        let i = self.samples.partition_point(|s| s.mono_ns <= t);
        (i > 0).then(|| self.samples[i - 1].entries)
    }
}

impl FillSampler {
    /// `fresh`: how old a sample may be before a drop triggers a new read.
    pub fn new(registry: NsRegistry, fresh: Duration) -> Self {
        FillSampler {
            registry,
            fresh,
            last: HashMap::new(),
            limits: None,
            history: HashMap::new(),
            active: HashMap::new(),
        }
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
                let c = self
                    .registry
                    .get(netns)
                    .and_then(|h| h.counters())
                    .map(|c| c.entries());
                self.last.insert(netns, (now, c));
                c
            }
        }?;
        // The kernel raises its count before checking the limit and lowers
        // it again when allocation fails; a sample can land in between and
        // read max+1, which means "full", not "over".
        Some(CtFill {
            count: count.min(max),
            max,
            sampled: true,
            counted_drop: None,
        })
    }

    /// Reads `netns`'s counters now into its history.
    pub fn sample(&mut self, netns: u32) -> Option<Sample> {
        // The time is taken before the read: every drop counted before it is
        // in the reading.
        let t = crate::probe::mono_ns();
        let c = self.registry.get(netns)?.counters()?;
        let s = Sample::new(t, &c);
        self.history.entry(netns).or_default().push(s);
        Some(s)
    }

    /// Starts a namespace's history with a reading taken earlier.
    pub fn seed(&mut self, netns: u32, s: Sample) {
        self.history.entry(netns).or_default().push(s);
    }

    /// Samples the namespaces that saw drops in the last two seconds.
    pub fn sample_active(&mut self) {
        self.active
            .retain(|_, t| t.elapsed() < Duration::from_secs(2));
        let nss: Vec<u32> = self.active.keys().copied().collect();
        for ns in nss {
            self.sample(ns);
        }
    }

    /// Samples every namespace with a history (a slow heartbeat, so a first
    /// drop after a quiet spell still has a recent reading before it).
    pub fn sample_all(&mut self) {
        let nss: Vec<u32> = self.history.keys().copied().collect();
        for ns in nss {
            self.sample(ns);
        }
    }

    /// Table fill and drop-counter evidence for a drop at `t` (monotonic
    /// ns) in `netns`, for a packet that had no conntrack entry.
    pub fn judge(&mut self, netns: u32, t: u64) -> Option<CtFill> {
        let max = self.limits()?.max;
        self.active.insert(netns, Instant::now());
        if !self.history.get(&netns).is_some_and(|h| h.has_after(t)) {
            self.sample(netns);
        }
        let h = self.history.get_mut(&netns)?;
        let counted_drop = h.judge(t);
        let count = h.entries_before(t)?;
        Some(CtFill {
            count: count.min(max),
            max,
            sampled: true,
            counted_drop,
        })
    }

    pub fn counters(&mut self, netns: u32) -> Option<CtCounters> {
        self.registry.get(netns)?.counters()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(t: u64, drop: u64, insert_failed: u64) -> Sample {
        Sample {
            mono_ns: t,
            entries: 64,
            drop,
            insert_failed,
            used: 0,
        }
    }

    #[test]
    fn a_drop_is_counted_once_per_counter_increase() {
        let mut h = History::default();
        h.push(s(0, 10, 0));
        h.push(s(100, 12, 0));
        assert_eq!(h.judge(50), Some(true));
        assert_eq!(h.judge(60), Some(true));
        // Two conntrack drops in the window: a third drop there was a rule's.
        assert_eq!(h.judge(70), Some(false));
    }

    #[test]
    fn insert_failures_are_not_table_full_budget() {
        let mut h = History::default();
        h.push(s(0, 10, 0));
        h.push(s(100, 11, 1));
        assert_eq!(h.judge(50), Some(false));
    }

    #[test]
    fn a_reading_between_the_count_and_the_free_borrows_from_the_window_before() {
        let mut h = History::default();
        h.push(s(0, 0, 0));
        h.push(s(100, 1, 0)); // counted at 99, freed at 101
        h.push(s(200, 1, 0));
        assert_eq!(h.judge(101), Some(true));
        assert_eq!(h.judge(150), Some(false));
    }

    #[test]
    fn a_count_that_shows_only_in_the_next_reading_is_still_found() {
        let mut h = History::default();
        h.push(s(0, 0, 0));
        h.push(s(100, 0, 0));
        h.push(s(200, 1, 0)); // the per-CPU sum was read before the increment landed
        assert_eq!(h.judge(50), Some(true));
        assert_eq!(h.judge(60), Some(false));
    }

    #[test]
    fn a_counter_increase_far_from_the_drop_is_not_its_own() {
        let ms = 1_000_000;
        let mut h = History::default();
        h.push(s(0, 0, 0));
        h.push(s(10 * ms, 1, 0)); // a conntrack drop whose record was lost
        h.push(s(200 * ms, 1, 0));
        h.push(s(210 * ms, 1, 0));
        assert_eq!(h.judge(205 * ms), Some(false));
        assert_eq!(h.judge(5 * ms), Some(true));
    }

    #[test]
    fn no_reading_before_the_drop_means_unknown() {
        let mut h = History::default();
        h.push(s(100, 1, 0));
        assert_eq!(h.judge(50), None);
        assert_eq!(h.judge(150), None, "no reading after it either");
        assert_eq!(h.entries_before(50), None);
    }

    #[test]
    fn out_of_order_readings_are_ignored() {
        let mut h = History::default();
        h.push(s(100, 1, 0));
        h.push(s(50, 5, 0));
        assert_eq!(h.samples.len(), 1);
    }
}
