//! Readable under a flood: drops of one (namespace, cause) group beyond a
//! rate are folded into one line per second,
//! `+ 31234 drops: conntrack_table_full in ns srv, top port udp/5353 (30211)`,
//! while groups under the rate still print drop by drop. Used by human
//! `live` and by the demo (which folds all of its flood).

use super::Shown;
use crate::conntrack::netns::label as netns_label;
use crate::{cause::Cause, events::decode::proto_name};

/// Drop lines per group and second printed one by one before folding.
pub const DEFAULT_LIMIT: u32 = 10;
/// Distinct ports remembered per group for the "top port"; a flood over
/// every port must not cost memory per port beyond this.
const MAX_PORTS: usize = 4096;

type Key = (Option<u32>, Cause);
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

#[derive(Default)]
struct Group {
    /// Lines shown in this second.
    shown: u32,
    /// Drops folded since the last fold line.
    folded: u64,
    label: String,
    /// (proto, destination port) -> folded drops.
    ports: HashMap<(u8, u16), u64>,
}

pub struct Folder {
    limit: u32,
    /// Unix second the `shown` counts belong to.
    second: u64,
    groups: HashMap<Key, Group>,
}

/// Folds every drop (the demo's flood): lines come from [`Folder::take_lines`].
impl Default for Folder {
    fn default() -> Self {
        Folder::new(0)
    }
}

impl Folder {
    /// `limit` lines per group and second before folding (0: fold all).
    pub fn new(limit: u32) -> Folder {
        Folder {
            limit,
            second: 0,
            groups: HashMap::default(),
        }
    }

    /// Whether to print this drop's own line; when not, it is counted for
    /// the group's next fold line. Call [`Folder::due`] first.
    pub fn admit(&mut self, s: &Shown) -> bool {
        let limit = self.limit;
        let g = self.group(s);
        if g.shown < limit {
            g.shown += 1;
            return true;
        }
        fold_into(g, s);
        false
    }

    /// Counts a drop for the next fold line, whatever the rate.
    pub fn fold(&mut self, s: &Shown) {
        let g = self.group(s);
        fold_into(g, s);
    }

    fn group(&mut self, s: &Shown) -> &mut Group {
        self.groups
            .entry((s.ev.netns, s.cause))
            .or_insert_with(|| Group {
                label: netns_label(s.ev.netns, s.netns_name),
                ..Default::default()
            })
    }

    /// Fold lines for seconds that ended before `wall_ns`: call before each
    /// drop and once a second, so a fold line comes even after the flood.
    pub fn due(&mut self, wall_ns: u64, out: &mut Vec<String>) {
        let sec = wall_ns / 1_000_000_000;
        if sec > self.second {
            let at = self.second;
            self.second = sec;
            self.take_lines_at(at, out);
            for g in self.groups.values_mut() {
                g.shown = 0;
            }
        }
    }

    /// Every pending fold line now (end of a run; the demo's own rhythm).
    pub fn take_lines(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        self.take_lines_at(self.second, &mut out);
        out
    }

    fn take_lines_at(&mut self, sec: u64, out: &mut Vec<String>) {
        let mut keys: Vec<Key> = self
            .groups
            .iter()
            .filter(|(_, g)| g.folded > 0)
            .map(|(k, _)| *k)
            .collect();
        keys.sort();
        for k in keys {
            let g = self.groups.get_mut(&k).unwrap();
            let top = g
                .ports
                .iter()
                .max_by_key(|(p, n)| (**n, std::cmp::Reverse(**p)))
                .map(|(p, n)| (p.0, p.1, *n));
            out.push(fold_line(sec * 1_000_000_000, g.folded, k.1, &g.label, top));
            g.folded = 0;
            g.ports.clear();
        }
        // Groups that went quiet are forgotten: a long run over many
        // namespaces keeps only the active ones.
        self.groups.retain(|_, g| g.shown > 0 || g.folded > 0);
    }
}

fn fold_into(g: &mut Group, s: &Shown) {
    g.folded += 1;
    if let Some((proto, Some((_, dport)))) = s.ev.flow.as_ref().map(|f| (f.proto, f.ports)) {
        let n = g.ports.len();
        if let Some(c) = g.ports.get_mut(&(proto, dport)) {
            *c += 1;
        } else if n < MAX_PORTS {
            g.ports.insert((proto, dport), 1);
        }
    }
}

/// `hh:mm:ss.000000 + N drops: CAUSE in ns X, top port udp/5353 (M)`.
pub fn fold_line(
    wall_ns: u64,
    n: u64,
    cause: Cause,
    ns: &str,
    top: Option<(u8, u16, u64)>,
) -> String {
    let mut l = format!("{} + {n} drops: {cause} in ns {ns}", super::clock(wall_ns));
    if let Some((proto, port, k)) = top {
        l += &format!(", top port {}/{port} ({k})", proto_name(proto));
    }
    l
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{DropEvent, Flow};

    fn ev(ns: u32, dport: u16) -> DropEvent {
        DropEvent {
            ts_ns: 0,
            cpu: 0,
            reason: 12,
            location: 0,
            skb: 0,
            source: 0,
            netns: Some(ns),
            ifindex: None,
            skb_len: 64,
            flow: Some(Flow {
                src: "198.18.0.1".parse().unwrap(),
                dst: "198.18.0.2".parse().unwrap(),
                proto: 17,
                ports: Some((1000, dport)),
            }),
            icmp: None,
            ct: None,
            ct_fill: None,
            truncated: false,
            header: None,
        }
    }

    fn shown<'a>(ev: &'a DropEvent, cause: Cause, wall_ns: u64) -> Shown<'a> {
        Shown {
            ev,
            cause,
            wall_ns,
            reason: "NETFILTER_DROP",
            netns_name: Some("srv"),
            ifname: None,
            location: "",
        }
    }

    #[test]
    fn a_flood_folds_to_one_line_per_second_and_rare_groups_still_print() {
        let mut f = Folder::new(10);
        let mut lines = Vec::new();
        let mut printed = 0;
        let flood = ev(1, 5353);
        let other = ev(2, 80);
        for sec in 100..103u64 {
            for i in 0..1000u64 {
                let t = sec * 1_000_000_000 + i * 1000;
                f.due(t, &mut lines);
                printed += f.admit(&shown(&flood, Cause::ConntrackTableFull, t)) as u32;
                if i % 500 == 0 {
                    printed += f.admit(&shown(&other, Cause::NetfilterRule, t)) as u32;
                }
            }
        }
        f.due(103_000_000_000, &mut lines);
        // 10 flood lines a second, and every rare drop.
        assert_eq!(printed, 3 * 10 + 3 * 2);
        assert_eq!(lines.len(), 3, "{lines:?}");
        for l in &lines {
            assert!(
                l.ends_with("+ 990 drops: conntrack_table_full in ns srv, top port udp/5353 (990)"),
                "{l}"
            );
        }
        assert!(f.take_lines().is_empty());
    }

    #[test]
    fn fold_all_counts_every_drop() {
        let mut f = Folder::new(0);
        let e = ev(1, 7);
        for _ in 0..5 {
            f.fold(&shown(&e, Cause::ConntrackTableFull, 1));
        }
        let l = f.take_lines();
        assert_eq!(l.len(), 1);
        assert!(
            l[0].contains("+ 5 drops: conntrack_table_full in ns srv, top port udp/7 (5)"),
            "{l:?}"
        );
    }
}
