//! The filters an operator expects, run in the kernel: repeatable --host
//! with CIDR prefixes (IPv4 and IPv6), repeatable --port, --ifname, and
//! --netns as a name, a path or a PID; each checked exactly against the
//! kernel's own drop counter. Nonexistent namespaces, interfaces and
//! inodes are refused in one line. Needs root; run single-threaded under
//! the dev lock.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    time::Duration,
};

use ctdrop_tests::*;
use serde_json::Value;

const MAX: u64 = 64;

/// Receiver tracked, global max at 64, table full from a fill.
fn fill(topo: &Topology) {
    send_udp_flows(&topo.sender, topo.receiver_addr, 10_000, MAX as u16 + 16).unwrap();
    let s = settled_ct_stats(&topo.receiver, "drop").unwrap();
    assert_eq!(s["entries"], MAX, "table not full after the fill: {s:?}");
}

/// One datagram per destination port, each from its own socket bound to
/// `src` (a new flow each), from inside `ns`.
fn send_from(ns: &Netns, src: IpAddr, dst: IpAddr, dports: Vec<u16>) {
    in_netns(&ns.path(), move || {
        let mut socks = Vec::new();
        for p in dports {
            let s = UdpSocket::bind(SocketAddr::new(src, 0))?;
            s.send_to(b"ctdrop-tests udp", SocketAddr::new(dst, p))?;
            socks.push(s);
        }
        Ok(())
    })
    .unwrap();
}

/// What a filtered ctdrop saw, next to an unfiltered one watching the
/// receiver at the same time, and the receiver's kernel `drop` increase.
struct Traced {
    recs: Vec<Value>,
    reference: Vec<Value>,
    delta: u64,
}

/// Runs `ctdrop live --json <filters>` and, as the reference, `ctdrop live
/// --json --netns <receiver>` around `traffic`. The reference must hold
/// exactly the kernel's count (early_drop now and then makes room for a
/// flow, so the count is read, not assumed).
fn traced(topo: &Topology, filters: &[&str], traffic: impl FnOnce()) -> Traced {
    let rx = topo.receiver.inode().unwrap();
    let mut args = vec!["live", "--json"];
    args.extend_from_slice(filters);
    let before = ct_stats(&topo.receiver).unwrap();
    let filtered = Ctdrop::spawn(&args).unwrap();
    let reference = Ctdrop::spawn(&["live", "--json", "--netns", &rx.to_string()]).unwrap();
    traffic();
    let after = settled_ct_stats(&topo.receiver, "drop").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let (out, refout) = (filtered.stop().unwrap(), reference.stop().unwrap());
    assert!(out.status.success(), "{}", out.stderr);
    let delta = after["drop"] - before["drop"];
    let reference: Vec<Value> = refout.drops_in(rx).into_iter().cloned().collect();
    assert_eq!(
        reference.len() as u64,
        delta,
        "the unfiltered reference disagrees with the kernel"
    );
    Traced {
        recs: out.drops().into_iter().cloned().collect(),
        reference,
        delta,
    }
}

type Key = (String, String, u64, u64);

fn port_of(r: &Value) -> u16 {
    r["dport"].as_u64().unwrap_or(0) as u16
}

fn key(r: &Value) -> Key {
    (
        r["src"].as_str().unwrap_or("").into(),
        r["dst"].as_str().unwrap_or("").into(),
        r["sport"].as_u64().unwrap_or(0),
        r["dport"].as_u64().unwrap_or(0),
    )
}

/// The filtered records are exactly the reference's records that `pred`
/// selects, one for one; returns how many.
fn selects(t: &Traced, pred: impl Fn(&Value) -> bool) -> usize {
    let mut want: Vec<Key> = t.reference.iter().filter(|r| pred(r)).map(key).collect();
    let mut got: Vec<Key> = t.recs.iter().map(key).collect();
    want.sort();
    got.sort();
    assert_eq!(
        got, want,
        "filtered records differ from the selected reference records"
    );
    got.len()
}

#[test]
fn repeated_ports_select_exactly_their_drops() {
    let topo = Topology::pair_with_prefix("ctdflt").unwrap();
    topo.track_receiver().unwrap();
    let _max = ConntrackMaxGuard::set(MAX).unwrap();
    fill(&topo);
    let rx = topo.receiver.inode().unwrap();
    let ns = rx.to_string();
    let t = traced(
        &topo,
        &["--netns", &ns, "--port", "7001", "--port", "7002"],
        || {
            send_udp(
                &topo.sender,
                topo.receiver_addr,
                [vec![7001; 30], vec![7002; 20], vec![7003; 25]].concat(),
            )
            .unwrap();
        },
    );
    assert!(t.delta >= 70, "the table was not full: {}", t.delta);
    let n = selects(&t, |r| port_of(r) == 7001 || port_of(r) == 7002);
    assert!(
        n >= 45 && (n as u64) < t.delta,
        "ports 7001 and 7002 only: {n} of {}",
        t.delta
    );
}

