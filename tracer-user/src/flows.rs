//! The bounded per-flow table and the run's tallies.
//!
//! Totals (by cause, by namespace) are always exact. Per-flow detail is kept
//! for at most `max_flows` flows; flows beyond that are counted as
//! `flows_untracked`, never dropped silently.

use std::{collections::BTreeMap, hash::BuildHasher, net::IpAddr};

use crate::{cause::Cause, events::DropEvent};

/// Default cap: 100k flows is ~11 MB and covers any top-N an operator reads.
pub const DEFAULT_MAX_FLOWS: usize = 100_000;

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowId {
    pub netns: Option<u32>,
    pub proto: u8,
    pub src: Option<IpAddr>,
    pub dst: Option<IpAddr>,
    /// Ports for TCP/UDP; (id, 0) for ICMP echo; zeros otherwise.
    pub sport: u16,
    pub dport: u16,
}

impl FlowId {
    pub fn of(ev: &DropEvent) -> FlowId {
        let (proto, src, dst, ports) = match &ev.flow {
            Some(f) => (f.proto, Some(f.src), Some(f.dst), f.ports),
            None => (0, None, None, None),
        };
        let (sport, dport) = match (ports, ev.icmp.and_then(|i| i.echo)) {
            (Some(p), _) => p,
            (None, Some((id, _))) => (id, 0),
            _ => (0, 0),
        };
        FlowId {
            netns: ev.netns,
            proto,
            src,
            dst,
            sport,
            dport,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FlowStat {
    pub drops: u64,
    pub bytes: u64,
    pub first_ns: u64,
    pub last_ns: u64,
    pub by_cause: [u64; Cause::ALL.len()],
}

impl FlowStat {
    /// The cause with the most drops in this flow.
    pub fn main_cause(&self) -> Cause {
        let (i, _) = self
            .by_cause
            .iter()
            .enumerate()
            .max_by_key(|(_, n)| **n)
            .unwrap();
        Cause::ALL[i]
    }
}

/// A flow's counters as stored: per-cause counts in 32 bits (saturating;
/// they only pick a flow's main cause), the exact `drops` in 64.
#[derive(Clone, Debug, Default)]
struct StoredStat {
    drops: u64,
    bytes: u64,
    first_ns: u64,
    last_ns: u64,
    by_cause: [u32; Cause::ALL.len()],
}

impl StoredStat {
    fn add(&mut self, s: &FlowStat) {
        self.drops += s.drops;
        self.bytes += s.bytes;
        self.first_ns = self.first_ns.min(s.first_ns);
        self.last_ns = self.last_ns.max(s.last_ns);
        for (a, b) in self.by_cause.iter_mut().zip(s.by_cause) {
            *a = a.saturating_add(u32::try_from(b).unwrap_or(u32::MAX));
        }
    }

    fn to_stat(&self) -> FlowStat {
        FlowStat {
            drops: self.drops,
            bytes: self.bytes,
            first_ns: self.first_ns,
            last_ns: self.last_ns,
            by_cause: self.by_cause.map(u64::from),
        }
    }
}

/// Flows kept in detail, built for a million of them (`--max-flows`
/// unlimited under a flood of new flows):
/// - entries live in fixed-size chunks that never move: no doubling, so no
///   moment with the old and the new copy both alive (a `HashMap` of 1M
///   flows peaked at 427 MB, 2^21 buckets of 129 bytes plus the old table);
/// - the hash index holds (entry number, 32 bits of the hash): 8 bytes a
///   bucket, and growing it re-hashes nothing (no stall of the reader while
///   the ring fills: that stall lost 43,547 events at 1M flows).
///
/// About 105 bytes a flow plus 9-18 bytes of index.
struct FlowTable {
    hasher: foldhash::fast::RandomState,
    index: hashbrown::HashTable<(u32, u32)>,
    chunks: Vec<Vec<(FlowId, StoredStat)>>,
    len: usize,
}

const CHUNK: usize = 1 << 14;

impl FlowTable {
    fn new() -> FlowTable {
        FlowTable {
            hasher: Default::default(),
            index: hashbrown::HashTable::new(),
            chunks: Vec::new(),
            len: 0,
        }
    }

    /// 32 bits of the hash, widened so hashbrown's control byte (the top
    /// 7 bits) and bucket (the low bits) both get hash bits.
    fn widen(h: u32) -> u64 {
        ((h as u64) << 32) | h as u64
    }

    fn hash(&self, id: &FlowId) -> u32 {
        let h = self.hasher.hash_one(id);
        (h ^ (h >> 32)) as u32
    }

    fn find(&mut self, id: &FlowId) -> (u32, Option<&mut StoredStat>) {
        let h = self.hash(id);
        let chunks = &mut self.chunks;
        let found = self
            .index
            .find(Self::widen(h), |(i, eh)| {
                *eh == h && chunks[*i as usize / CHUNK][*i as usize % CHUNK].0 == *id
            })
            .map(|(i, _)| *i);
        (
            h,
            found.map(|i| &mut self.chunks[i as usize / CHUNK][i as usize % CHUNK].1),
        )
    }

    fn insert(&mut self, h: u32, id: FlowId, stat: StoredStat) {
        let i = self.len as u32;
        if self.len.is_multiple_of(CHUNK) {
            self.chunks.push(Vec::with_capacity(CHUNK));
        }
        self.chunks
            .last_mut()
            .expect("a chunk was just ensured")
            .push((id, stat));
        self.len += 1;
        self.index
            .insert_unique(Self::widen(h), (i, h), |(_, eh)| Self::widen(*eh));
    }

    fn iter(&self) -> impl Iterator<Item = &(FlowId, StoredStat)> {
        self.chunks.iter().flatten()
    }
}

impl std::fmt::Debug for FlowTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FlowTable({} flows)", self.len)
    }
}

#[derive(Clone, Debug, Default)]
pub struct NetnsTally {
    pub total: u64,
    pub by_cause: [u64; Cause::ALL.len()],
}

pub fn cause_index(c: Cause) -> usize {
    Cause::ALL.iter().position(|x| *x == c).unwrap()
}

#[derive(Debug)]
pub struct Tally {
    pub total: u64,
    pub by_cause: [u64; Cause::ALL.len()],
    pub by_netns: BTreeMap<Option<u32>, NetnsTally>,
    pub by_reason: BTreeMap<u32, u64>,
    pub by_ifindex: BTreeMap<(Option<u32>, u32), u64>,
    /// foldhash: several times cheaper than SipHash on this per-drop path,
    /// and still seeded per process, so crafted flows cannot force collisions.
    flows: FlowTable,
    max_flows: usize,
    pub flows_untracked: u64,
    /// Count mode: how the kernel sampled the drops behind the flows.
    pub flow_sampling: Option<FlowSampling>,
}

/// Count mode's per-flow detail comes from a sample of the drops (every
/// drop at `one_in` 1); the flows' drops and bytes are then the sampled
/// counts times `one_in`: estimates, whereas every total stays exact.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowSampling {
    pub one_in: u32,
    /// Drops the kernel sampled (those that found no flow slot included).
    pub sampled_drops: u64,
}

