//! The one-pass builder that folds dumped entries into what a snapshot
//! found: counts by protocol and state, by liveness, and the sources,
//! destinations and destination ports holding the most entries. The
//! snapshot itself ([`Occupancy`]) is defined with the other emitted
//! objects, in `crate::model::occupancy`.

use std::net::IpAddr;

use super::entry::{tcp_state_name, CtEntry, Liveness};
use crate::events::decode::proto_name;

/// Rows kept in each top list.
pub const TOP_N: usize = 5;

pub use crate::model::occupancy::{AddrRow, Occupancy, PortRow, StateRow};

#[derive(Default)]
struct PortAcc {
    entries: u64,
    unreplied: u64,
    assured: u64,
    sources: FastSet<IpAddr>,
    last_source: Option<IpAddr>,
}

type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
type FastSet<T> = std::collections::HashSet<T, foldhash::fast::RandomState>;

/// Distinct sources tracked per port: enough to tell "one client" from
/// "many"; a flood from a /8 must not cost memory per address.
pub(super) const SOURCES_PER_PORT: usize = 64;

/// Row of the state table: TCP states by number, then the liveness of
/// stateless protocols.
fn state_slot(e: &CtEntry) -> usize {
    match e.tcp_state {
        Some(s) => s.min(15) as usize,
        None => 16 + e.liveness() as usize,
    }
}

fn slot_label(slot: usize) -> &'static str {
    match slot {
        0..=15 => tcp_state_name(slot as u8),
        16 => Liveness::Unreplied.as_str(),
        17 => Liveness::Replied.as_str(),
        _ => Liveness::Assured.as_str(),
    }
}

/// Folds entries into counts; one pass, memory bounded by distinct keys.
/// Hashing is the cost that matters here (a full table is 262144 entries,
/// four lookups each), hence foldhash and an array for the states.
pub struct OccupancyBuilder {
    entries: u64,
    by_liveness: [u64; 3],
    nat: u64,
    /// [proto][slot][liveness]
    states: Vec<[[u64; 3]; 19]>,
    sources: FastMap<IpAddr, (u64, u64)>,
    dests: FastMap<IpAddr, (u64, u64)>,
    ports: FastMap<(u8, u16), PortAcc>,
}

impl Default for OccupancyBuilder {
    fn default() -> Self {
        OccupancyBuilder {
            entries: 0,
            by_liveness: [0; 3],
            nat: 0,
            states: vec![[[0; 3]; 19]; 256],
            sources: FastMap::default(),
            dests: FastMap::default(),
            ports: FastMap::default(),
        }
    }
}

impl OccupancyBuilder {
    pub fn add(&mut self, e: &CtEntry) {
        let live = e.liveness();
        let l = live as usize;
        let unreplied = (live == Liveness::Unreplied) as u64;
        self.entries += 1;
        self.by_liveness[l] += 1;
        self.nat += e.natted() as u64;
        self.states[e.proto as usize][state_slot(e)][l] += 1;
        let s = self.sources.entry(e.src).or_default();
        s.0 += 1;
        s.1 += unreplied;
        let d = self.dests.entry(e.dst).or_default();
        d.0 += 1;
        d.1 += unreplied;
        if has_ports(e.proto) {
            let p = self.ports.entry((e.proto, e.dport)).or_default();
            p.entries += 1;
            p.unreplied += unreplied;
            p.assured += (live == Liveness::Assured) as u64;
            // A flood repeats its source: skip the set when it does.
            if p.last_source != Some(e.src) && p.sources.len() < SOURCES_PER_PORT {
                p.sources.insert(e.src);
                p.last_source = Some(e.src);
            }
        }
    }

    pub fn finish(self, top: usize) -> Occupancy {
        let mut by_proto_state = Vec::new();
        for (p, slots) in self.states.iter().enumerate() {
            for (slot, n) in slots.iter().enumerate() {
                let entries: u64 = n.iter().sum();
                if entries > 0 {
                    by_proto_state.push(StateRow {
                        proto: proto_name(p as u8),
                        state: slot_label(slot).into(),
                        entries,
                        unreplied: n[Liveness::Unreplied as usize],
                        assured: n[Liveness::Assured as usize],
                    });
                }
            }
        }
        by_proto_state.sort_by(|a, b| {
            b.entries
                .cmp(&a.entries)
                .then_with(|| (&a.proto, &a.state).cmp(&(&b.proto, &b.state)))
        });
        let top_addrs = |m: FastMap<IpAddr, (u64, u64)>| {
            let mut v: Vec<AddrRow> = m
                .into_iter()
                .map(|(addr, (entries, unreplied))| AddrRow {
                    addr,
                    entries,
                    unreplied,
                })
                .collect();
            v.sort_by(|a, b| b.entries.cmp(&a.entries).then_with(|| a.addr.cmp(&b.addr)));
            v.truncate(top);
            v
        };
        let mut ports: Vec<((u8, u16), PortAcc)> = self.ports.into_iter().collect();
        ports.sort_by(|(ka, a), (kb, b)| b.entries.cmp(&a.entries).then_with(|| ka.cmp(kb)));
        ports.truncate(top);
        let ports: Vec<PortRow> = ports
            .into_iter()
            .map(|((proto_num, port), a)| PortRow {
                proto: proto_name(proto_num),
                port,
                entries: a.entries,
                unreplied: a.unreplied,
                assured: a.assured,
                sources: a.sources.len() as u64,
            })
            .collect();
        Occupancy {
            netns: None,
            netns_name: None,
            entries: self.entries,
            max: None,
            unreplied: self.by_liveness[Liveness::Unreplied as usize],
            replied: self.by_liveness[Liveness::Replied as usize],
            assured: self.by_liveness[Liveness::Assured as usize],
            nat: self.nat,
            nat_rules: None,
            unreadable: 0,
            by_proto_state,
            top_sources: top_addrs(self.sources),
            top_destinations: top_addrs(self.dests),
            top_dst_ports: ports,
            taken_ns: 0,
            elapsed_ms: 0.0,
            cpu_ms: 0.0,
        }
    }
}

pub(super) fn has_ports(proto: u8) -> bool {
    matches!(proto, 6 | 17 | 33 | 132 | 136)
}
