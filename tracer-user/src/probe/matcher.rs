//! Ties probes to answers and lost probes to the drop records that explain
//! them. Pure logic: the session feeds it sends, replies, drops and time.
//!
//! Rules: a probe is lost only once its timeout has passed; a reply after
//! that is `late` and changes no count; an answered probe is never matched
//! to a drop; a drop explains a probe only if it happened between the send
//! and the timeout, on the probe's own wire identity (echo id+seq, or the
//! local port of a TCP/UDP probe), in either direction.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    net::IpAddr,
};

use crate::{
    cause::Cause,
    model::{DropLine, ProbeCounts},
};

/// What identifies a probe's packets on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Wire {
    /// ICMP/ICMPv6 echo: conntrack keys it by id, so a new id is a new flow.
    Echo { id: u16, seq: u16 },
    /// TCP SYN or UDP datagram from this local port to the target port.
    Port { proto: u8, local: u16, remote: u16 },
}

/// A drop that may explain a probe: its line, kept typed as it will be
/// shown in the probe's verdict, and which way the packet went. Reads as
/// its [`DropLine`] (`d.cause`, `d.mono_ns`, `d.netns_name`, ...).
#[derive(Clone, Debug, PartialEq)]
pub struct SeenDrop {
    pub line: DropLine<'static>,
    /// true when the dropped packet was the answer coming back.
    pub reply_path: bool,
}

impl std::ops::Deref for SeenDrop {
    type Target = DropLine<'static>;
    fn deref(&self) -> &DropLine<'static> {
        &self.line
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Status {
    Ok {
        rtt_ns: u64,
    },
    /// Boxed: a drop line is large, and most outcomes carry none.
    Lost {
        drop: Option<Box<SeenDrop>>,
    },
    Late {
        rtt_ns: u64,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    pub target: usize,
    /// 1-based probe number for this target (what the operator counts).
    pub number: u64,
    pub wire: Wire,
    pub sent_ns: u64,
    pub status: Status,
}

struct Pending {
    number: u64,
    sent_ns: u64,
}

/// Echo drops of pings ctdrop did not send, grouped per (src, dst, id).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PassiveLoss {
    pub seqs: Vec<(u16, Cause)>,
}

pub struct Matcher {
    timeout_ns: u64,
    pending: HashMap<(usize, Wire), Pending>,
    /// Probes declared lost, kept for a while to recognise late replies.
    expired: HashMap<(usize, Wire), (u64, u64)>,
    expired_order: VecDeque<(u64, (usize, Wire))>,
    /// Drops that may explain a probe: (host, wire) -> drops, oldest first.
    drops: HashMap<(IpAddr, Wire), Vec<SeenDrop>>,
    drop_order: VecDeque<(u64, (IpAddr, Wire))>,
    hosts: Vec<IpAddr>,
    pub stats: Vec<ProbeCounts>,
    /// Every dropped echo request, per (src, dst, id); ctdrop's own are
    /// filtered out when read (a drop can be seen before its send is).
    passive: BTreeMap<(IpAddr, IpAddr, u16), PassiveLoss>,
    own_echo_ids: std::collections::HashSet<(IpAddr, u16)>,
    /// Dropped echo requests not kept in the passive table (it was full).
    pub passive_overflow: u64,
    passive_seqs: usize,
    stored_drops: usize,
    /// Drops forgotten early because [`MAX_DROPS`] were already held.
    pub drops_evicted: u64,
}

/// Bounds of the passive echo-loss table; what does not fit is counted.
const PASSIVE_GROUPS: usize = 10_000;
const PASSIVE_SEQS: usize = 1_000;
/// Lost seqs kept over all groups: groups times seqs alone would allow 40 MB,
/// reached by a ping flood whose ids wrap (measured growing ~24 KiB/s).
const PASSIVE_TOTAL_SEQS: usize = 100_000;

/// How long expired probes are remembered beyond the timeout (late replies).
const MEMORY_NS: u64 = 30_000_000_000;
/// How long drops are remembered beyond the timeout: a drop can only
/// explain a probe sent at most one timeout before it, and that probe
/// expires one timeout after being sent; the rest covers the expiry tick
/// and records still in the ring.
const DROP_SLACK_NS: u64 = 2_000_000_000;
/// Drops held at once, at most: a flood towards a probed host must not grow
/// memory with its rate (~1 KiB each).
pub const MAX_DROPS: usize = 20_000;

impl Matcher {
    pub fn new(hosts: Vec<IpAddr>, timeout_ns: u64) -> Matcher {
        let n = hosts.len();
        Matcher {
            timeout_ns,
            pending: HashMap::new(),
            expired: HashMap::new(),
            expired_order: VecDeque::new(),
            drops: HashMap::new(),
            drop_order: VecDeque::new(),
            hosts,
            stats: vec![ProbeCounts::default(); n],
            passive: BTreeMap::new(),
            own_echo_ids: Default::default(),
            passive_overflow: 0,
            passive_seqs: 0,
            stored_drops: 0,
            drops_evicted: 0,
        }
    }

