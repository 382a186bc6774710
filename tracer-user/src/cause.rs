//! The one place where a drop's reason, conntrack state and table fill
//! become a named cause. Every output names causes through [`Cause::as_str`].

use crate::events::{CtFill, DropEvent};
use tracer_common::{source, GroupKey};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Cause {
    /// No room for a new conntrack entry and nothing evictable.
    ConntrackTableFull,
    /// The new entry clashed with one inserted meanwhile (TCP, or UDP where
    /// clash resolution failed).
    ConntrackInsertFailed,
    /// Conntrack judged the packet invalid and a rule or the stack dropped it.
    ConntrackInvalid,
    /// An ICMP error that path-MTU discovery needs (frag-needed,
    /// packet-too-big) dropped by a filter rule.
    IcmpErrorBlocked,
    /// A filter/raw/mangle rule dropped the packet.
    NetfilterRule,
    /// Any other drop; the kernel's reason names it.
    Other,
}

impl Cause {
    pub const ALL: [Cause; 6] = [
        Cause::ConntrackTableFull,
        Cause::ConntrackInsertFailed,
        Cause::ConntrackInvalid,
        Cause::IcmpErrorBlocked,
        Cause::NetfilterRule,
        Cause::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Cause::ConntrackTableFull => "conntrack_table_full",
            Cause::ConntrackInsertFailed => "conntrack_insert_failed",
            Cause::ConntrackInvalid => "conntrack_invalid",
            Cause::IcmpErrorBlocked => "icmp_error_blocked",
            Cause::NetfilterRule => "netfilter_rule",
            Cause::Other => "other",
        }
    }

    pub fn parse(s: &str) -> Option<Cause> {
        Cause::ALL.into_iter().find(|c| c.as_str() == s)
    }

    /// A conntrack failure (as opposed to a rule doing its job).
    pub fn is_conntrack(self) -> bool {
        matches!(
            self,
            Cause::ConntrackTableFull | Cause::ConntrackInsertFailed | Cause::ConntrackInvalid
        )
    }
}

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a cause rests on, for operators deciding how far to trust it.
pub fn evidence(src: u8, cause: Cause) -> &'static str {
    match src {
        source::CT_ALLOC_FAIL => "probe:__nf_conntrack_alloc",
        source::CT_CONFIRM_DROP => "probe:__nf_conntrack_confirm",
        source::CT_IN_DROP | source::CT_INVALID => "probe:nf_conntrack_in",
        source::CT_HOOK_IN if cause == Cause::ConntrackTableFull => "hook:conntrack_in",
        source::CT_HOOK_CONFIRM if cause == Cause::ConntrackInsertFailed => {
            "hook:conntrack_confirm"
        }
        source::HOOK_NOT_CONNTRACK => "hook:outside_conntrack",
        source::CT_STAT_IN if cause == Cause::ConntrackTableFull => "cpu_counter:drop",
        source::CT_STAT_CONFIRM if cause == Cause::ConntrackInsertFailed => {
            "cpu_counter:insert_failed"
        }
        source::CT_STAT_INVALID if cause == Cause::ConntrackInvalid => "cpu_counter:invalid",
        source::CT_STAT_NONE => "cpu_counter:unchanged",
        source::INFERRED_BY_BUDGET => "inferred:drop_counter",
        _ if cause == Cause::ConntrackTableFull => "inferred:table_fill",
        _ => "drop_reason",
    }
}

pub struct Classifier {
    /// This kernel's value of SKB_DROP_REASON_NETFILTER_DROP.
    pub netfilter_drop: Option<u32>,
    /// This kernel's SKB_DROP_REASON_NOT_SPECIFIED when the kernel side
    /// looks at `nf_reinject`'s frees (`FilterConfig::reinject_reason`):
    /// a conntrack source on such a free is conntrack's drop after an
    /// NFQUEUE verdict.
    pub reinject: Option<u32>,
    /// Conntrack probes are attached: table fill is no longer evidence.
    pub probes: bool,
}

