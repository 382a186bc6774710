//! What to advise, from what a run saw in each namespace.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use super::{
    label, Advice, Host, IcmpBlocked, ModuleKind, NsEvidence, Step, CONCENTRATION_MIN, HEADROOM,
    NEAR_FULL, NFT_TABLE, NOTRACK_MAX_RULES, NOTRACK_MIN_SHARE, ONE_SOURCE_SHARE, SOURCE_RATE,
};
use crate::{
    cause::Cause,
    conntrack::{occupancy::Occupancy, stats::CtLimits},
    flows::{cause_index, Tally},
};

/// Where the pressure comes from: one source, or many to one port.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Concentration {
    /// `n` of `of` entries (`entries`, from a snapshot) or turned-away
    /// packets; `unreplied`: of its entries, those never answered.
    Source {
        addr: IpAddr,
        n: u64,
        of: u64,
        entries: bool,
        unreplied: u64,
    },
    Port {
        proto: u8,
        port: u16,
        n: u64,
        of: u64,
        sources: u64,
        entries: bool,
        unreplied: u64,
    },
}

impl Concentration {
    /// Entries the flood holds: its never-answered ones (known from a
    /// snapshot only). Answered ones are someone's real connections, e.g.
    /// a proxy's, and stay demand.
    fn flood_entries(&self) -> u64 {
        match self {
            Concentration::Source { unreplied, .. } | Concentration::Port { unreplied, .. } => {
                *unreplied
            }
        }
    }
}

fn concentration(e: &NsEvidence) -> Option<Concentration> {
    let share =
        |n: u64, of: u64| of >= CONCENTRATION_MIN && n as f64 >= of as f64 * ONE_SOURCE_SHARE;
    if let Some(o) = e.occupancy {
        if let Some(s) = o
            .top_sources
            .first()
            .filter(|s| share(s.entries, o.entries))
        {
            return Some(Concentration::Source {
                addr: s.addr,
                n: s.entries,
                of: o.entries,
                entries: true,
                unreplied: s.unreplied,
            });
        }
        // Many sources to one port is a flood only when mostly unanswered:
        // a busy service's answered connections are its real load.
        if let Some(p) = o
            .top_dst_ports
            .first()
            .filter(|p| share(p.entries, o.entries) && p.unreplied * 2 >= p.entries)
        {
            return Some(Concentration::Port {
                proto: p.proto_num(),
                port: p.port,
                n: p.entries,
                of: o.entries,
                sources: p.sources,
                entries: true,
                unreplied: p.unreplied,
            });
        }
    }
    let drops: u64 = e.table_full_drops;
    if let Some((a, n)) = e.drop_sources.first().filter(|(_, n)| share(*n, drops)) {
        return Some(Concentration::Source {
            addr: *a,
            n: *n,
            of: drops,
            entries: false,
            unreplied: 0,
        });
    }
    // Drops to one port from many sources look alike for a flood and for
    // a busy service's growth: only a snapshot (unanswered entries) tells.
    None
}

/// Whether the table was ever close enough to full for capacity or
/// NOTRACK advice.
fn near_full(e: &NsEvidence) -> bool {
    if e.table_full_drops > 0 {
        return true;
    }
    let seen = e
        .peak_entries
        .max(e.occupancy.map(|o| o.entries).unwrap_or(0));
    match e.limits.map(|l| l.max) {
        Some(max) if max > 0 => seen as f64 >= max as f64 * NEAR_FULL,
        _ => true,
    }
}

pub(super) fn bytes_human(n: u64) -> String {
    match n {
        n if n >= 10 << 20 => format!("{} MiB", n >> 20),
        n if n >= 10 << 10 => format!("{} KiB", n >> 10),
        n => format!("{n} bytes"),
    }
}

/// The `nf_conntrack_max` that holds `peak` with headroom.
pub fn max_for_peak(peak: u64) -> u64 {
    ((peak.max(1) as f64 * HEADROOM).ceil() as u64).next_power_of_two()
}

/// One bucket per entry, as current kernels size the hash by default:
/// chains stay short and a bucket costs 8 bytes against an entry's ~300.
pub fn hashsize_for_max(max: u64) -> u64 {
    max
}