#[test]
fn ipv4_prefixes_and_addresses_select_exactly_their_sources() {
    let topo = Topology::pair_with_prefix("ctdflt").unwrap();
    topo.track_receiver().unwrap();
    // A second source address on the sender, in another /24 of 198.18.0.0/15.
    let o = topo.sender_addr.octets();
    let alias = Ipv4Addr::new(198, 19, o[2], 1);
    topo.sender
        .exec(&[
            "ip",
            "addr",
            "add",
            &format!("{alias}/32"),
            "dev",
            &topo.veth.sender_if,
        ])
        .unwrap();
    let _max = ConntrackMaxGuard::set(MAX).unwrap();
    fill(&topo);
    let dst = IpAddr::V4(topo.receiver_addr);
    let traffic = || {
        send_from(
            &topo.sender,
            IpAddr::V4(topo.sender_addr),
            dst,
            vec![7100; 30],
        );
        send_from(&topo.sender, IpAddr::V4(alias), dst, vec![7100; 20]);
    };
    let name = topo.receiver.name.clone();
    let prefix = format!("198.19.{}.0/24", o[2]);
    let alias_s = alias.to_string();
    let t = traced(&topo, &["--netns", &name, "--host", &prefix], traffic);
    let n = selects(&t, |r| r["src"] == alias_s.as_str());
    assert!(
        n >= 15 && (n as u64) < t.delta,
        "only the /24 of the alias: {n} of {}",
        t.delta
    );
    // Repeated: the prefix or the primary address (a /32): everything.
    let primary = topo.sender_addr.to_string();
    let t = traced(
        &topo,
        &["--netns", &name, "--host", &prefix, "--host", &primary],
        traffic,
    );
    assert_eq!(selects(&t, |_| true) as u64, t.delta);
    // A prefix holding neither: nothing, while the kernel still drops.
    let t = traced(
        &topo,
        &["--netns", &name, "--host", "198.19.255.0/24"],
        traffic,
    );
    assert_eq!(selects(&t, |_| false), 0);
    assert!(t.delta >= 45);
}

#[test]
fn an_ipv6_prefix_selects_exactly_the_ipv6_drops() {
    let topo = Topology::pair_with_prefix("ctdflt").unwrap();
    topo.track_receiver().unwrap();
    topo.receiver
        .accept_ct("ip6tables", "INPUT", "ESTABLISHED,RELATED")
        .unwrap();
    // IPv6 benchmarking addresses (RFC 5180, 2001:2::/48), no DAD, no router solicitations.
    let n = topo.sender_addr.octets()[2] as u16;
    let (s6, r6) = (
        Ipv6Addr::new(0x2001, 2, 0, n, 0, 0, 0, 1),
        Ipv6Addr::new(0x2001, 2, 0, n, 0, 0, 0, 2),
    );
    for ns in [&topo.sender, &topo.receiver] {
        ns.exec(&["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=0"])
            .unwrap();
    }
    topo.add_ipv6(s6, r6).unwrap();
    let _max = ConntrackMaxGuard::set(MAX).unwrap();
    fill(&topo);
    // Link-local chatter (MLD) after enabling IPv6 settles first.
    std::thread::sleep(Duration::from_secs(2));
    settled_ct_stats(&topo.receiver, "drop").unwrap();
    let name = topo.receiver.name.clone();
    let prefix = format!("2001:2:0:{n:x}::/64");
    let t = traced(&topo, &["--netns", &name, "--host", &prefix], || {
        send_from(
            &topo.sender,
            IpAddr::V4(topo.sender_addr),
            IpAddr::V4(topo.receiver_addr),
            vec![7200; 30],
        );
        send_from(&topo.sender, IpAddr::V6(s6), IpAddr::V6(r6), vec![7200; 25]);
    });
    let s6s = s6.to_string();
    let n = selects(&t, |r| r["src"] == s6s.as_str());
    assert!(
        n >= 20 && (n as u64) < t.delta,
        "only the IPv6 flows: {n} of {}",
        t.delta
    );
    assert!(t.recs.iter().all(|r| r["cause"] == "conntrack_table_full"));
}