/// What the classifier looks at. A ring record has it, and so has a count
/// group key (namespace, reason, protocol, ICMP type, conntrack reference):
/// count mode classifies its groups without a made-up record.
#[derive(Clone, Copy, Debug)]
pub struct Facts {
    /// Which program saw the drop (`tracer_common::source`).
    pub source: u8,
    pub reason: u32,
    /// IP protocol, when the packet was parsed that far.
    pub proto: Option<u8>,
    /// ICMP (v4 or v6) type and code.
    pub icmp: Option<(u8, u8)>,
    /// The packet had a conntrack entry attached.
    pub has_ct: bool,
    pub fill: Option<CtFill>,
}

impl Facts {
    pub fn of(ev: &DropEvent) -> Facts {
        Facts {
            source: ev.source,
            reason: ev.reason,
            proto: ev.flow.as_ref().map(|f| f.proto),
            icmp: ev.icmp.as_ref().map(|i| (i.ty, i.code)),
            has_ct: ev.ct.is_some(),
            fill: ev.ct_fill,
        }
    }

    /// A count group, with its namespace's table fill when it was read.
    pub fn of_group(g: &GroupKey, fill: Option<CtFill>) -> Facts {
        let is_icmp = g.l4_proto == 1 || g.l4_proto == 58;
        Facts {
            // Count mode counts at kfree_skb only.
            source: source::KFREE_SKB,
            reason: g.reason,
            proto: (g.l4_proto != 0).then_some(g.l4_proto),
            icmp: is_icmp.then_some((g.icmp_type, g.icmp_code)),
            has_ct: g.has_ct != 0,
            fill,
        }
    }
}

impl Classifier {
    pub fn classify(&self, ev: &DropEvent) -> Cause {
        self.classify_facts(&Facts::of(ev))
    }

    /// A count group's cause, as one of its records would have been given.
    pub fn classify_group(&self, g: &GroupKey, fill: Option<CtFill>) -> Cause {
        self.classify_facts(&Facts::of_group(g, fill))
    }

    pub fn classify_facts(&self, ev: &Facts) -> Cause {
        match ev.source {
            source::CT_ALLOC_FAIL => return Cause::ConntrackTableFull,
            source::CT_CONFIRM_DROP => return Cause::ConntrackInsertFailed,
            // nf_conntrack_in itself refused the packet (not for lack of room).
            source::CT_IN_DROP => return Cause::ConntrackInvalid,
            // Conntrack let it through without an entry; a rule then
            // dropped it (`--ctstate INVALID -j DROP`).
            source::CT_INVALID if Some(ev.reason) == self.netfilter_drop => {
                return Cause::ConntrackInvalid
            }
            _ => {}
        }
        if Some(ev.reason) == self.netfilter_drop
            || (self.reinject.is_some() && Some(ev.reason) == self.reinject)
        {
            if let Some(cause) = decided_conntrack(ev.source) {
                return cause;
            }
        }
        if Some(ev.reason) != self.netfilter_drop {
            return Cause::Other;
        }
        if is_pmtu_icmp_error(ev) {
            return Cause::IcmpErrorBlocked;
        }
        // A packet that never got an entry, in a namespace whose table is at
        // its limit: the allocation failed. This inference is only used on
        // the tracepoint tier (with conntrack probes attached, a real
        // allocation failure arrives as CT_ALLOC_FAIL above); the collector
        // cross-checks it with the `drop` counter.
        let no_entry = !ev.has_ct;
        // Hook marks covered the packet and it carried none: conntrack's
        // hooks did not drop it, whatever the counters did meanwhile.
        if !self.probes && no_entry && !decided_not_conntrack(ev.source) {
            if let Some(fill) = ev.fill {
                // The namespace's own drop counter is the better witness;
                // the table fill only stands in when there is no history.
                let counted = fill.counted_drop.unwrap_or_else(|| fill.full());
                if counted {
                    return Cause::ConntrackTableFull;
                }
            }
        }
        Cause::NetfilterRule
    }
}

