//! The mixed scene of issue #13: one namespace whose conntrack table is full
//! while a raw-table rule drops other packets, both kinds entry-less and
//! interleaved; each record's cause is judged against the port its packet
//! was sent to. Used by tests/tests/exact_cause.rs and the kernel matrix.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, UdpSocket},
    ops::Range,
    path::Path,
    time::{Duration, Instant},
};

use serde_json::Value;

use ctlab::CtStats;

use crate::{
    ct_stats,
    flood::{Flood, FloodKind},
    in_netns, send_udp_flows, settled_ct_stats, ConntrackMaxGuard, Ctdrop, CtdropOutput, Topology,
};

/// nf_conntrack_max while a scene runs.
pub const MAX: u64 = 64;
/// Each new flow to these ports is a table-full drop (the table is full).
pub const FLOOD: Range<u16> = 1024..9000;
/// The raw-table rule drops these before conntrack sees them.
pub const RULED: Range<u16> = 9000..10000;
/// [`Scene::fill`] sends here: MAX flows get entries, the rest are dropped.
pub const FILL: Range<u16> = 20_000..20_000 + MAX as u16 + 16;

/// A sender/receiver pair whose receiver tracks connections (IPv4 and,
/// when asked, IPv6) and drops `RULED` in its raw table.
pub struct Scene {
    pub topo: Topology,
    pub dst: IpAddr,
    pub rx: u32,
}

impl Scene {
    pub fn new(v6: bool) -> Scene {
        let topo = Topology::pair().unwrap();
        topo.track_receiver().unwrap();
        let mut dst = IpAddr::V4(topo.receiver_addr);
        let tool = if v6 { "ip6tables" } else { "iptables" };
        if v6 {
            let n = topo.receiver_addr.octets()[2] as u16;
            let r6 = Ipv6Addr::new(0xfd00, 0x18, n, 0, 0, 0, 0, 2);
            topo.add_ipv6(Ipv6Addr::new(0xfd00, 0x18, n, 0, 0, 0, 0, 1), r6)
                .unwrap();
            dst = IpAddr::V6(r6);
            topo.receiver
                .accept_ct("ip6tables", "INPUT", "ESTABLISHED,RELATED")
                .unwrap();
        }
        topo.receiver
            .exec(&[
                tool,
                "-t",
                "raw",
                "-A",
                "PREROUTING",
                "-p",
                "udp",
                "--dport",
                "9000:9999",
                "-j",
                "DROP",
            ])
            .unwrap();
        let rx = topo.receiver.inode().unwrap();
        Scene { topo, dst, rx }
    }

    /// Fills the receiver's table (IPv4 flows; the count is per namespace,
    /// both families share it).
    pub fn fill(&self) {
        send_udp_flows(
            &self.topo.sender,
            self.topo.receiver_addr,
            20_000,
            MAX as u16 + 16,
        )
        .unwrap();
        let s = settled_ct_stats(&self.topo.receiver, "drop").unwrap();
        assert_eq!(s["entries"], MAX, "table not full after the fill: {s:?}");
    }

    /// Runs `traffic` between two readings of the receiver's counters:
    /// its `drop` counter (settled) and the rule's packet counter.
    pub fn measure<T>(&self, traffic: impl FnOnce() -> T) -> Measured<T> {
        let before = ct_stats(&self.topo.receiver).unwrap();
        let rule_before = self.rule_packets();
        let sent = traffic();
        let after = settled_ct_stats(&self.topo.receiver, "drop").unwrap();
        let rule_delta = self.rule_packets() - rule_before;
        Measured {
            sent,
            drop_delta: after["drop"] - before["drop"],
            rule_delta,
            before,
            after,
        }
    }

    /// [`send_mixed`] from the sender, [`Scene::measure`]d: (flood, ruled)
    /// datagrams sent.
    pub fn mixed_round(&self) -> Measured<(u64, u64)> {
        self.measure(|| send_mixed(&self.topo.sender.path(), self.dst))
    }

    /// [`judge`] of a measured round.
    pub fn judge<T>(&self, out: &CtdropOutput, m: &Measured<T>) -> usize {
        judge(self, out, m.drop_delta, m.rule_delta)
    }

    pub fn rule_packets(&self) -> u64 {
        let tool = if self.dst.is_ipv6() {
            "ip6tables"
        } else {
            "iptables"
        };
        let out = self
            .topo
            .receiver
            .exec(&[tool, "-t", "raw", "-L", "PREROUTING", "-v", "-x", "-n"])
            .unwrap();
        let line = out
            .lines()
            .find(|l| l.contains("dpts:9000:9999"))
            .unwrap_or_else(|| panic!("rule not listed: {out}"));
        line.split_whitespace().next().unwrap().parse().unwrap()
    }
}

/// What [`Scene::measure`] saw around the traffic.
pub struct Measured<T> {
    /// What the traffic returned.
    pub sent: T,
    pub before: CtStats,
    pub after: CtStats,
    /// The receiver's `drop` counter's rise.
    pub drop_delta: u64,
    /// The raw-table rule's packet counter's rise.
    pub rule_delta: u64,
}