impl FlowSampling {
    /// Whether flow counts are estimates rather than counts.
    pub fn estimated(&self) -> bool {
        self.one_in > 1
    }
}

impl Tally {
    pub fn new(max_flows: usize) -> Tally {
        Tally {
            total: 0,
            by_cause: [0; Cause::ALL.len()],
            by_netns: BTreeMap::new(),
            by_reason: BTreeMap::new(),
            by_ifindex: BTreeMap::new(),
            flows: FlowTable::new(),
            max_flows,
            flows_untracked: 0,
            flow_sampling: None,
        }
    }

    pub fn record(&mut self, ev: &DropEvent, cause: Cause) {
        let ci = cause_index(cause);
        self.total += 1;
        self.by_cause[ci] += 1;
        let ns = self.by_netns.entry(ev.netns).or_default();
        ns.total += 1;
        ns.by_cause[ci] += 1;
        *self.by_reason.entry(ev.reason).or_default() += 1;
        if let Some(ifx) = ev.ifindex {
            *self.by_ifindex.entry((ev.netns, ifx)).or_default() += 1;
        }
        let id = FlowId::of(ev);
        let len = self.flows.len;
        match self.flows.find(&id) {
            (_, Some(stat)) => {
                stat.drops += 1;
                stat.bytes += ev.skb_len as u64;
                stat.last_ns = ev.ts_ns;
                stat.by_cause[ci] = stat.by_cause[ci].saturating_add(1);
            }
            _ if len >= self.max_flows => self.flows_untracked += 1,
            (h, None) => {
                let mut stat = StoredStat {
                    drops: 1,
                    bytes: ev.skb_len as u64,
                    first_ns: ev.ts_ns,
                    last_ns: ev.ts_ns,
                    ..Default::default()
                };
                stat.by_cause[ci] = 1;
                self.flows.insert(h, id, stat);
            }
        }
    }

    /// Count mode: `n` drops the kernel counted in one (namespace, reason)
    /// group, all of one cause. Totals only; flows come from [`Self::add_flow`].
    pub fn add_counted(&mut self, netns: Option<u32>, reason: u32, cause: Cause, n: u64) {
        let ci = cause_index(cause);
        self.total += n;
        self.by_cause[ci] += n;
        let ns = self.by_netns.entry(netns).or_default();
        ns.total += n;
        ns.by_cause[ci] += n;
        *self.by_reason.entry(reason).or_default() += n;
    }

    /// Count mode: one flow's kernel counters into the per-flow table, within
    /// the cap like [`Self::record`]; the totals are not touched.
    pub fn add_flow(&mut self, id: FlowId, stat: FlowStat) {
        let len = self.flows.len;
        match self.flows.find(&id) {
            (_, Some(s)) => s.add(&stat),
            _ if len >= self.max_flows => self.flows_untracked += stat.drops,
            (h, None) => {
                let mut s = StoredStat {
                    first_ns: u64::MAX,
                    ..Default::default()
                };
                s.add(&stat);
                self.flows.insert(h, id, s);
            }
        }
    }

