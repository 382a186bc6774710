//! What to change, with numbers, from what a run saw: a bigger table and
//! hash for `conntrack_table_full`, NOTRACK rules for the stateless flows
//! that fill it, what insert clashes mean, and a warning when filter rules
//! drop the ICMP errors path-MTU discovery needs. Advice is only ever
//! printed: ctdrop never changes a host's rules or sysctls by itself.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::Write,
    net::IpAddr,
};

use serde::Serialize;

use crate::{
    cause::Cause,
    conntrack::{occupancy::Occupancy, stats::CtLimits},
    flows::{cause_index, Tally},
};

/// Headroom over the observed peak: a quarter more, then the next power of
/// two (the sizes operators and the kernel's own defaults use).
const HEADROOM: f64 = 1.25;
/// A port group must hold this share of the table to be worth untracking.
const NOTRACK_MIN_SHARE: f64 = 0.10;
const NOTRACK_MAX_RULES: usize = 3;
/// A namespace whose table never held this share of `nf_conntrack_max`
/// (and turned nothing away) gets no capacity and no NOTRACK advice:
/// there is no pressure to relieve.
pub const NEAR_FULL: f64 = 0.80;
/// One source (or one port) holding this share of the entries, or sending
/// this share of the turned-away packets, is a flood to limit at its
/// origin before any limit is raised.
pub const ONE_SOURCE_SHARE: f64 = 0.50;
/// Fewer entries or drops than this say nothing about concentration.
const CONCENTRATION_MIN: u64 = 8;
/// New flows per second one source may open before the advised hashlimit
/// rule drops the rest (a start; tune to the source's legitimate rate).
const SOURCE_RATE: u32 = 50;
/// Name of the nft table the advised NOTRACK rules live in.
pub const NFT_TABLE: &str = "ctdrop_notrack";

/// What a run saw in one namespace.
#[derive(Clone, Debug, Default)]
pub struct NsEvidence<'a> {
    pub netns: Option<u32>,
    pub netns_name: Option<String>,
    pub table_full_drops: u64,
    /// Distinct flows that found no room: each wanted one more entry.
    pub table_full_flows: u64,
    pub insert_failed: u64,
    /// Highest entry count seen (a full table counts as `max`).
    pub peak_entries: u64,
    pub occupancy: Option<&'a Occupancy>,
    pub limits: Option<CtLimits>,
    /// Sources of the table-full drops, most first (from the drop records).
    pub drop_sources: Vec<(IpAddr, u64)>,
}

/// Where the pressure comes from: one source, or many to one port.
#[derive(Clone, Debug, PartialEq)]
enum Concentration {
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
                proto: p.proto_num,
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

/// ICMP errors for path-MTU discovery that a filter rule dropped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IcmpBlocked {
    pub netns: Option<u32>,
    pub netns_name: Option<String>,
    pub src: Option<IpAddr>,
    pub dst: Option<IpAddr>,
    pub drops: u64,
}

/// One step an operator takes; `Run` steps are exact command lines.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Step {
    /// A command to run (inside the namespace, for per-namespace ones).
    Run { argv: Vec<String>, in_netns: bool },
    /// A line to put in a file, to survive a reboot.
    Persist { file: String, line: String },
    /// An nft script (`nft -f FILE`).
    Nft { script: String },
}

impl Step {
    fn run(argv: &[&str], in_netns: bool) -> Step {
        Step::Run {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            in_netns,
        }
    }

    /// The command as an operator pastes it into a shell.
    pub fn command_line(&self) -> Option<String> {
        match self {
            Step::Run { argv, .. } => Some(
                argv.iter()
                    .map(|a| shell_quote(a))
                    .collect::<Vec<_>>()
                    .join(" "),
            ),
            _ => None,
        }
    }
}

fn shell_quote(a: &str) -> String {
    let plain = !a.is_empty()
        && a.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_./=:,+-@%".contains(&b));
    if plain {
        a.to_string()
    } else {
        format!("'{}'", a.replace('\'', "'\\''"))
    }
}