/// From one socket in `ns`: a new flow to each `FLOOD` port, and after
/// every fourth one a datagram to a `RULED` port, so both kinds of
/// entry-less drops share every counter window.
pub fn send_mixed(ns: &Path, dst: IpAddr) -> (u64, u64) {
    in_netns(ns, move || {
        let bind: IpAddr = if dst.is_ipv6() {
            Ipv6Addr::UNSPECIFIED.into()
        } else {
            Ipv4Addr::UNSPECIFIED.into()
        };
        let sock = UdpSocket::bind((bind, 0))?;
        let (mut flood, mut ruled) = (0u64, 0u64);
        for (i, port) in FLOOD.enumerate() {
            sock.send_to(b"ctdrop-tests mixed", (dst, port))?;
            flood += 1;
            if i % 4 == 0 {
                sock.send_to(
                    b"ctdrop-tests mixed",
                    (dst, RULED.start + (i / 4) as u16 % 1000),
                )?;
                ruled += 1;
            }
        }
        Ok((flood, ruled))
    })
    .unwrap()
}

pub fn by_cause<'a>(recs: impl IntoIterator<Item = &'a Value>) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    for r in recs {
        *m.entry(r["cause"].as_str().unwrap_or("?").to_string())
            .or_default() += 1;
    }
    m
}

/// The cause a record must carry, from the port its packet was sent to.
pub fn expected_cause(r: &Value) -> &'static str {
    let port = r["dport"]
        .as_u64()
        .unwrap_or_else(|| panic!("no dport in {r}")) as u16;
    if RULED.contains(&port) {
        "netfilter_rule"
    } else if FLOOD.contains(&port) || FILL.contains(&port) {
        "conntrack_table_full"
    } else {
        panic!("a drop of a packet this test did not send: {r}")
    }
}

/// Checks one namespace of a finished run: every record's cause, and the
/// totals against the kernel's counters. Returns the wrong records.
pub fn judge(s: &Scene, out: &CtdropOutput, drop_delta: u64, rule_delta: u64) -> usize {
    let mine = out.drops_in(s.rx);
    let wrong: Vec<&&Value> = mine
        .iter()
        .filter(|r| r["cause"] != expected_cause(r))
        .collect();
    let causes = by_cause(mine.iter().copied());
    let evidence = {
        let mut m: BTreeMap<String, u64> = BTreeMap::new();
        for r in &mine {
            *m.entry(format!(
                "{}/{}",
                r["cause"].as_str().unwrap_or("?"),
                r["evidence"].as_str().unwrap_or("?")
            ))
            .or_default() += 1;
        }
        m
    };
    eprintln!(
        "netns {} ({}): {} records {causes:?}; evidence {evidence:?}; kernel drop +{drop_delta}, rule +{rule_delta}; WRONG {}",
        s.rx,
        s.dst,
        mine.len(),
        wrong.len()
    );
    for r in wrong.iter().take(3) {
        eprintln!("  wrong: {r}");
    }
    let full = causes.get("conntrack_table_full").copied().unwrap_or(0);
    let rules = causes.get("netfilter_rule").copied().unwrap_or(0);
    if !wrong.is_empty() || full != drop_delta || rules != rule_delta {
        // Missing records and wrong ones have different causes (lost ring
        // events, a late attach, a mislabel): say which it was.
        let lost = out.summary().map(|s| s["events_lost"].clone()).ok();
        eprintln!("events_lost {lost:?}; ctdrop stderr: {}", out.stderr);
    }
    assert_eq!(
        causes.get("conntrack_table_full").copied().unwrap_or(0),
        drop_delta,
        "table-full records vs kernel drop counter"
    );
    assert_eq!(
        causes.get("netfilter_rule").copied().unwrap_or(0),
        rule_delta,
        "rule records vs the rule's packet counter"
    );
    wrong.len()
}

/// Starts ctdrop (`args`) while a flood of new flows already drops into a
/// full table (no rule anywhere: every entry-less drop in the receiver is
/// conntrack's); returns the receiver's inode and ctdrop's output.
pub fn ctdrop_started_during_a_flood(args: &[&str]) -> (u32, CtdropOutput) {
    let topo = Topology::pair().unwrap();
    topo.track_receiver().unwrap();
    let rx = topo.receiver.inode().unwrap();
    let _max = ConntrackMaxGuard::set(MAX).unwrap();
    send_udp_flows(&topo.sender, topo.receiver_addr, 20_000, MAX as u16 + 16).unwrap();
    let flood = Flood::start(&topo.sender, topo.receiver_addr, FloodKind::Udp, None).unwrap();
    // The flood must be dropping before ctdrop attaches.
    let t0 = ct_stats(&topo.receiver).unwrap()["drop"];
    let deadline = Instant::now() + Duration::from_secs(20);
    while ct_stats(&topo.receiver).unwrap()["drop"] < t0 + 1000 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let ctdrop = Ctdrop::spawn_tail(args, 2_000_000).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    flood.stop().unwrap();
    let out = ctdrop.stop_drained();
    (rx, out)
}

/// Every record in `rx` is a table-full drop (none called a rule drop),
/// and there are many. Returns the records by cause.
pub fn assert_flood_all_table_full(rx: u32, out: &CtdropOutput) -> BTreeMap<String, u64> {
    let mine = out.drops_in(rx);
    let causes = by_cause(mine.iter().copied());
    eprintln!(
        "receiver {rx}: {} records {causes:?}; {}",
        mine.len(),
        out.stderr.lines().next().unwrap_or("")
    );
    assert!(
        causes.get("conntrack_table_full").copied().unwrap_or(0) > 100,
        "the flood was not recorded: {causes:?}"
    );
    assert_eq!(
        causes.get("netfilter_rule"),
        None,
        "table-full drops called rule drops at start-up"
    );
    assert_eq!(mine.len() as u64, causes["conntrack_table_full"]);
    causes
}