/// Everything to say about one namespace.
pub fn for_namespace(e: &NsEvidence, host: &Host) -> Vec<Advice> {
    let mut out = Vec::new();
    let pressure = near_full(e);
    if !pressure && e.occupancy.is_some() {
        out.push(headroom(e));
    }
    let conc = if pressure { concentration(e) } else { None };
    // Limit a flood at its origin first: raising the limit only feeds it.
    if let Some(c) = &conc {
        out.push(limit_origin(e, c));
    }
    if pressure && (e.table_full_drops > 0 || e.occupancy.is_some()) {
        out.push(capacity(e, host, conc.as_ref()));
    }
    if let Some(o) = e.occupancy {
        if o.nat_rules == Some(true) || o.nat > 0 {
            out.push(nat(e, o));
        }
        if pressure {
            if let Some(a) = notrack(e, o) {
                out.push(a);
            }
        }
    }
    if e.insert_failed > 0 {
        out.push(insert_clash(e));
    }
    out
}

/// A namespace that was never near full: say so, and why nothing is advised.
fn headroom(e: &NsEvidence) -> Advice {
    let seen = e
        .peak_entries
        .max(e.occupancy.map(|o| o.entries).unwrap_or(0));
    let max = e.limits.map(|l| l.max).unwrap_or(0);
    Advice {
        cause: Cause::ConntrackTableFull.as_str(),
        topic: "headroom",
        netns: e.netns,
        netns_name: e.netns_name.clone(),
        headline: format!(
            "the table held {seen} of {max} entries ({:.0}%) and turned nothing away: nothing to change (capacity and NOTRACK advice start at {:.0}% of nf_conntrack_max)",
            seen as f64 * 100.0 / max.max(1) as f64,
            NEAR_FULL * 100.0
        ),
        notes: Vec::new(),
        steps: Vec::new(),
        values: serde_json::json!({ "observed_entries": seen, "current_max": max, "near_full_share": NEAR_FULL }),
    }
}

/// One source, or many sources to one port, fill the table: limit that
/// (exact rules), or find the client, before raising any limit.
fn limit_origin(e: &NsEvidence, c: &Concentration) -> Advice {
    let max = e.limits.map(|l| l.max).unwrap_or(0);
    // One source may hold a tenth of the table (at least 16 entries).
    let per_source = (max / 10).max(16);
    let what = |n: u64, of: u64, entries: bool| {
        format!(
            "{} of {of} {} ({:.0}%)",
            n,
            if entries {
                "entries"
            } else {
                "turned-away packets"
            },
            n as f64 * 100.0 / of.max(1) as f64
        )
    };
    let mut notes = Vec::new();
    let mut steps = Vec::new();
    let (headline, values) = match c {
        Concentration::Source {
            addr,
            n,
            of,
            entries,
            ..
        } => {
            let a = addr.to_string();
            let ipt = if addr.is_ipv6() {
                "ip6tables"
            } else {
                "iptables"
            };
            steps.push(new_flow_limit(ipt, &["-s", &a], "ctdrop_src"));
            steps.push(Step::run(
                &[
                    ipt,
                    "-I",
                    "INPUT",
                    "-s",
                    &a,
                    "-m",
                    "connlimit",
                    "--connlimit-above",
                    &per_source.to_string(),
                    "--connlimit-mask",
                    if addr.is_ipv6() { "128" } else { "32" },
                    "-j",
                    "DROP",
                ],
                true,
            ));
            steps.push(Step::run(&["conntrack", "-D", "-s", &a], true));
            notes.push(format!("or find the client: on {a}, which program opens these flows (ss -tunap); a client in a retry loop, a scanner or a misconfigured health check is fixed at its source."));
            notes.push(format!("the rules drop {a}'s new flows beyond {SOURCE_RATE} a second and beyond {per_source} held at once (a tenth of nf_conntrack_max); packets dropped there free their entry at once. Use FORWARD instead of INPUT on a router."));
            notes.push("conntrack -D -s removes the entries it already holds.".into());
            (
                format!(
                    "{a} is behind {}: limit or fix that source before raising nf_conntrack_max",
                    what(*n, *of, *entries)
                ),
                serde_json::json!({ "source": a, "share_of": if *entries { "entries" } else { "drops" }, "count": n, "of": of, "rate_per_s": SOURCE_RATE, "connlimit": per_source }),
            )
        }
        Concentration::Port {
            proto,
            port,
            n,
            of,
            sources,
            entries,
            ..
        } => {
            let p = proto_name(*proto);
            let port_s = port.to_string();
            let name = format!("ctdrop_port_{port}");
            steps.push(new_flow_limit(
                "iptables",
                &["-p", &p, "--dport", &port_s],
                &name,
            ));
            notes.push(format!("the rule drops new {p}/{port} flows beyond {SOURCE_RATE} a second per source; if the service is stateless, untracking it (NOTRACK) removes the pressure instead."));
            let from = if *sources > 1 {
                format!(" from {sources} sources")
            } else {
                String::new()
            };
            (
                format!("{p}/{port}{from} is behind {}: limit new flows to it per source before raising nf_conntrack_max", what(*n, *of, *entries)),
                serde_json::json!({ "proto": p, "port": port, "sources": sources, "share_of": if *entries { "entries" } else { "drops" }, "count": n, "of": of, "rate_per_s": SOURCE_RATE }),
            )
        }
    };
    Advice {
        cause: Cause::ConntrackTableFull.as_str(),
        topic: "limit_origin",
        netns: e.netns,
        netns_name: e.netns_name.clone(),
        headline,
        notes,
        steps,
        values,
    }
}