/// The conntrack cause that hook marks or conntrack's own per-CPU counters
/// pinned on a netfilter drop, in the kernel.
pub fn decided_conntrack(src: u8) -> Option<Cause> {
    match src {
        // Dropped between ctdrop's marks around nf_conntrack_in, or
        // conntrack's `drop` counter rose alone: it refused the packet for
        // want of an entry (see kernel/nfhook.rs for the one rarer case
        // the mark also covers).
        source::CT_HOOK_IN | source::CT_STAT_IN => Some(Cause::ConntrackTableFull),
        source::CT_HOOK_CONFIRM | source::CT_STAT_CONFIRM => Some(Cause::ConntrackInsertFailed),
        // `drop` and `invalid` rose: an l4 tracker's `-NF_DROP`.
        source::CT_STAT_INVALID => Some(Cause::ConntrackInvalid),
        _ => None,
    }
}

/// A drop that hook marks or conntrack's counters show conntrack did not
/// make: the table fill must not overrule them.
pub fn decided_not_conntrack(src: u8) -> bool {
    matches!(src, source::HOOK_NOT_CONNTRACK | source::CT_STAT_NONE)
}

/// The kernel told, one way or the other: nothing for the totals to decide.
pub fn decided_in_kernel(src: u8) -> bool {
    decided_conntrack(src).is_some() || decided_not_conntrack(src)
}