fn bytes_human(n: u64) -> String {
    match n {
        n if n >= 10 << 20 => format!("{} MiB", n >> 20),
        n if n >= 10 << 10 => format!("{} KiB", n >> 10),
        n => format!("{n} bytes"),
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Advice {
    /// The cause this answers (`Cause::as_str`), or `conntrack_table_full`
    /// for both the capacity and the NOTRACK items.
    pub cause: &'static str,
    /// capacity | notrack | nat | insert_clash | icmp_error_blocked
    pub topic: &'static str,
    pub netns: Option<u32>,
    pub netns_name: Option<String>,
    pub headline: String,
    pub notes: Vec<String>,
    pub steps: Vec<Step>,
    /// The numbers behind the advice, for tools.
    pub values: serde_json::Value,
}

/// How nf_conntrack sits in this kernel: that decides where hashsize goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModuleKind {
    Loadable,
    BuiltIn,
    Unknown,
}

impl ModuleKind {
    /// A loadable module has `initstate` in sysfs; built-in ones do not.
    pub fn detect() -> ModuleKind {
        let m = std::path::Path::new("/sys/module/nf_conntrack");
        if m.join("initstate").exists() {
            ModuleKind::Loadable
        } else if m.exists() {
            ModuleKind::BuiltIn
        } else {
            ModuleKind::Unknown
        }
    }
}

/// Host facts advice depends on, read once.
#[derive(Clone, Copy, Debug)]
pub struct Host {
    pub module: ModuleKind,
    /// Bytes per entry in the kernel's slab cache, when readable.
    pub entry_bytes: Option<u64>,
}

impl Host {
    pub fn detect() -> Host {
        Host {
            module: ModuleKind::detect(),
            entry_bytes: slab_entry_bytes(),
        }
    }
}

fn slab_entry_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/slabinfo").ok()?;
    let l = s
        .lines()
        .find(|l| l.split_whitespace().next() == Some("nf_conntrack"))?;
    l.split_whitespace().nth(3)?.parse().ok()
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

fn label(netns: Option<u32>, name: &Option<String>) -> String {
    crate::conntrack::netns::label(netns, name.as_deref())
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

fn capacity(e: &NsEvidence, host: &Host, conc: Option<&Concentration>) -> Advice {
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
fn notrack_candidates(o: &Occupancy) -> Vec<&crate::conntrack::occupancy::PortRow> {
    o.top_dst_ports
        .iter()
        .filter(|p| p.entries as f64 >= o.entries as f64 * NOTRACK_MIN_SHARE)
        .filter(|p| p.proto_num == 17 || (p.assured == 0 && p.unreplied * 2 >= p.entries))
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

/// Word-wraps `text` to `width` columns after `indent`.
fn wrap(text: &str, indent: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut cur = String::from(indent);
    for w in text.split_whitespace() {
        if cur.len() > indent.len() && cur.len() + 1 + w.len() > width {
            lines.push(std::mem::replace(&mut cur, String::from(indent)));
        }
        if cur.len() > indent.len() {
            cur.push(' ');
        }
        cur.push_str(w);
    }
    if cur.len() > indent.len() {
        lines.push(cur);
    }
    lines
}

/// `    $ cmd`, continued with ` \` on lines of at most `width` columns
/// (still pastes into a shell as one command).
fn wrap_command(cmd: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    // Words as the shell sees them: never break inside single quotes.
    let mut words: Vec<String> = Vec::new();
    let mut quoted = false;
    for w in cmd.split(' ') {
        match words.last_mut() {
            Some(last) if quoted => {
                last.push(' ');
                last.push_str(w);
            }
            _ => words.push(w.to_string()),
        }
        quoted ^= w.matches('\'').count() % 2 == 1;
    }
    let mut cur = String::from("    $");
    for w in &words {
        if cur.len() > 6 && cur.len() + 1 + w.len() + 2 > width {
            cur.push_str(" \\");
            lines.push(std::mem::replace(&mut cur, String::from("       ")));
        }
        cur.push(' ');
        cur.push_str(w);
    }
    lines.push(cur);
    lines
}

/// Human rendering, readable at 80 columns.
pub fn write_human(advice: &[Advice], out: &mut dyn Write) -> std::io::Result<()> {
    if advice.is_empty() {
        return Ok(());
    }
    writeln!(out, "advice (ctdrop changes nothing itself):")?;
    for a in advice {
        let head = format!(
            "[{}] {}: {}",
            a.topic,
            label(a.netns, &a.netns_name),
            a.headline
        );
        for (i, l) in wrap(&head, "  ", 80).into_iter().enumerate() {
            writeln!(out, "{}{}", if i == 0 { "" } else { "  " }, l)?;
        }
        for n in &a.notes {
            let lines = wrap(n, "      ", 80);
            for (i, l) in lines.into_iter().enumerate() {
                if i == 0 {
                    writeln!(out, "    - {}", l.trim_start())?;
                } else {
                    writeln!(out, "{l}")?;
                }
            }
        }
        let ns = label(a.netns, &a.netns_name);
        let mut said_ns = false;
        for s in &a.steps {
            match s {
                Step::Run { in_netns, .. } => {
                    if *in_netns && !said_ns && a.netns_name.is_some() {
                        writeln!(out, "    in {ns} (ip netns exec {ns} ...):")?;
                        said_ns = true;
                    }
                    for l in wrap_command(&s.command_line().unwrap_or_default(), 80) {
                        writeln!(out, "{l}")?;
                    }
                }
                Step::Persist { file, line } => {
                    writeln!(out, "    persist in {file}:")?;
                    writeln!(out, "      {line}")?;
                }
                Step::Nft { script } => {
                    writeln!(out, "    or with nft (nft -f FILE):")?;
                    for l in script.lines() {
                        writeln!(out, "      {l}")?;
                    }
                }
            }
        }
    }
    Ok(())
}

/// Markdown for a ticket: a paragraph per item, notes as bullets, commands
/// and file lines in fenced blocks.
pub fn write_markdown(advice: &[Advice], out: &mut dyn Write) -> std::io::Result<()> {
    for a in advice {
        writeln!(
            out,
            "**{}** in {}: {}\n",
            a.topic,
            label(a.netns, &a.netns_name),
            a.headline
        )?;
        for n in &a.notes {
            writeln!(out, "- {n}")?;
        }
        if !a.notes.is_empty() {
            writeln!(out)?;
        }
        let ns = label(a.netns, &a.netns_name);
        let runs: Vec<&Step> = a
            .steps
            .iter()
            .filter(|s| matches!(s, Step::Run { .. }))
            .collect();
        if !runs.is_empty() {
            if runs
                .iter()
                .any(|s| matches!(s, Step::Run { in_netns: true, .. }))
                && a.netns_name.is_some()
            {
                writeln!(out, "in {ns} (`ip netns exec {ns} ...`):\n")?;
            }
            writeln!(out, "```sh")?;
            for s in runs {
                writeln!(out, "{}", s.command_line().unwrap_or_default())?;
            }
            writeln!(out, "```\n")?;
        }
        for s in &a.steps {
            match s {
                Step::Persist { file, line } => {
                    writeln!(out, "persist in `{file}`:\n\n```\n{line}\n```\n")?
                }
                Step::Nft { script } => {
                    writeln!(out, "or with nft (`nft -f FILE`):\n\n```\n{}```\n", script)?
                }
                Step::Run { .. } => {}
            }
        }
    }
    Ok(())
}

pub fn to_json(advice: &[Advice]) -> serde_json::Value {
    serde_json::to_value(advice).unwrap_or_default()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conntrack::occupancy::{CtEntry, OccupancyBuilder};
    use netlink_packet_netfilter::conntrack::Status;

    fn table(udp_port: u16, udp: u64, tcp: u64, nat: bool) -> Occupancy {
        let mut b = OccupancyBuilder::default();
        let src = "198.18.0.1".parse().unwrap();
        let dst = "198.18.0.2".parse().unwrap();
        for i in 0..udp {
            let st = if nat {
                Status::Confirmed | Status::DstNat
            } else {
                Status::Confirmed
            };
            b.add(&CtEntry {
                proto: 17,
                src,
                dst,
                sport: 1000 + i as u16,
                dport: udp_port,
                tcp_state: None,
                status: st.bits(),
            });
        }
        for i in 0..tcp {
            b.add(&CtEntry {
                proto: 6,
                src,
                dst,
                sport: 2000 + i as u16,
                dport: 8080,
                tcp_state: Some(3),
                status: (Status::Confirmed | Status::SeenReply | Status::Assured).bits(),
            });
        }
        b.finish(5)
    }

    fn host() -> Host {
        Host {
            module: ModuleKind::BuiltIn,
            entry_bytes: Some(256),
        }
    }

    fn limits(max: u64) -> Option<CtLimits> {
        Some(CtLimits {
            max,
            buckets: 262144,
        })
    }

    #[test]
    fn commands_paste_into_a_shell() {
        let s = Step::run(
            &[
                "sh",
                "-c",
                "echo 128 > /sys/module/nf_conntrack/parameters/hashsize",
            ],
            false,
        );
        assert_eq!(
            s.command_line().unwrap(),
            "sh -c 'echo 128 > /sys/module/nf_conntrack/parameters/hashsize'"
        );
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
        assert_eq!(bytes_human(128 * 256), "32 KiB");
        assert_eq!(bytes_human(524288 * 256), "128 MiB");
    }

    #[test]
    fn max_covers_peak_with_headroom() {
        assert_eq!(max_for_peak(64), 128);
        assert_eq!(max_for_peak(100), 128);
        assert_eq!(max_for_peak(103), 256);
        assert_eq!(max_for_peak(0), 2);
        for p in [1, 7, 65536, 262144, 300000] {
            assert!(max_for_peak(p) as f64 >= p as f64 * HEADROOM);
        }
    }

    #[test]
    fn one_source_flood_is_limited_at_its_source_and_the_limit_is_not_sized_from_its_drops() {
        // 58 unanswered UDP flows to 5353 and 5 TCP connections, all from
        // 198.18.0.1, fill a 64-entry table; 40 more packets turned away.
        let o = table(5353, 58, 5, false);
        let e = NsEvidence {
            netns: Some(7),
            netns_name: Some("ctdo-b".into()),
            table_full_drops: 40,
            table_full_flows: 40,
            peak_entries: 64,
            occupancy: Some(&o),
            limits: limits(64),
            ..Default::default()
        };
        let a = for_namespace(&e, &host());
        let topics: Vec<&str> = a.iter().map(|a| a.topic).collect();
        assert_eq!(
            topics,
            vec!["limit_origin", "capacity", "notrack"],
            "the source first, before any limit"
        );
        let src = &a[0];
        assert!(
            src.headline
                .starts_with("198.18.0.1 is behind 63 of 63 entries (100%)"),
            "{}",
            src.headline
        );
        let cmds: Vec<String> = src.steps.iter().filter_map(Step::command_line).collect();
        assert_eq!(
            cmds,
            vec![
                "iptables -I INPUT -s 198.18.0.1 -m conntrack --ctstate NEW -m hashlimit --hashlimit-above 50/sec --hashlimit-burst 100 --hashlimit-mode srcip --hashlimit-name ctdrop_src -j DROP",
                "iptables -I INPUT -s 198.18.0.1 -m connlimit --connlimit-above 16 --connlimit-mask 32 -j DROP",
                "conntrack -D -s 198.18.0.1",
            ]
        );
        assert!(src.notes.iter().any(|n| n.contains("find the client")));
        // Sized from what was legitimately held (the 5 answered TCP
        // connections), not from 64 + 40 turned-away flood packets.
        let cap = &a[1];
        assert_eq!(cap.values["legit_entries"], 6);
        assert_eq!(cap.values["change_needed"], false);
        assert_eq!(cap.values["recommended_max"], 64);
        assert!(cap.steps.is_empty(), "{:?}", cap.steps);
        assert!(cap.headline.contains("do not raise it"), "{}", cap.headline);
        let nt = &a[2];
        let cmds: Vec<String> = nt.steps.iter().filter_map(Step::command_line).collect();
        assert!(cmds
            .contains(&"iptables -t raw -A PREROUTING -p udp --dport 5353 -j NOTRACK".to_string()));
        assert!(
            cmds.contains(&"iptables -t raw -A OUTPUT -p udp --sport 5353 -j NOTRACK".to_string())
        );
        assert!(cmds.contains(&"conntrack -D -p udp --orig-port-dst 5353".to_string()));
        // The ASSURED TCP connections are stateful: never advised away.
        assert!(!cmds.iter().any(|c| c.contains("8080")));
    }

    #[test]
    fn legit_growth_raises_the_limit_from_the_entries_held() {
        // 72 answered connections from 72 clients fill a 72-entry table;
        // 30 more clients were turned away, each once.
        let mut b = OccupancyBuilder::default();
        for i in 0..72u32 {
            let src = IpAddr::from([198, 18, 1, i as u8]);
            b.add(&CtEntry {
                proto: 6,
                src,
                dst: "198.18.0.2".parse().unwrap(),
                sport: 40000,
                dport: 443,
                tcp_state: Some(3),
                status: (Status::Confirmed | Status::SeenReply | Status::Assured).bits(),
            });
        }
        let o = b.finish(5);
        let drop_sources: Vec<(IpAddr, u64)> = (0..3u8)
            .map(|i| (IpAddr::from([198, 18, 2, i]), 1))
            .collect();
        let e = NsEvidence {
            netns: Some(3),
            table_full_drops: 30,
            table_full_flows: 30,
            peak_entries: 72,
            occupancy: Some(&o),
            limits: limits(72),
            drop_sources,
            ..Default::default()
        };
        let a = for_namespace(&e, &host());
        let topics: Vec<&str> = a.iter().map(|a| a.topic).collect();
        // Port 443 holds every entry, but answered: a busy service, not a flood.
        assert_eq!(topics, vec!["capacity"]);
        assert_eq!(a[0].values["observed_peak"], 102);
        assert_eq!(a[0].values["recommended_max"], 128);
        assert_eq!(a[0].values["change_needed"], true);
        assert!(a[0]
            .steps
            .iter()
            .any(|s| s.command_line().as_deref()
                == Some("sysctl -w net.netfilter.nf_conntrack_max=128")));
    }

    #[test]
    fn idle_big_table_gets_no_capacity_or_notrack_advice_and_says_the_threshold() {
        // The issue's case: 4 entries in a 262,144-entry table.
        let o = table(5353, 2, 2, false);
        let e = NsEvidence {
            netns: Some(1),
            occupancy: Some(&o),
            limits: limits(262144),
            peak_entries: 4,
            ..Default::default()
        };
        let a = for_namespace(&e, &host());
        assert_eq!(
            a.iter().map(|a| a.topic).collect::<Vec<_>>(),
            vec!["headroom"]
        );
        assert!(
            a[0].headline.contains("4 of 262144 entries (0%)"),
            "{}",
            a[0].headline
        );
        assert!(
            a[0].headline.contains("start at 80% of nf_conntrack_max"),
            "{}",
            a[0].headline
        );
        assert!(a[0].steps.is_empty());
        // At 80% the same table is near full: advice comes back.
        let e = NsEvidence {
            limits: limits(5),
            ..e
        };
        assert!(for_namespace(&e, &host())
            .iter()
            .any(|a| a.topic == "capacity"));
    }

    #[test]
    fn nat_present_says_conntrack_stays() {
        let o = table(53, 30, 0, true);
        let e = NsEvidence {
            occupancy: Some(&o),
            limits: limits(262144),
            ..Default::default()
        };
        let a = for_namespace(&e, &host());
        assert!(a
            .iter()
            .any(|a| a.topic == "nat" && a.headline.contains("cannot be disabled")));
    }

    #[test]
    fn small_groups_and_tcp_are_not_untracked() {
        let mut o = table(5353, 2, 60, false);
        o.top_dst_ports.retain(|p| p.port != 5353 || p.entries >= 2);
        assert!(notrack_candidates(&o).is_empty());
    }

    #[test]
    fn built_in_module_hashsize_goes_on_the_command_line() {
        let e = NsEvidence {
            table_full_drops: 1,
            table_full_flows: 1,
            peak_entries: 64,
            limits: limits(64),
            ..Default::default()
        };
        let cap = capacity(&e, &host(), None);
        assert!(cap
            .notes
            .iter()
            .any(|n| n.contains("nf_conntrack.hashsize=128")));
        let cap = capacity(
            &e,
            &Host {
                module: ModuleKind::Loadable,
                entry_bytes: None,
            },
            None,
        );
        assert!(cap.steps.contains(&Step::Persist {
            file: "/etc/modprobe.d/nf_conntrack.conf".into(),
            line: "options nf_conntrack hashsize=128".into()
        }));
    }

    #[test]
    fn a_run_advises_per_namespace_from_its_drops() {
        use crate::events::{DropEvent, Flow, Icmp};
        let ev = |ns: u32, proto: u8, sport: u16, icmp: Option<Icmp>| DropEvent {
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
                proto,
                ports: (proto == 17).then_some((sport, 5353)),
            }),
            icmp,
            ct: None,
            ct_fill: None,
            truncated: false,
            header: None,
        };
        let mut t = Tally::new(1000);
        for p in 0..30 {
            t.record(&ev(1, 17, 1000 + p, None), Cause::ConntrackTableFull);
        }
        // The same flow again: one more drop, no more demand.
        t.record(&ev(1, 17, 1000, None), Cause::ConntrackTableFull);
        t.record(
            &ev(
                2,
                1,
                0,
                Some(Icmp {
                    ty: 3,
                    code: 4,
                    echo: None,
                }),
            ),
            Cause::IcmpErrorBlocked,
        );
        t.record(&ev(3, 17, 7, None), Cause::NetfilterRule);
        let a = from_run(&t, &BTreeMap::new(), limits(64), &host(), |ns| {
            Some(format!("ns{ns}"))
        });
        let topics: Vec<(&str, Option<u32>)> = a.iter().map(|a| (a.topic, a.netns)).collect();
        assert_eq!(
            topics,
            vec![
                ("limit_origin", Some(1)),
                ("capacity", Some(1)),
                ("icmp_error_blocked", Some(2))
            ]
        );
        // Every turned-away packet came from one source: that source is named,
        // and the limit is sized from the 64 entries held, not 64 + 30 drops.
        assert_eq!(a[0].values["source"], "198.18.0.1");
        assert_eq!(
            (a[0].values["count"].as_u64(), a[0].values["of"].as_u64()),
            (Some(31), Some(31))
        );
        assert_eq!(a[1].values["turned_away_flows"], 30);
        assert_eq!(a[1].values["observed_peak"], 64);
        assert_eq!(a[1].netns_name.as_deref(), Some("ns1"));
        assert_eq!(a[2].netns_name.as_deref(), Some("ns2"));
    }

    #[test]
    fn insert_clashes_get_their_causes_and_mitigations() {
        let e = NsEvidence {
            netns: Some(9),
            insert_failed: 120,
            limits: limits(262144),
            ..Default::default()
        };
        let a = for_namespace(&e, &host());
        assert_eq!(
            a.len(),
            1,
            "no table advice without a snapshot or table-full drops"
        );
        assert_eq!(
            (a[0].topic, a[0].cause),
            ("insert_clash", "conntrack_insert_failed")
        );
        assert!(a[0].headline.starts_with("120 packets"));
        assert!(a[0]
            .notes
            .iter()
            .any(|n| n.contains("single-request-reopen")));
    }

    #[test]
    fn icmp_blocked_warns_about_pmtu() {
        let g = IcmpBlocked {
            netns: Some(3),
            netns_name: Some("ctdo-e".into()),
            src: "198.18.1.1".parse().ok(),
            dst: "198.18.0.1".parse().ok(),
            drops: 2,
        };
        let a = for_icmp_blocked(&[g.clone(), IcmpBlocked { drops: 1, ..g }]);
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].cause, "icmp_error_blocked");
        assert!(a[0].headline.starts_with("3 ICMP"));
        assert!(a[0].headline.contains("path-MTU"));
    }

    #[test]
    fn markdown_fences_the_commands() {
        let o = table(5353, 58, 5, false);
        let e = NsEvidence {
            netns: Some(4),
            netns_name: Some("srv".into()),
            table_full_drops: 9,
            table_full_flows: 9,
            peak_entries: 64,
            occupancy: Some(&o),
            limits: limits(64),
            ..Default::default()
        };
        let mut out = Vec::new();
        write_markdown(&for_namespace(&e, &host()), &mut out).unwrap();
        let md = String::from_utf8(out).unwrap();
        assert!(md.contains("**notrack** in srv:"), "{md}");
        assert!(
            md.contains("```sh\niptables -t raw -A PREROUTING -p udp --dport 5353 -j NOTRACK\n"),
            "{md}"
        );
        assert!(md.contains("- nf_conntrack_max is global"), "{md}");
        assert_eq!(md.matches("```").count() % 2, 0, "unbalanced fences:\n{md}");
    }

    #[test]
    fn human_advice_fits_80_columns() {
        let o = table(5353, 58, 5, true);
        let e = NsEvidence {
            netns: Some(4026532000),
            netns_name: Some("ctdemo-srv".into()),
            table_full_drops: 123456,
            table_full_flows: 100000,
            insert_failed: 3,
            peak_entries: 262144,
            occupancy: Some(&o),
            limits: limits(262144),
            ..Default::default()
        };
        let mut a = for_namespace(&e, &host());
        a.extend(for_icmp_blocked(&[IcmpBlocked {
            netns: Some(1),
            netns_name: None,
            src: "2001:db8::1".parse().ok(),
            dst: "2001:db8::2".parse().ok(),
            drops: 9,
        }]));
        let mut out = Vec::new();
        write_human(&a, &mut out).unwrap();
        let s = String::from_utf8(out).unwrap();
        for l in s.lines() {
            assert!(
                l.chars().count() <= 80,
                "{l:?} is {} columns",
                l.chars().count()
            );
        }
        assert!(s.contains("$ iptables -t raw -A PREROUTING -p udp --dport 5353 -j NOTRACK"));
        // Long commands continue with a backslash, never inside quotes.
        assert!(
            s.contains(
                "$ iptables -I INPUT -s 198.18.0.1 -m conntrack --ctstate NEW -m hashlimit \\\n"
            ),
            "{s}"
        );
        assert_eq!(
            wrap_command(
                "sh -c 'echo 1 > /a/very/long/path/that/goes/on/and/on/and/on/hashsize' x",
                40
            )[0],
            "    $ sh -c \\"
        );
        assert!(wrap_command(
            "sh -c 'echo 1 > /a/very/long/path/that/goes/on/and/on/and/on/hashsize' x",
            40
        )
        .iter()
        .any(|l| l.trim_start()
            == "'echo 1 > /a/very/long/path/that/goes/on/and/on/and/on/hashsize' \\"));
    }
}