    pub fn count(&self, c: Cause) -> u64 {
        self.by_cause[cause_index(c)]
    }

    pub fn count_in(&self, netns: u32, c: Cause) -> u64 {
        self.by_netns
            .get(&Some(netns))
            .map(|t| t.by_cause[cause_index(c)])
            .unwrap_or(0)
    }

    /// Drops per cause, every cause listed (0 where none): the JSON
    /// summary's and report's `drops_by_cause`.
    pub fn by_cause_map(&self) -> BTreeMap<&'static str, u64> {
        Cause::ALL
            .iter()
            .map(|c| (c.as_str(), self.count(*c)))
            .collect()
    }

    /// Drops per namespace inode ("unknown" for drops without one): the
    /// JSON summary's and report's `drops_by_netns`.
    pub fn by_netns_map(&self) -> BTreeMap<String, u64> {
        self.by_netns
            .iter()
            .map(|(ns, n)| {
                let key = ns.map(|x| x.to_string());
                (key.unwrap_or_else(|| "unknown".into()), n.total)
            })
            .collect()
    }

    /// Every flow kept in detail, in no particular order.
    pub fn flows(&self) -> impl Iterator<Item = (&FlowId, FlowStat)> {
        self.flows.iter().map(|(id, s)| (id, s.to_stat()))
    }

    pub fn flows_tracked(&self) -> usize {
        self.flows.len
    }

    /// Flows with the most drops, most first; ties broken by flow for a
    /// stable order.
    pub fn top_flows(&self, n: usize) -> Vec<(&FlowId, FlowStat)> {
        let mut v: Vec<&(FlowId, StoredStat)> = self.flows.iter().collect();
        let order = |a: &&(FlowId, StoredStat), b: &&(FlowId, StoredStat)| {
            b.1.drops.cmp(&a.1.drops).then_with(|| a.0.cmp(&b.0))
        };
        // Only the first n need sorting: a million flows are not sorted whole.
        if n < v.len() {
            v.select_nth_unstable_by(n, order);
            v.truncate(n);
        }
        v.sort_by(order);
        v.into_iter().map(|(id, s)| (id, s.to_stat())).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::Flow;
    use tracer_common::source;

    fn ev(dport: u16, netns: u32) -> DropEvent {
        DropEvent {
            ts_ns: dport as u64,
            cpu: 0,
            reason: 12,
            location: 0,
            skb: 0,
            source: source::KFREE_SKB,
            netns: Some(netns),
            ifindex: Some(2),
            skb_len: 100,
            flow: Some(Flow {
                src: "198.18.0.1".parse().unwrap(),
                dst: "198.18.0.2".parse().unwrap(),
                proto: 17,
                ports: Some((9, dport)),
            }),
            icmp: None,
            ct: None,
            ct_fill: None,
            truncated: false,
            header: None,
        }
    }

    #[test]
    fn totals_stay_exact_past_the_flow_cap() {
        let mut t = Tally::new(2);
        for p in 0..5 {
            t.record(&ev(p, 1), Cause::ConntrackTableFull);
        }
        t.record(&ev(0, 1), Cause::NetfilterRule);
        assert_eq!(t.total, 6);
        assert_eq!(t.count(Cause::ConntrackTableFull), 5);
        assert_eq!(t.count_in(1, Cause::NetfilterRule), 1);
        assert_eq!(t.flows_tracked(), 2);
        assert_eq!(t.flows_untracked, 3);
    }

    #[test]
    fn counted_groups_and_flows_keep_totals_apart() {
        let mut t = Tally::new(1);
        t.add_counted(Some(1), 12, Cause::ConntrackTableFull, 1000);
        t.add_counted(Some(2), 12, Cause::NetfilterRule, 5);
        let stat = |drops| FlowStat {
            drops,
            by_cause: [drops, 0, 0, 0, 0, 0],
            ..Default::default()
        };
        t.add_flow(FlowId::of(&ev(1, 1)), stat(600));
        t.add_flow(FlowId::of(&ev(1, 1)), stat(100));
        t.add_flow(FlowId::of(&ev(2, 1)), stat(300));
        assert_eq!(t.total, 1005);
        assert_eq!(t.count_in(1, Cause::ConntrackTableFull), 1000);
        assert_eq!(t.count_in(2, Cause::NetfilterRule), 5);
        assert_eq!(t.flows_tracked(), 1);
        assert_eq!(t.top_flows(1)[0].1.drops, 700);
        // The second flow did not fit: its drops are named, not lost.
        assert_eq!(t.flows_untracked, 300);
    }

    #[test]
    fn top_flows_orders_by_drops() {
        let mut t = Tally::new(100);
        for _ in 0..3 {
            t.record(&ev(7, 1), Cause::ConntrackTableFull);
        }
        t.record(&ev(8, 1), Cause::NetfilterRule);
        let top = t.top_flows(1);
        assert_eq!(top[0].0.dport, 7);
        assert_eq!(top[0].1.drops, 3);
        assert_eq!(top[0].1.main_cause(), Cause::ConntrackTableFull);
        assert_eq!(top[0].1.first_ns, 7);
    }
}