fn proto_name(p: u8) -> String {
    crate::events::decode::proto_name(p)
}

pub(super) fn capacity(e: &NsEvidence, host: &Host, conc: Option<&Concentration>) -> Advice {
    let max = e.limits.map(|l| l.max);
    let buckets = e.limits.map(|l| l.buckets).filter(|b| *b > 0);
    let seen = e
        .peak_entries
        .max(e.occupancy.map(|o| o.entries).unwrap_or(0));
    // Sized from the entries legitimately held: a flood's own entries and
    // its dropped packets are not demand (they are what the limit is for).
    // Without a flood, each flow turned away wanted an entry, counted up to
    // what was held (no extrapolation beyond doubling: measure again).
    let legit = match conc {
        Some(c) => seen.saturating_sub(c.flood_entries()),
        None => seen,
    };
    let peak = if conc.is_some() {
        legit
    } else {
        seen + e.table_full_flows.min(seen.max(1))
    };
    let needed = max_for_peak(peak);
    let recommended = needed.max(max.unwrap_or(0));
    let change =
        max.map(|m| needed > m).unwrap_or(true) || (conc.is_none() && e.table_full_drops > 0);
    let hashsize = hashsize_for_max(recommended);
    let mut notes = Vec::new();
    let headline = if conc.is_some() && !change {
        format!(
            "without the flood the table holds {legit} entries, which nf_conntrack_max {} holds with headroom: do not raise it; {} dropped packets are the flood's, not demand",
            max.unwrap_or(0),
            e.table_full_drops
        )
    } else if conc.is_some_and(|c| c.flood_entries() > 0) {
        format!("without the flood the table still holds {legit} entries: set nf_conntrack_max to {recommended} and hashsize to {hashsize}")
    } else if conc.is_some() {
        format!(
            "limit the flood first; if the table still fills after that, set nf_conntrack_max to {recommended} and hashsize to {hashsize} (the {seen} entries held, with headroom; not sized from the {} dropped packets)",
            e.table_full_drops
        )
    } else if e.table_full_drops > 0 {
        format!(
            "{} packets of {} flows found the table full ({} entries): it needed at least {peak}; set nf_conntrack_max to {recommended} and hashsize to {hashsize}",
            e.table_full_drops, e.table_full_flows, seen
        )
    } else if change {
        format!("the table held {seen} entries, too close to its max: set nf_conntrack_max to {recommended} and hashsize to {hashsize}")
    } else {
        format!("the table holds {seen} entries; nf_conntrack_max {} holds that with headroom (needs {needed})", max.unwrap_or(0))
    };
    notes.push(
        "nf_conntrack_max is global: each namespace counts its own entries against the one limit."
            .to_string(),
    );
    if e.occupancy.is_none() && e.table_full_drops > 0 {
        let ns = e.netns_name.clone().unwrap_or_else(|| "NAME".into());
        notes.push(format!("to see who holds the entries (and which flows to untrack instead): ctdrop check --occupancy --netns {ns}"));
    }
    if let (Some(b), true) = (host.entry_bytes, change) {
        notes.push(format!(
            "{recommended} entries of {b} bytes take up to {} of kernel memory.",
            bytes_human(recommended * b)
        ));
    }
    if let Some(m) = max {
        if m as f64 > buckets.unwrap_or(m) as f64 * 4.0 {
            notes.push(format!(
                "today {m} entries share {} buckets: long hash chains.",
                buckets.unwrap_or(0)
            ));
        }
    }
    let mut steps = Vec::new();
    if change {
        let v = recommended.to_string();
        steps.push(Step::run(
            &[
                "sysctl",
                "-w",
                &format!("net.netfilter.nf_conntrack_max={v}"),
            ],
            false,
        ));
        steps.push(Step::Persist {
            file: "/etc/sysctl.d/90-conntrack.conf".into(),
            line: format!("net.netfilter.nf_conntrack_max = {v}"),
        });
        let h = hashsize.to_string();
        steps.push(Step::run(
            &[
                "sh",
                "-c",
                &format!("echo {h} > /sys/module/nf_conntrack/parameters/hashsize"),
            ],
            false,
        ));
        match host.module {
            ModuleKind::BuiltIn => {
                notes.push(format!("nf_conntrack is built into this kernel: persist the hash size on the kernel command line, nf_conntrack.hashsize={h}."));
            }
            _ => steps.push(Step::Persist {
                file: "/etc/modprobe.d/nf_conntrack.conf".into(),
                line: format!("options nf_conntrack hashsize={h}"),
            }),
        }
    }
    Advice {
        cause: Cause::ConntrackTableFull.as_str(),
        topic: "capacity",
        netns: e.netns,
        netns_name: e.netns_name.clone(),
        headline,
        notes,
        steps,
        values: serde_json::json!({
            "observed_entries": seen, "legit_entries": legit, "turned_away_flows": e.table_full_flows, "observed_peak": peak,
            "current_max": max, "current_buckets": buckets, "recommended_max": recommended,
            "recommended_hashsize": hashsize, "change_needed": change,
        }),
    }
}