#[test]
fn ifname_selects_exactly_the_drops_on_that_interface() {
    let topo = Topology::pair_with_prefix("ctdflt").unwrap();
    topo.track_receiver().unwrap();
    // A second link between the same two namespaces, on its own subnet.
    // (VethPair names every pair ctdt-tx/ctdt-rx: this one needs its own.)
    let second = VethPair {
        sender_if: "ctdf-tx2".into(),
        receiver_if: "ctdf-rx2".into(),
    };
    run(&[
        "ip",
        "link",
        "add",
        &second.sender_if,
        "netns",
        &topo.sender.name,
        "type",
        "veth",
        "peer",
        "name",
        &second.receiver_if,
        "netns",
        &topo.receiver.name,
    ])
    .unwrap();
    let k = topo.sender_addr.octets()[2];
    let (s2, r2) = (Ipv4Addr::new(198, 19, k, 1), Ipv4Addr::new(198, 19, k, 2));
    for (ns, dev, a) in [
        (&topo.sender, &second.sender_if, s2),
        (&topo.receiver, &second.receiver_if, r2),
    ] {
        ns.exec(&["ip", "addr", "add", &format!("{a}/24"), "dev", dev])
            .unwrap();
        ns.exec(&["ip", "link", "set", dev, "up"]).unwrap();
    }
    let _max = ConntrackMaxGuard::set(MAX).unwrap();
    fill(&topo);
    let traffic = || {
        send_udp(&topo.sender, topo.receiver_addr, vec![7300; 30]).unwrap();
        send_udp(&topo.sender, r2, vec![7300; 20]).unwrap();
    };
    // Without --netns the name is looked up in every named namespace.
    let t = traced(&topo, &["--ifname", &second.receiver_if], traffic);
    let n = selects(&t, |r| r["ifname"] == second.receiver_if.as_str());
    assert!(
        n >= 15 && (n as u64) < t.delta,
        "only the second link: {n} of {}",
        t.delta
    );
    assert!(t.recs.iter().all(|r| r["dst"] == r2.to_string().as_str()));
    let name = topo.receiver.name.clone();
    let t = traced(
        &topo,
        &[
            "--netns",
            &name,
            "--ifname",
            &second.receiver_if,
            "--ifname",
            &topo.veth.receiver_if,
        ],
        traffic,
    );
    assert_eq!(selects(&t, |_| true) as u64, t.delta);
}

#[test]
fn netns_as_a_path_and_as_a_pid_each_select_exactly_their_namespace() {
    let a = Topology::pair_with_prefix("ctdflt").unwrap();
    let b = Topology::pair_with_prefix("ctdflt").unwrap();
    a.track_receiver().unwrap();
    b.track_receiver().unwrap();
    let _max = ConntrackMaxGuard::set(MAX).unwrap();
    fill(&a);
    fill(&b);
    // A process living in b's receiver namespace: --netns PID.
    let mut holder = std::process::Command::new("ip")
        .args(["netns", "exec", &b.receiver.name, "sleep", "60"])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let pid = holder.id().to_string();
    let path = a.receiver.path().to_str().unwrap().to_string();
    let before_a = ct_stats(&a.receiver).unwrap();
    let before_b = ct_stats(&b.receiver).unwrap();
    let ctdrop = Ctdrop::spawn(&["live", "--json", "--netns", &path, "--netns", &pid]).unwrap();
    send_udp(&a.sender, a.receiver_addr, vec![7400; 30]).unwrap();
    send_udp(&b.sender, b.receiver_addr, vec![7400; 20]).unwrap();
    let after_a = settled_ct_stats(&a.receiver, "drop").unwrap();
    let after_b = settled_ct_stats(&b.receiver, "drop").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let out = ctdrop.stop().unwrap();
    let _ = holder.kill();
    let _ = holder.wait();
    assert!(out.status.success(), "{}", out.stderr);
    let (ia, ib) = (a.receiver.inode().unwrap(), b.receiver.inode().unwrap());
    let (da, db) = (
        after_a["drop"] - before_a["drop"],
        after_b["drop"] - before_b["drop"],
    );
    // Not 30 and 20: a fill entry that times out (or is evicted) lets a
    // packet through; the kernel's counters say how many were dropped.
    assert!(da > 0 && db > 0, "both namespaces dropped: {da}, {db}");
    assert_eq!(out.drops_in(ia).len() as u64, da);
    assert_eq!(out.drops_in(ib).len() as u64, db);
    assert_eq!(
        out.drops().len() as u64,
        da + db,
        "nothing from any other namespace"
    );
}

#[test]
fn nonexistent_namespaces_interfaces_and_inodes_are_refused_in_one_line() {
    for (args, says) in [
        (
            &["--netns", "4026999999"][..],
            "no network namespace with inode 4026999999",
        ),
        (&["--netns", "4194000"][..], "no process 4194000"),
        (
            &["--netns", "ctdflt-no-such-ns"][..],
            "no network namespace named",
        ),
        (
            &["--netns", "/proc/self/ns/mnt"][..],
            "is not a network namespace",
        ),
        (
            &["--netns", "/nonexistent/ns"][..],
            "cannot open network namespace",
        ),
        (
            &["--ifname", "nosuch0"][..],
            "no interface named \"nosuch0\"",
        ),
        (&["--host", "198.18.0.0/33"][..], "bad prefix length"),
    ] {
        let mut full = vec!["live", "--duration", "1s"];
        full.extend_from_slice(args);
        let out = std::process::Command::new(ctdrop_bin())
            .args(&full)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(out.stdout.is_empty(), "{args:?} printed on stdout");
        assert!(err.contains(says), "{args:?}: {err}");
        assert!(
            !err.contains("attached"),
            "{args:?} attached before refusing: {err}"
        );
    }
}