    pub fn host(&self, target: usize) -> IpAddr {
        self.hosts[target]
    }

    pub fn sent(&mut self, target: usize, number: u64, wire: Wire, now_ns: u64) {
        self.stats[target].sent += 1;
        if let Wire::Echo { id, .. } = wire {
            self.own_echo_ids.insert((self.hosts[target], id));
        }
        self.pending.insert(
            (target, wire),
            Pending {
                number,
                sent_ns: now_ns,
            },
        );
    }

    /// An answer arrived. None for answers to nothing we sent (duplicates
    /// of an already answered probe, or someone else's traffic).
    pub fn replied(&mut self, target: usize, wire: Wire, now_ns: u64) -> Option<Outcome> {
        if let Some(p) = self.pending.remove(&(target, wire)) {
            self.stats[target].answered += 1;
            let rtt_ns = now_ns.saturating_sub(p.sent_ns);
            return Some(Outcome {
                target,
                number: p.number,
                wire,
                sent_ns: p.sent_ns,
                status: Status::Ok { rtt_ns },
            });
        }
        if let Some((number, sent_ns)) = self.expired.remove(&(target, wire)) {
            self.stats[target].late += 1;
            let rtt_ns = now_ns.saturating_sub(sent_ns);
            return Some(Outcome {
                target,
                number,
                wire,
                sent_ns,
                status: Status::Late { rtt_ns },
            });
        }
        None
    }

    /// An echo request from `src` to `dst` was dropped: kept for the passive
    /// report of pings ctdrop did not send (its own are filtered out when
    /// read).
    pub fn echo_request_dropped(
        &mut self,
        src: IpAddr,
        dst: IpAddr,
        id: u16,
        seq: u16,
        cause: Cause,
    ) {
        let key = (src, dst, id);
        let new_group = !self.passive.contains_key(&key);
        if self.passive_seqs >= PASSIVE_TOTAL_SEQS
            || (new_group && self.passive.len() >= PASSIVE_GROUPS)
        {
            self.passive_overflow += 1;
            return;
        }
        match self.passive.entry(key).or_default() {
            g if g.seqs.len() < PASSIVE_SEQS => {
                g.seqs.push((seq, cause));
                self.passive_seqs += 1;
            }
            _ => self.passive_overflow += 1,
        }
    }

    /// A drop record involving `peer` (the far end of the flow) on `wire`,
    /// kept while it may explain a probe; ignored unless `peer` is probed.
    pub fn dropped(&mut self, peer: IpAddr, wire: Wire, d: SeenDrop) {
        if !self.has_host(peer) {
            return;
        }
        if self.stored_drops >= MAX_DROPS {
            self.evict_oldest_drop();
        }
        let t = d.mono_ns;
        self.drops.entry((peer, wire)).or_default().push(d);
        self.drop_order.push_back((t, (peer, wire)));
        self.stored_drops += 1;
    }