fn nat(e: &NsEvidence, o: &Occupancy) -> Advice {
    let mut notes = Vec::new();
    if o.nat > 0 {
        notes.push(format!("{} of {} entries are NAT'd.", o.nat, o.entries));
    }
    if o.nat_rules == Some(true) {
        notes.push("the namespace has NAT rules.".into());
    }
    notes.push("NAT needs conntrack: packets that skip it are not translated. Untrack only flows that are not NAT'd; for the rest raise nf_conntrack_max and hashsize.".into());
    Advice {
        cause: Cause::ConntrackTableFull.as_str(),
        topic: "nat",
        netns: e.netns,
        netns_name: e.netns_name.clone(),
        headline: format!(
            "NAT is in use in {}: conntrack cannot be disabled there",
            label(e.netns, &e.netns_name)
        ),
        notes,
        steps: Vec::new(),
        values: serde_json::json!({ "nat_entries": o.nat, "nat_rules": o.nat_rules }),
    }
}

/// Port groups that are stateless enough to untrack: UDP, or entries that
/// never saw an answer, holding a real share of the table.
pub(super) fn notrack_candidates(o: &Occupancy) -> Vec<&crate::conntrack::occupancy::PortRow> {
    o.top_dst_ports
        .iter()
        .filter(|p| p.entries as f64 >= o.entries as f64 * NOTRACK_MIN_SHARE)
        .filter(|p| p.proto_num() == 17 || (p.assured == 0 && p.unreplied * 2 >= p.entries))
        .take(NOTRACK_MAX_RULES)
        .collect()
}

