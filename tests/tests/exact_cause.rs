//! Exact cause per packet on the tracepoint tier (issue #13): conntrack's
//! own drops against rule drops of entry-less packets, interleaved in one
//! namespace, judged record by record against the port each packet was
//! sent to. Needs root; run single-threaded under the dev lock.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, UdpSocket},
    ops::Range,
    path::Path,
    time::{Duration, Instant},
};

use ctdrop_tests::{
    bpf, clash, ct_stats, in_netns, send_udp_flows, settled_ct_stats, ConntrackMaxGuard, Ctdrop,
    CtdropOutput, Netns, Topology,
};
use serde_json::Value;

const MAX: u64 = 64;
/// Each new flow to these ports is a table-full drop (the table is full).
const FLOOD: Range<u16> = 1024..9000;
/// The raw-table rule drops these before conntrack sees them.
const RULED: Range<u16> = 9000..10000;

/// A sender/receiver pair whose receiver tracks connections (IPv4 and,
/// when asked, IPv6) and drops `RULED` in its raw table.
struct Scene {
    topo: Topology,
    dst: IpAddr,
    rx: u32,
}

impl Scene {
    fn new(v6: bool) -> Scene {
        let topo = Topology::pair().unwrap();
        topo.track_receiver().unwrap();
        let mut dst = IpAddr::V4(topo.receiver_addr);
        let tool = if v6 { "ip6tables" } else { "iptables" };
        if v6 {
            let n = topo.receiver_addr.octets()[2];
            for (ns, dev, host) in [
                (&topo.sender, &topo.veth.sender_if, 1u16),
                (&topo.receiver, &topo.veth.receiver_if, 2),
            ] {
                ns.exec(&[
                    "sysctl",
                    "-qw",
                    &format!("net.ipv6.conf.{dev}.disable_ipv6=0"),
                ])
                .unwrap();
                let a = Ipv6Addr::new(0xfd00, 0x18, n as u16, 0, 0, 0, 0, host);
                ns.exec(&[
                    "ip",
                    "-6",
                    "addr",
                    "add",
                    &format!("{a}/64"),
                    "dev",
                    dev,
                    "nodad",
                ])
                .unwrap();
                if host == 2 {
                    dst = IpAddr::V6(a);
                }
            }
            topo.receiver
                .exec(&[
                    "ip6tables",
                    "-A",
                    "INPUT",
                    "-m",
                    "conntrack",
                    "--ctstate",
                    "ESTABLISHED,RELATED",
                    "-j",
                    "ACCEPT",
                ])
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
    fn fill(&self) {
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

    fn rule_packets(&self) -> u64 {
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

/// From one socket in `ns`: a new flow to each `FLOOD` port, and after
/// every fourth one a datagram to a `RULED` port, so both kinds of
/// entry-less drops share every counter window.
fn send_mixed(ns: &Path, dst: IpAddr) -> (u64, u64) {
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

fn by_cause<'a>(recs: impl IntoIterator<Item = &'a Value>) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    for r in recs {
        *m.entry(r["cause"].as_str().unwrap_or("?").to_string())
            .or_default() += 1;
    }
    m
}

/// The cause a record must carry, from the port its packet was sent to.
fn expected_cause(r: &Value) -> &'static str {
    let port = r["dport"]
        .as_u64()
        .unwrap_or_else(|| panic!("no dport in {r}")) as u16;
    if RULED.contains(&port) {
        "netfilter_rule"
    } else if FLOOD.contains(&port) {
        "conntrack_table_full"
    } else {
        panic!("a drop of a packet this test did not send: {r}")
    }
}

/// Checks one namespace of a finished run: every record's cause, and the
/// totals against the kernel's counters. Returns the wrong records.
fn judge(s: &Scene, out: &CtdropOutput, drop_delta: u64, rule_delta: u64) -> usize {
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
    if !wrong.is_empty() {
        eprintln!("ctdrop stderr: {}", out.stderr);
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

fn mixed(v6: bool) {
    let s = Scene::new(v6);
    let _max = ConntrackMaxGuard::set(MAX).unwrap();
    s.fill();
    let ctdrop = Ctdrop::spawn(&["live", "--json"]).unwrap();
    let before = ct_stats(&s.topo.receiver).unwrap();
    let rule_before = s.rule_packets();
    let (flood, ruled) = send_mixed(&s.topo.sender.path(), s.dst);
    let after = settled_ct_stats(&s.topo.receiver, "drop").unwrap();
    let rule_after = s.rule_packets();
    std::thread::sleep(Duration::from_millis(300));
    let out = ctdrop.stop().unwrap();
    assert!(
        out.status.success(),
        "ctdrop failed: {:?}\n{}",
        out.status,
        out.stderr
    );
    eprintln!("sent {flood} flood + {ruled} ruled datagrams");
    let wrong = judge(
        &s,
        &out,
        after["drop"] - before["drop"],
        rule_after - rule_before,
    );
    assert!(
        after["drop"] - before["drop"] > 1000 && rule_after - rule_before == ruled,
        "the scene did not happen: {before:?} -> {after:?}"
    );
    assert_eq!(wrong, 0, "records whose cause is not their packet's");
    let summary = out.summary().unwrap();
    eprintln!(
        "summary inferred_by_budget: {}",
        summary["inferred_by_budget"]
    );
}

#[test]
fn mixed_table_full_and_raw_rule_drops_each_record_exact_ipv4() {
    mixed(false);
}

#[test]
fn mixed_table_full_and_raw_rule_drops_each_record_exact_ipv6() {
    mixed(true);
}

#[test]
fn two_namespaces_full_at_once_each_record_exact() {
    let a = Scene::new(false);
    let b = Scene::new(true);
    let _max = ConntrackMaxGuard::set(MAX).unwrap();
    a.fill();
    b.fill();
    let ctdrop = Ctdrop::spawn(&["live", "--json"]).unwrap();
    let (ba, bb) = (
        ct_stats(&a.topo.receiver).unwrap(),
        ct_stats(&b.topo.receiver).unwrap(),
    );
    let (ra, rb) = (a.rule_packets(), b.rule_packets());
    let (pa, pb) = (a.topo.sender.path(), b.topo.sender.path());
    let (da, db) = (a.dst, b.dst);
    let ta = std::thread::spawn(move || send_mixed(&pa, da));
    let tb = std::thread::spawn(move || send_mixed(&pb, db));
    let (fa, fb) = (ta.join().unwrap(), tb.join().unwrap());
    let (aa, ab) = (
        settled_ct_stats(&a.topo.receiver, "drop").unwrap(),
        settled_ct_stats(&b.topo.receiver, "drop").unwrap(),
    );
    let (ra2, rb2) = (a.rule_packets(), b.rule_packets());
    std::thread::sleep(Duration::from_millis(300));
    let out = ctdrop.stop().unwrap();
    assert!(
        out.status.success(),
        "ctdrop failed: {:?}\n{}",
        out.status,
        out.stderr
    );
    eprintln!("sent {fa:?} and {fb:?}");
    let wa = judge(&a, &out, aa["drop"] - ba["drop"], ra2 - ra);
    let wb = judge(&b, &out, ab["drop"] - bb["drop"], rb2 - rb);
    assert_eq!(
        (wa, wb),
        (0, 0),
        "records whose cause is not their packet's"
    );
}

#[test]
fn ctdrop_started_during_a_flood_never_calls_a_table_full_drop_a_rule() {
    // No rule here: every entry-less drop in the receiver is conntrack's.
    let topo = Topology::pair().unwrap();
    topo.track_receiver().unwrap();
    let rx = topo.receiver.inode().unwrap();
    let _max = ConntrackMaxGuard::set(MAX).unwrap();
    send_udp_flows(&topo.sender, topo.receiver_addr, 20_000, MAX as u16 + 16).unwrap();
    let flood = ctdrop_tests::flood::Flood::start(
        &topo.sender,
        topo.receiver_addr,
        ctdrop_tests::flood::FloodKind::Udp,
        None,
    )
    .unwrap();
    // Make sure the flood is dropping before ctdrop attaches.
    let t0 = ct_stats(&topo.receiver).unwrap()["drop"];
    let deadline = Instant::now() + Duration::from_secs(10);
    while ct_stats(&topo.receiver).unwrap()["drop"] < t0 + 1000 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let ctdrop = Ctdrop::spawn_tail(&["live", "--json"], 2_000_000).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    flood.stop().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let out = ctdrop.stop().unwrap();
    assert!(
        out.status.success(),
        "ctdrop failed: {:?}\n{}",
        out.status,
        out.stderr
    );
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
}

#[test]
fn insert_clash_drops_are_named_insert_failed_per_packet() {
    let t = Topology::pair().unwrap();
    // Conntrack on in the sender: its OUTPUT creates, POSTROUTING confirms.
    t.sender
        .exec(&[
            "iptables",
            "-A",
            "OUTPUT",
            "-m",
            "conntrack",
            "--ctstate",
            "NEW",
            "-j",
            "ACCEPT",
        ])
        .unwrap();
    let tx = t.sender.inode().unwrap();
    let c = Ctdrop::spawn(&["live", "--json"]).unwrap();
    let before = ct_stats(&t.sender).unwrap();
    clash::race_until_insert_failed(&t.sender, t.sender_addr, t.receiver_addr, 80, 20).unwrap();
    let after = settled_ct_stats(&t.sender, "insert_failed").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let out = c.stop().unwrap();
    assert!(
        out.status.success(),
        "ctdrop failed: {:?}\n{}",
        out.status,
        out.stderr
    );
    let failed = after["insert_failed"] - before["insert_failed"];
    let mine = out.drops_in(tx);
    let causes = by_cause(mine.iter().copied());
    eprintln!(
        "sender {tx}: insert_failed +{failed}, drop +{}; records {causes:?}",
        after["drop"] - before["drop"]
    );
    assert!(failed > 0, "no insert clash happened");
    assert_eq!(
        causes.get("conntrack_insert_failed").copied().unwrap_or(0),
        failed,
        "insert-failed records vs the kernel's insert_failed"
    );
    for r in &mine {
        assert_eq!(r["cause"], "conntrack_insert_failed", "{r}");
        assert_eq!(r["evidence"], "hook:conntrack_confirm", "{r}");
        assert_eq!(
            (r["proto"].as_str(), r["dport"].as_u64()),
            (Some("tcp"), Some(80)),
            "{r}"
        );
    }
}

#[test]
fn sigkill_leaves_no_hook_link_program_or_map() {
    let _ns = Netns::new().unwrap();
    let since = bpf::high_water().unwrap();
    let ctdrop = Ctdrop::spawn(&["live", "--json"]).unwrap();
    let held = bpf::held_by(ctdrop.pid());
    let objs = bpf::still_listed(&held).unwrap();
    let hooks: Vec<&bpf::Object> = objs
        .iter()
        .filter(|o| o.kind == bpf::Kind::Prog && o.name.starts_with("ct_hook"))
        .collect();
    assert!(hooks.len() >= 3, "ctdrop holds no hook programs: {objs:?}");
    let links = objs
        .iter()
        .filter(|o| o.kind == bpf::Kind::Link && hooks.iter().any(|p| Some(p.id) == o.prog_id))
        .count();
    // 12 links per namespace; at least ours and the initial one.
    assert!(links >= 24, "only {links} hook links: {objs:?}");
    let out = ctdrop.stop_with(libc::SIGKILL).unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(out.status.signal(), Some(libc::SIGKILL));
    let (left, orphans) = bpf::leftovers_after_exit(&held, &since).unwrap();
    assert!(
        left.is_empty(),
        "still there after SIGKILL: {:?}",
        left.iter().map(|o| &o.raw).collect::<Vec<_>>()
    );
    assert!(
        orphans.is_empty(),
        "hook objects nobody holds: {:?}",
        orphans.iter().map(|o| &o.raw).collect::<Vec<_>>()
    );
}