    fn evict_oldest_drop(&mut self) {
        while let Some((_, key)) = self.drop_order.pop_front() {
            let Some(v) = self.drops.get_mut(&key) else {
                continue;
            };
            // Drops of one key arrive in ring order: the first is the oldest.
            if !v.is_empty() {
                v.remove(0);
                self.stored_drops -= 1;
                self.drops_evicted += 1;
            }
            if v.is_empty() {
                self.drops.remove(&key);
            }
            return;
        }
    }

    /// Declares every probe past its timeout lost, with its explanation.
    pub fn expire(&mut self, now_ns: u64) -> Vec<Outcome> {
        let due: Vec<(usize, Wire)> = self
            .pending
            .iter()
            .filter(|(_, p)| now_ns >= p.sent_ns + self.timeout_ns)
            .map(|(k, _)| *k)
            .collect();
        let mut out = Vec::new();
        for key in due {
            let p = self.pending.remove(&key).unwrap();
            let (target, wire) = key;
            let host = self.hosts[target];
            let window = p.sent_ns..=p.sent_ns + self.timeout_ns;
            let drop = self
                .drops
                .get(&(host, wire))
                .and_then(|ds| ds.iter().find(|d| window.contains(&d.mono_ns)))
                .map(|d| Box::new(d.clone()));
            self.stats[target].count_lost(drop.as_ref().map(|d| d.cause));
            self.expired.insert(key, (p.number, p.sent_ns));
            self.expired_order.push_back((now_ns, key));
            out.push(Outcome {
                target,
                number: p.number,
                wire,
                sent_ns: p.sent_ns,
                status: Status::Lost { drop },
            });
        }
        out.sort_by_key(|o| (o.target, o.number));
        self.forget(now_ns);
        out
    }

    fn forget(&mut self, now_ns: u64) {
        let drop_horizon = now_ns.saturating_sub(DROP_SLACK_NS + self.timeout_ns);
        while let Some((t, key)) = self.drop_order.front().copied() {
            if t >= drop_horizon {
                break;
            }
            self.drop_order.pop_front();
            if let Some(v) = self.drops.get_mut(&key) {
                let before = v.len();
                v.retain(|d| d.mono_ns >= drop_horizon);
                self.stored_drops -= before - v.len();
                if v.is_empty() {
                    self.drops.remove(&key);
                }
            }
        }
        let horizon = now_ns.saturating_sub(MEMORY_NS + self.timeout_ns);
        while let Some((t, key)) = self.expired_order.front().copied() {
            if t >= horizon {
                break;
            }
            self.expired_order.pop_front();
            self.expired.remove(&key);
        }
    }

    /// Echo losses of pings ctdrop did not send: (src, dst, id, losses).
    pub fn passive_groups(&self) -> impl Iterator<Item = (IpAddr, IpAddr, u16, &PassiveLoss)> {
        self.passive
            .iter()
            .filter(|((_, dst, id), _)| !self.own_echo_ids.contains(&(*dst, *id)))
            .map(|((s, d, id), g)| (*s, *d, *id, g))
    }