fn notrack(e: &NsEvidence, o: &Occupancy) -> Option<Advice> {
    let c = notrack_candidates(o);
    if c.is_empty() {
        return None;
    }
    let held: u64 = c.iter().map(|p| p.entries).sum();
    let names: Vec<String> = c
        .iter()
        .map(|p| format!("{} port {}", p.proto, p.port))
        .collect();
    let mut steps = Vec::new();
    for p in &c {
        let (proto, port) = (p.proto.as_str(), p.port.to_string());
        for chain in ["PREROUTING", "OUTPUT"] {
            for dir in ["--dport", "--sport"] {
                steps.push(Step::run(
                    &[
                        "iptables", "-t", "raw", "-A", chain, "-p", proto, dir, &port, "-j",
                        "NOTRACK",
                    ],
                    true,
                ));
            }
        }
    }
    let mut script = format!("table inet {NFT_TABLE} {{\n");
    for (chain, hook) in [("prerouting", "prerouting"), ("output", "output")] {
        script += &format!("  chain {chain} {{\n    type filter hook {hook} priority raw;\n");
        for p in &c {
            script += &format!(
                "    {} dport {} notrack\n    {} sport {} notrack\n",
                p.proto, p.port, p.proto, p.port
            );
        }
        script += "  }\n";
    }
    script += "}\n";
    steps.push(Step::Nft { script });
    for p in &c {
        steps.push(Step::run(
            &[
                "conntrack",
                "-D",
                "-p",
                &p.proto,
                "--orig-port-dst",
                &p.port.to_string(),
            ],
            true,
        ));
    }
    let notes = vec![
        "PREROUTING covers packets that arrive, OUTPUT those this host sends; iptables or nft, not both.".to_string(),
        "untracked packets match --ctstate UNTRACKED, not ESTABLISHED: if INPUT drops by default, accept them, e.g. iptables -I INPUT -p udp --dport PORT -j ACCEPT.".to_string(),
        "entries already in the table stay until they time out; the conntrack -D lines remove them now.".to_string(),
    ];
    Some(Advice {
        cause: Cause::ConntrackTableFull.as_str(),
        topic: "notrack",
        netns: e.netns,
        netns_name: e.netns_name.clone(),
        headline: format!(
            "{} hold {held} of {} entries ({:.0}%): stop tracking them in the raw table",
            names.join(", "),
            o.entries,
            held as f64 * 100.0 / o.entries.max(1) as f64
        ),
        notes,
        steps,
        values: serde_json::json!({
            "ports": c.iter().map(|p| serde_json::json!({"proto": p.proto, "port": p.port, "entries": p.entries, "unreplied": p.unreplied})).collect::<Vec<_>>(),
        }),
    })
}

fn insert_clash(e: &NsEvidence) -> Advice {
    Advice {
        cause: Cause::ConntrackInsertFailed.as_str(),
        topic: "insert_clash",
        netns: e.netns,
        netns_name: e.netns_name.clone(),
        headline: format!("{} packets lost the race to insert their new entry", e.insert_failed),
        notes: vec![
            "two packets of one new flow were handled at once on two CPUs, and the second found the first's entry; typical: DNS A and AAAA queries sent together from one socket through DNAT (Kubernetes services).".into(),
            "UDP clashes are mostly resolved by the kernel (the clashres counter); TCP ones are dropped and retransmitted.".into(),
            "mitigations: `options single-request-reopen` in /etc/resolv.conf (A and AAAA on separate sockets), a node-local DNS cache or DNS over TCP, NOTRACK for DNS where no NAT is needed, a kernel with UDP clash resolution (5.x or later).".into(),
        ],
        steps: Vec::new(),
        values: serde_json::json!({ "insert_failed": e.insert_failed }),
    }
}

/// A warning per namespace where filter rules dropped PMTU ICMP errors.
pub fn for_icmp_blocked(groups: &[IcmpBlocked]) -> Vec<Advice> {
    let mut by_ns: std::collections::BTreeMap<Option<u32>, Vec<&IcmpBlocked>> = Default::default();
    for g in groups {
        by_ns.entry(g.netns).or_default().push(g);
    }
    by_ns
        .into_values()
        .map(|gs| {
            let drops: u64 = gs.iter().map(|g| g.drops).sum();
            let pairs: Vec<String> = gs
                .iter()
                .take(3)
                .map(|g| format!("{} -> {}", g.src.map(|a| a.to_string()).unwrap_or_else(|| "?".into()), g.dst.map(|a| a.to_string()).unwrap_or_else(|| "?".into())))
                .collect();
            Advice {
                cause: Cause::IcmpErrorBlocked.as_str(),
                topic: "icmp_error_blocked",
                netns: gs[0].netns,
                netns_name: gs[0].netns_name.clone(),
                headline: format!("{drops} ICMP fragmentation-needed / packet-too-big errors dropped by a filter rule: path-MTU discovery is broken"),
                notes: vec![
                    format!("from {}.", pairs.join(", ")),
                    "small packets pass but large ones stall: the sender never learns to send smaller ones (TCP transfers hang after the handshake).".into(),
                    "allow these errors before the rule that drops ICMP (FORWARD too on a router); in nft: icmp type destination-unreachable icmp code frag-needed accept, icmpv6 type packet-too-big accept.".into(),
                ],
                steps: vec![
                    Step::run(&["iptables", "-I", "INPUT", "-p", "icmp", "--icmp-type", "fragmentation-needed", "-j", "ACCEPT"], true),
                    Step::run(&["ip6tables", "-I", "INPUT", "-p", "icmpv6", "--icmpv6-type", "packet-too-big", "-j", "ACCEPT"], true),
                ],
                values: serde_json::json!({ "drops": drops }),
            }
        })
        .collect()
}