fn is_pmtu_icmp_error(ev: &Facts) -> bool {
    let (Some(proto), Some((ty, code))) = (ev.proto, ev.icmp) else {
        return false;
    };
    (proto == 1 && ty == 3 && code == 4) || (proto == 58 && ty == 2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{CtFill, CtRef, Flow, Icmp};

    const NF: u32 = 12;

    fn ev(reason: u32) -> DropEvent {
        DropEvent {
            ts_ns: 0,
            cpu: 0,
            reason,
            location: 0,
            skb: 0,
            source: source::KFREE_SKB,
            netns: Some(1),
            ifindex: Some(2),
            skb_len: 84,
            flow: Some(Flow {
                src: "198.18.0.1".parse().unwrap(),
                dst: "198.18.0.2".parse().unwrap(),
                proto: 17,
                ports: Some((1, 2)),
            }),
            icmp: None,
            ct: None,
            ct_fill: None,
            truncated: false,
            header: None,
        }
    }

    fn c() -> Classifier {
        Classifier {
            netfilter_drop: Some(NF),
            reinject: None,
            probes: false,
        }
    }

    /// A sampled fill of a 64-entry table.
    fn fill(count: u64, counted_drop: Option<bool>) -> Option<CtFill> {
        Some(CtFill {
            count,
            max: 64,
            sampled: true,
            counted_drop,
        })
    }

    /// NOT_SPECIFIED on this kernel: how `nf_reinject` frees a packet a
    /// hook dropped after an NFQUEUE verdict.
    const NOT_SPECIFIED: u32 = 2;

    #[test]
    fn a_conntrack_source_on_a_reinject_free_is_conntracks_drop_only_where_looked_for() {
        let mut e = ev(NOT_SPECIFIED);
        e.source = source::CT_STAT_CONFIRM;
        let looked = Classifier {
            reinject: Some(NOT_SPECIFIED),
            ..c()
        };
        assert_eq!(looked.classify(&e), Cause::ConntrackInsertFailed);
        e.source = source::CT_HOOK_CONFIRM;
        assert_eq!(looked.classify(&e), Cause::ConntrackInsertFailed);
        // Not looked for (count mode, `ctdrop check`): a plain drop.
        assert_eq!(c().classify(&e), Cause::Other);
        // No conntrack source: another NOT_SPECIFIED free (--all-reasons).
        e.source = source::KFREE_SKB;
        assert_eq!(looked.classify(&e), Cause::Other);
    }

    #[test]
    fn no_entry_in_full_table_is_table_full() {
        let mut e = ev(NF);
        e.ct_fill = fill(64, None);
        assert_eq!(c().classify(&e), Cause::ConntrackTableFull);
    }

    #[test]
    fn no_entry_with_room_is_a_rule() {
        let mut e = ev(NF);
        e.ct_fill = fill(10, None);
        assert_eq!(c().classify(&e), Cause::NetfilterRule);
        e.ct_fill = None;
        assert_eq!(c().classify(&e), Cause::NetfilterRule);
    }

    #[test]
    fn entry_attached_is_a_rule_even_when_full() {
        let mut e = ev(NF);
        e.ct = Some(CtRef {
            info: 2,
            status: Some(0),
            zone: 0,
        });
        e.ct_fill = fill(64, None);
        assert_eq!(c().classify(&e), Cause::NetfilterRule);
    }

    #[test]
    fn with_probes_a_full_table_alone_is_not_table_full() {
        let mut e = ev(NF);
        e.ct_fill = fill(64, None);
        let c = Classifier {
            netfilter_drop: Some(NF),
            reinject: None,
            probes: true,
        };
        assert_eq!(c.classify(&e), Cause::NetfilterRule);
    }

    #[test]
    fn the_drop_counter_outranks_the_table_fill() {
        let mut e = ev(NF);
        // Table flushed right after the drop: fill says room, counter says counted.
        e.ct_fill = fill(0, Some(true));
        assert_eq!(c().classify(&e), Cause::ConntrackTableFull);
        // Table full but the counter did not move: a rule dropped it.
        e.ct_fill = fill(64, Some(false));
        assert_eq!(c().classify(&e), Cause::NetfilterRule);
    }

    #[test]
    fn other_reasons_stay_other() {
        assert_eq!(c().classify(&ev(2)), Cause::Other);
        assert_eq!(
            Classifier {
                netfilter_drop: None,
                reinject: None,
                probes: false
            }
            .classify(&ev(NF)),
            Cause::Other
        );
    }

    #[test]
    fn probe_sources_win() {
        let mut e = ev(0);
        e.source = source::CT_ALLOC_FAIL;
        assert_eq!(c().classify(&e), Cause::ConntrackTableFull);
        e.source = source::CT_CONFIRM_DROP;
        assert_eq!(c().classify(&e), Cause::ConntrackInsertFailed);
        e.source = source::CT_IN_DROP;
        assert_eq!(c().classify(&e), Cause::ConntrackInvalid);
        e.source = source::CT_INVALID;
        e.reason = NF;
        assert_eq!(c().classify(&e), Cause::ConntrackInvalid);
        e.reason = 2;
        assert_eq!(c().classify(&e), Cause::Other);
    }

    #[test]
    fn hook_marks_decide_without_the_counters() {
        let mut e = ev(NF);
        // Counters say "counted", but the packet left conntrack's hook alive.
        e.ct_fill = fill(64, Some(true));
        e.source = source::HOOK_NOT_CONNTRACK;
        assert_eq!(c().classify(&e), Cause::NetfilterRule);
        assert_eq!(
            evidence(e.source, Cause::NetfilterRule),
            "hook:outside_conntrack"
        );
        // Counters say "not counted", but it was dropped inside the hook.
        e.ct_fill = fill(64, Some(false));
        e.source = source::CT_HOOK_IN;
        assert_eq!(c().classify(&e), Cause::ConntrackTableFull);
        assert_eq!(
            evidence(e.source, Cause::ConntrackTableFull),
            "hook:conntrack_in"
        );
        e.source = source::CT_HOOK_CONFIRM;
        assert_eq!(c().classify(&e), Cause::ConntrackInsertFailed);
        assert_eq!(
            evidence(e.source, Cause::ConntrackInsertFailed),
            "hook:conntrack_confirm"
        );
        // A stale mark leaves it to the counters.
        e.source = source::CT_HOOK_STALE;
        e.ct_fill = fill(64, Some(true));
        assert_eq!(c().classify(&e), Cause::ConntrackTableFull);
    }

    #[test]
    fn per_cpu_counters_decide_without_the_table_fill() {
        let mut e = ev(NF);
        // The table is full, but the counter did not move: a rule.
        e.ct_fill = fill(64, Some(true));
        e.source = source::CT_STAT_NONE;
        assert_eq!(c().classify(&e), Cause::NetfilterRule);
        assert_eq!(
            evidence(e.source, Cause::NetfilterRule),
            "cpu_counter:unchanged"
        );
        // The table looks free, but `drop` rose: conntrack refused it.
        e.ct_fill = fill(0, Some(false));
        for (src, cause, said) in [
            (
                source::CT_STAT_IN,
                Cause::ConntrackTableFull,
                "cpu_counter:drop",
            ),
            (
                source::CT_STAT_CONFIRM,
                Cause::ConntrackInsertFailed,
                "cpu_counter:insert_failed",
            ),
            (
                source::CT_STAT_INVALID,
                Cause::ConntrackInvalid,
                "cpu_counter:invalid",
            ),
        ] {
            e.source = src;
            assert_eq!(c().classify(&e), cause);
            assert_eq!(evidence(src, cause), said);
        }
        // Unseen: the totals and the fill decide.
        e.source = source::CT_STAT_UNSEEN;
        e.ct_fill = fill(64, Some(true));
        assert_eq!(c().classify(&e), Cause::ConntrackTableFull);
    }

    #[test]
    fn blocked_pmtu_errors_are_named() {
        let mut e = ev(NF);
        e.flow.as_mut().unwrap().proto = 1;
        e.icmp = Some(Icmp {
            ty: 3,
            code: 4,
            echo: None,
        });
        assert_eq!(c().classify(&e), Cause::IcmpErrorBlocked);
        e.icmp = Some(Icmp {
            ty: 3,
            code: 3,
            echo: None,
        });
        assert_eq!(c().classify(&e), Cause::NetfilterRule);
    }

    /// Count mode classifies a group key, not a record: every kind of
    /// kfree_skb record must get the cause its group gets.
    #[test]
    fn a_count_group_gets_the_cause_of_its_records() {
        let full = fill(64, None);
        let room = fill(3, Some(false));
        let mut seen = std::collections::BTreeSet::new();
        for reason in [NF, 2] {
            for (proto, icmp) in [
                (17, None),
                (6, None),
                (1, Some((3, 4))),
                (1, Some((8, 0))),
                (58, Some((2, 0))),
                (0, None),
            ] {
                for has_ct in [false, true] {
                    for fill in [None, full, room] {
                        let mut e = ev(reason);
                        match proto {
                            0 => e.flow = None,
                            p => e.flow.as_mut().unwrap().proto = p,
                        }
                        e.icmp = icmp.map(|(ty, code)| Icmp {
                            ty,
                            code,
                            echo: None,
                        });
                        e.ct = has_ct.then_some(CtRef {
                            info: 0,
                            status: None,
                            zone: 0,
                        });
                        e.ct_fill = fill;
                        let (ty, code) = icmp.unwrap_or((0, 0));
                        let g = GroupKey {
                            netns: 1,
                            reason,
                            l4_proto: proto,
                            has_ct: has_ct as u8,
                            icmp_type: ty,
                            icmp_code: code,
                        };
                        let cause = c().classify(&e);
                        assert_eq!(c().classify_group(&g, fill), cause, "{e:?}");
                        seen.insert(cause);
                    }
                }
            }
        }
        // The cases above reach every cause a kfree_skb record can get.
        assert_eq!(seen.len(), 4, "{seen:?}");
    }

    #[test]
    fn names_round_trip() {
        for cause in Cause::ALL {
            assert_eq!(Cause::parse(cause.as_str()), Some(cause));
        }
    }
}