    pub fn has_host(&self, a: IpAddr) -> bool {
        self.hosts.contains(&a)
    }

    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Drops held now to explain probes.
    pub fn stored_drops(&self) -> usize {
        self.stored_drops
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;
    fn host() -> IpAddr {
        "198.18.0.2".parse().unwrap()
    }
    fn drop_at(t: u64, cause: Cause, reply: bool) -> SeenDrop {
        SeenDrop {
            line: DropLine {
                kind: Default::default(),
                ts_ns: t,
                mono_ns: t,
                cause,
                reason: "NETFILTER_DROP".into(),
                netns: Some(1),
                netns_name: None,
                ifindex: None,
                ifname: None,
                proto: Some("icmp".into()),
                src: None,
                dst: None,
                sport: None,
                dport: None,
                icmp_type: Some(8),
                icmp_code: Some(0),
                icmp_id: None,
                icmp_seq: None,
                ct_count: Some(64),
                ct_max: Some(64),
                ct_fill: Some(crate::model::FillOrigin::Sampled),
                has_ct: false,
                untracked: false,
                location: "nf_hook_slow".into(),
                evidence: "inferred".into(),
                cpu: 0,
                len: 84,
            },
            reply_path: reply,
        }
    }
    fn echo(id: u16, seq: u16) -> Wire {
        Wire::Echo { id, seq }
    }

    #[test]
    fn out_of_order_replies_match_their_own_probe() {
        let mut m = Matcher::new(vec![host()], S);
        m.sent(0, 1, echo(10, 1), 0);
        m.sent(0, 2, echo(11, 1), S / 10);
        let b = m.replied(0, echo(11, 1), S / 5).unwrap();
        let a = m.replied(0, echo(10, 1), S / 4).unwrap();
        assert_eq!((a.number, b.number), (1, 2));
        assert_eq!(a.status, Status::Ok { rtt_ns: S / 4 });
        assert_eq!(m.stats[0].answered, 2);
        assert!(m.expire(10 * S).is_empty());
    }

    #[test]
    fn duplicate_reply_counts_once() {
        let mut m = Matcher::new(vec![host()], S);
        m.sent(0, 1, echo(10, 1), 0);
        assert!(m.replied(0, echo(10, 1), 5).is_some());
        assert!(m.replied(0, echo(10, 1), 6).is_none());
        assert_eq!(m.stats[0].answered, 1);
    }

    #[test]
    fn lost_only_after_timeout_and_late_reply_not_double_counted() {
        let mut m = Matcher::new(vec![host()], S);
        m.sent(0, 1, echo(10, 1), 0);
        assert!(m.expire(S - 1).is_empty());
        let lost = m.expire(S);
        assert_eq!(lost.len(), 1);
        assert_eq!(lost[0].status, Status::Lost { drop: None });
        let late = m.replied(0, echo(10, 1), 2 * S).unwrap();
        assert_eq!(late.status, Status::Late { rtt_ns: 2 * S });
        assert_eq!(
            (m.stats[0].lost, m.stats[0].late, m.stats[0].answered),
            (1, 1, 0)
        );
        assert_eq!(m.stats[0].lost_unexplained, 1);
    }

    #[test]
    fn lost_probe_gets_the_drop_on_either_path() {
        let mut m = Matcher::new(vec![host()], S);
        m.sent(0, 1, echo(10, 1), 0);
        m.sent(0, 2, echo(11, 1), 0);
        m.dropped(
            host(),
            echo(10, 1),
            drop_at(S / 100, Cause::ConntrackTableFull, false),
        );
        m.dropped(
            host(),
            echo(11, 1),
            drop_at(S / 100, Cause::NetfilterRule, true),
        );
        let lost = m.expire(S);
        let Status::Lost { drop: Some(d1) } = &lost[0].status else {
            panic!()
        };
        let Status::Lost { drop: Some(d2) } = &lost[1].status else {
            panic!()
        };
        assert_eq!(d1.cause, Cause::ConntrackTableFull);
        assert_eq!(d2.cause, Cause::NetfilterRule);
        assert!(d2.reply_path);
        assert_eq!(m.stats[0].lost_by_cause["conntrack_table_full"], 1);
        assert_eq!(m.passive_groups().count(), 0);
    }

    #[test]
    fn answered_probe_never_takes_a_drop() {
        let mut m = Matcher::new(vec![host()], S);
        m.sent(0, 1, echo(10, 1), 0);
        m.dropped(
            host(),
            echo(10, 1),
            drop_at(1, Cause::ConntrackTableFull, false),
        );
        assert!(matches!(
            m.replied(0, echo(10, 1), 2).unwrap().status,
            Status::Ok { .. }
        ));
        assert!(m.expire(10 * S).is_empty());
        assert_eq!(m.stats[0].lost, 0);
    }

    #[test]
    fn seq_wraps_at_65535_with_same_id() {
        let mut m = Matcher::new(vec![host()], S);
        m.sent(0, 65536, echo(7, 65535), 0);
        m.sent(0, 65537, echo(7, 0), S / 2);
        let r = m.replied(0, echo(7, 0), S / 2 + 10).unwrap();
        assert_eq!(r.number, 65537);
        let lost = m.expire(2 * S);
        assert_eq!(lost.len(), 1);
        assert_eq!(lost[0].number, 65536);
    }

    #[test]
    fn drop_outside_the_probe_window_is_not_its_explanation() {
        // An operator's ping with the same id and seq, dropped long before.
        let mut m = Matcher::new(vec![host()], S);
        m.dropped(
            host(),
            echo(10, 1),
            drop_at(0, Cause::ConntrackTableFull, false),
        );
        m.sent(0, 1, echo(10, 1), 5 * S);
        let lost = m.expire(6 * S);
        assert_eq!(lost[0].status, Status::Lost { drop: None });
    }

    #[test]
    fn foreign_echo_drops_are_grouped_passively() {
        let mut m = Matcher::new(vec![host()], S);
        let other: IpAddr = "198.18.0.9".parse().unwrap();
        let me: IpAddr = "198.18.0.1".parse().unwrap();
        for seq in [3, 4, 9] {
            m.echo_request_dropped(me, other, 500, seq, Cause::ConntrackTableFull);
        }
        let groups: Vec<_> = m.passive_groups().collect();
        assert_eq!(groups.len(), 1);
        assert_eq!((groups[0].0, groups[0].1, groups[0].2), (me, other, 500));
        assert_eq!(
            groups[0].3.seqs.iter().map(|s| s.0).collect::<Vec<_>>(),
            vec![3, 4, 9]
        );
    }

    #[test]
    fn own_probe_dropped_before_its_send_is_seen_is_not_passive() {
        let mut m = Matcher::new(vec![host()], S);
        let me: IpAddr = "198.18.0.1".parse().unwrap();
        m.echo_request_dropped(me, host(), 10, 1, Cause::ConntrackTableFull);
        m.dropped(
            host(),
            echo(10, 1),
            drop_at(5, Cause::ConntrackTableFull, false),
        );
        m.sent(0, 1, echo(10, 1), 4);
        assert_eq!(m.passive_groups().count(), 0);
        let lost = m.expire(2 * S);
        assert!(matches!(&lost[0].status, Status::Lost { drop: Some(_) }));
    }

    #[test]
    fn id_collision_with_an_operators_ping_to_another_host_stays_passive() {
        let mut m = Matcher::new(vec![host()], S);
        let other: IpAddr = "198.18.0.9".parse().unwrap();
        m.sent(0, 1, echo(10, 1), 0);
        m.echo_request_dropped(host(), other, 10, 1, Cause::ConntrackTableFull);
        m.dropped(
            other,
            echo(10, 1),
            drop_at(5, Cause::ConntrackTableFull, false),
        );
        assert_eq!(m.passive_groups().count(), 1);
        assert_eq!(m.expire(S)[0].status, Status::Lost { drop: None });
    }

    #[test]
    fn tcp_probe_matched_by_local_port() {
        let mut m = Matcher::new(vec![host()], S);
        let w = Wire::Port {
            proto: 6,
            local: 40000,
            remote: 80,
        };
        m.sent(0, 1, w, 0);
        m.dropped(host(), w, drop_at(10, Cause::ConntrackTableFull, false));
        m.dropped(
            host(),
            Wire::Port {
                proto: 6,
                local: 40001,
                remote: 80,
            },
            drop_at(10, Cause::NetfilterRule, false),
        );
        let lost = m.expire(S);
        let Status::Lost { drop: Some(d) } = &lost[0].status else {
            panic!()
        };
        assert_eq!(d.cause, Cause::ConntrackTableFull);
    }

    #[test]
    fn drops_towards_unprobed_hosts_cost_nothing() {
        let mut m = Matcher::new(vec![host()], S);
        let other: IpAddr = "198.18.0.9".parse().unwrap();
        for id in 0..1000 {
            m.dropped(
                other,
                echo(id, 1),
                drop_at(5, Cause::ConntrackTableFull, false),
            );
        }
        assert_eq!(m.stored_drops(), 0);
        let mut none = Matcher::new(vec![], S);
        none.dropped(
            host(),
            echo(1, 1),
            drop_at(5, Cause::ConntrackTableFull, false),
        );
        assert_eq!(none.stored_drops(), 0);
    }

    #[test]
    fn a_flood_towards_a_probed_host_is_held_to_a_bound() {
        let mut m = Matcher::new(vec![host()], S);
        m.sent(0, 1, echo(7, 1), S);
        for i in 0..MAX_DROPS as u64 + 10 {
            m.dropped(
                host(),
                echo(1000 + (i % 50_000) as u16, 1),
                drop_at(S + i, Cause::ConntrackTableFull, false),
            );
        }
        assert_eq!(m.stored_drops(), MAX_DROPS);
        assert_eq!(m.drops_evicted, 10);
        // The newest drops are the ones kept: the probe's own still explains it.
        m.dropped(
            host(),
            echo(7, 1),
            drop_at(S + S / 2, Cause::NetfilterRule, false),
        );
        let lost = m.expire(2 * S);
        let Status::Lost { drop: Some(d) } = &lost[0].status else {
            panic!("{lost:?}")
        };
        assert_eq!(d.cause, Cause::NetfilterRule);
    }

    #[test]
    fn drops_are_forgotten_once_no_probe_can_use_them() {
        let mut m = Matcher::new(vec![host()], S);
        for i in 0..100 {
            m.dropped(
                host(),
                echo(i, 1),
                drop_at(i as u64, Cause::ConntrackTableFull, false),
            );
        }
        m.expire(S + DROP_SLACK_NS - 1);
        assert_eq!(m.stored_drops(), 100);
        m.expire(S + DROP_SLACK_NS + 100);
        assert_eq!(m.stored_drops(), 0);
        assert_eq!(m.drops_evicted, 0);
    }

    #[test]
    fn passive_table_is_bounded() {
        let mut m = Matcher::new(vec![], S);
        let (a, b): (IpAddr, IpAddr) =
            ("198.18.0.1".parse().unwrap(), "198.18.0.2".parse().unwrap());
        for id in 0..=u16::MAX {
            m.echo_request_dropped(a, b, id, 1, Cause::ConntrackTableFull);
        }
        for seq in 0..2 * PASSIVE_SEQS as u16 {
            m.echo_request_dropped(a, b, 0, seq, Cause::ConntrackTableFull);
        }
        assert_eq!(m.passive_groups().count(), PASSIVE_GROUPS);
        assert!(m.passive_groups().all(|g| g.3.seqs.len() <= PASSIVE_SEQS));
        assert_eq!(
            m.passive_overflow,
            (65536 - PASSIVE_GROUPS) as u64 + PASSIVE_SEQS as u64 + 1
        );
        // Ids that wrap: each group gets another seq per wrap, up to the
        // total over all groups.
        let mut m = Matcher::new(vec![], S);
        for wrap in 0..50u16 {
            for id in 0..PASSIVE_GROUPS as u16 {
                m.echo_request_dropped(a, b, id, wrap, Cause::ConntrackTableFull);
            }
        }
        let kept: usize = m.passive_groups().map(|g| g.3.seqs.len()).sum();
        assert_eq!(kept, PASSIVE_TOTAL_SEQS);
        assert_eq!(
            m.passive_overflow,
            (50 * PASSIVE_GROUPS - PASSIVE_TOTAL_SEQS) as u64
        );
    }
}