type PairKey = (Option<u32>, Option<IpAddr>, Option<IpAddr>);

/// All advice for a tracing run: per namespace that turned packets away or
/// was snapshotted, then the PMTU warnings. `name_of` names a namespace.
pub fn from_run(
    tally: &Tally,
    snapshots: &BTreeMap<u32, Occupancy>,
    limits: Option<CtLimits>,
    host: &Host,
    mut name_of: impl FnMut(u32) -> Option<String>,
) -> Vec<Advice> {
    let full = cause_index(Cause::ConntrackTableFull);
    let mut nss: BTreeSet<u32> = snapshots.keys().copied().collect();
    for (ns, t) in &tally.by_netns {
        if let Some(ns) = ns {
            if t.by_cause[full] + t.by_cause[cause_index(Cause::ConntrackInsertFailed)] > 0 {
                nss.insert(*ns);
            }
        }
    }
    let mut out = Vec::new();
    for ns in nss {
        let table_full_drops = tally.count_in(ns, Cause::ConntrackTableFull);
        let occupancy = snapshots.get(&ns);
        let mut by_src: BTreeMap<IpAddr, u64> = BTreeMap::new();
        for (id, st) in tally
            .flows()
            .filter(|(id, s)| id.netns == Some(ns) && s.by_cause[full] > 0)
        {
            if let Some(a) = id.src {
                *by_src.entry(a).or_default() += st.by_cause[full];
            }
        }
        let mut drop_sources: Vec<(IpAddr, u64)> = by_src.into_iter().collect();
        drop_sources.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        drop_sources.truncate(3);
        let ev = NsEvidence {
            netns: Some(ns),
            netns_name: occupancy
                .and_then(|o| o.netns_name.clone())
                .or_else(|| name_of(ns)),
            table_full_drops,
            table_full_flows: tally
                .flows()
                .filter(|(id, s)| id.netns == Some(ns) && s.by_cause[full] > 0)
                .count() as u64,
            insert_failed: tally.count_in(ns, Cause::ConntrackInsertFailed),
            // A table-full drop means the count stood at the max.
            peak_entries: if table_full_drops > 0 {
                limits.map(|l| l.max).unwrap_or(0)
            } else {
                0
            },
            occupancy,
            limits,
            drop_sources,
        };
        out.extend(for_namespace(&ev, host));
    }
    let blocked = cause_index(Cause::IcmpErrorBlocked);
    // (netns, src, dst) -> drops
    let mut icmp: BTreeMap<PairKey, u64> = BTreeMap::new();
    for (id, s) in tally.flows() {
        if s.by_cause[blocked] > 0 {
            *icmp.entry((id.netns, id.src, id.dst)).or_default() += s.by_cause[blocked];
        }
    }
    let groups: Vec<IcmpBlocked> = icmp
        .into_iter()
        .map(|((netns, src, dst), drops)| IcmpBlocked {
            netns,
            netns_name: netns.and_then(&mut name_of),
            src,
            dst,
            drops,
        })
        .collect();
    out.extend(for_icmp_blocked(&groups));
    out
}

/// `ipt -I INPUT <matches> ...`: drops each source's new flows beyond
/// [`SOURCE_RATE`] a second (burst twice that), counted in hashlimit table
/// `name`. The one shape of both the per-source and the per-port advice.
fn new_flow_limit(ipt: &str, matches: &[&str], name: &str) -> Step {
    let rate = format!("{SOURCE_RATE}/sec");
    let burst = (SOURCE_RATE * 2).to_string();
    let mut argv = vec![ipt, "-I", "INPUT"];
    argv.extend_from_slice(matches);
    argv.extend_from_slice(&[
        "-m",
        "conntrack",
        "--ctstate",
        "NEW",
        "-m",
        "hashlimit",
        "--hashlimit-above",
        &rate,
        "--hashlimit-burst",
        &burst,
        "--hashlimit-mode",
        "srcip",
        "--hashlimit-name",
        name,
        "-j",
        "DROP",
    ]);
    Step::run(&argv, true)
}
