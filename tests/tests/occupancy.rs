//! Who fills the table, what to change, and proof the change worked.
//! Needs root; run single-threaded like the other integration tests.
//! Namespaces here are named `ctdo-*`.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, TcpListener, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use ctdrop_tests::*;
use serde_json::Value;

const PREFIX: &str = "ctdo";
/// The "stateless" service whose flows fill the table.
const P: u16 = 5353;

/// A UDP socket inside a namespace that counts what reaches it, and never
/// answers (so the flows stay UNREPLIED).
struct Counter(UdpSocket);

impl Counter {
    fn bind(ns: &Netns, addr: Ipv4Addr, port: u16) -> Counter {
        let s = in_netns(&ns.path(), move || {
            let s = UdpSocket::bind((addr, port))?;
            s.set_nonblocking(true)?;
            Ok(s)
        })
        .unwrap();
        Counter(s)
    }

    /// Datagrams received since the last call, waiting until `want` came
    /// or nothing more arrives for a while (delivery is asynchronous).
    fn take(&self, want: u64) -> u64 {
        let mut n = 0;
        let mut buf = [0u8; 2048];
        let mut quiet_since = Instant::now();
        while n < want && quiet_since.elapsed() < Duration::from_millis(500) {
            match self.0.recv_from(&mut buf) {
                Ok(_) => {
                    n += 1;
                    quiet_since = Instant::now();
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        n
    }
}

/// M established TCP connections from `client` to `server`: each handshake
/// is completed and one byte goes each way, so the entries are ASSURED.
/// Returns the streams; the connections last as long as they do.
fn tcp_connections(topo: &Topology, port: u16, m: usize) -> (Vec<TcpStream>, Vec<TcpStream>) {
    let addr = topo.receiver_addr;
    let listener = in_netns(&topo.receiver.path(), move || {
        Ok(TcpListener::bind((addr, port))?)
    })
    .unwrap();
    let server = std::thread::spawn(move || {
        (0..m)
            .map(|_| {
                let (mut s, _) = listener.accept().unwrap();
                let mut b = [0u8; 1];
                s.read_exact(&mut b).unwrap();
                s.write_all(b"y").unwrap();
                s
            })
            .collect::<Vec<_>>()
    });
    let clients = in_netns(&topo.sender.path(), move || {
        let mut v = Vec::new();
        for _ in 0..m {
            let mut s = TcpStream::connect((addr, port))?;
            s.write_all(b"x")?;
            let mut b = [0u8; 1];
            s.read_exact(&mut b)?;
            v.push(s);
        }
        Ok(v)
    })
    .unwrap();
    (clients, server.join().unwrap())
}

/// `ctdrop check --json --occupancy --netns NS`, killed after `secs`.
fn check_occupancy(ns: &Netns, secs: u64) -> CtdropOutput {
    run_ctdrop(
        &[],
        &["check", "--json", "--occupancy", "--netns", &ns.name],
        Duration::from_secs(secs),
    )
    .unwrap()
}

fn occupancy_of(out: &CtdropOutput) -> Value {
    let rec = out
        .records
        .iter()
        .find(|r| r["kind"] == "check")
        .unwrap_or_else(|| panic!("no check record: {}", out.stdout));
    rec["occupancy"][0].clone()
}

fn advice<'a>(list: &'a Value, topic: &str) -> Option<&'a Value> {
    list.as_array()?.iter().find(|a| a["topic"] == topic)
}

/// Command lines of an advice item's `run` steps, as argv vectors.
fn run_steps(a: &Value) -> Vec<Vec<String>> {
    a["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["kind"] == "run")
        .map(|s| {
            s["argv"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_str().unwrap().to_string())
                .collect()
        })
        .collect()
}

fn row(rows: &Value, f: impl Fn(&Value) -> bool) -> &Value {
    rows.as_array()
        .unwrap()
        .iter()
        .find(|r| f(r))
        .unwrap_or_else(|| panic!("no such row in {rows}"))
}

#[test]
fn occupancy_counts_unreplied_udp_and_assured_tcp_exactly_and_advice_names_the_port() {
    const N: usize = 40;
    const M: usize = 5;
    let topo = Topology::pair_with_prefix(PREFIX).unwrap();
    topo.track_receiver().unwrap();
    let _sink = Counter::bind(&topo.receiver, topo.receiver_addr, P);
    send_udp(&topo.sender, topo.receiver_addr, vec![P; N]).unwrap();
    let _tcp = tcp_connections(&topo, 8080, M);
    // 45 entries in a 50-entry table: near full (advice starts at 80%).
    let _max = ConntrackMaxGuard::set(50).unwrap();

    let out = check_occupancy(&topo.receiver, 60);
    assert!(out.status.success(), "check failed: {}", out.stderr);
    let o = occupancy_of(&out);
    let kernel = ct_stats(&topo.receiver).unwrap();

    assert_eq!(o["netns_name"], topo.receiver.name.as_str());
    assert_eq!(o["entries"], (N + M) as u64, "{o}");
    assert_eq!(
        kernel["entries"],
        (N + M) as u64,
        "the kernel's own count differs: {kernel:?}"
    );
    assert_eq!(o["unreplied"], N as u64);
    assert_eq!(o["assured"], M as u64);
    assert_eq!(o["unreadable"], 0);
    let udp = row(&o["by_proto_state"], |r| r["proto"] == "udp");
    assert_eq!(
        (
            udp["state"].as_str(),
            udp["entries"].as_u64(),
            udp["unreplied"].as_u64()
        ),
        (Some("UNREPLIED"), Some(N as u64), Some(N as u64))
    );
    let tcp = row(&o["by_proto_state"], |r| r["proto"] == "tcp");
    assert_eq!(
        (
            tcp["state"].as_str(),
            tcp["entries"].as_u64(),
            tcp["assured"].as_u64()
        ),
        (Some("ESTABLISHED"), Some(M as u64), Some(M as u64))
    );
    let top_port = &o["top_dst_ports"][0];
    assert_eq!(
        (
            top_port["proto"].as_str(),
            top_port["port"].as_u64(),
            top_port["entries"].as_u64()
        ),
        (Some("udp"), Some(P as u64), Some(N as u64))
    );
    assert_eq!(top_port["sources"], 1);
    assert_eq!(o["top_sources"][0]["addr"], topo.sender_addr.to_string());
    assert_eq!(o["top_sources"][0]["entries"], (N + M) as u64);
    assert_eq!(
        o["top_destinations"][0]["addr"],
        topo.receiver_addr.to_string()
    );
    assert_eq!(o["nat_rules"], false);

    let adv = &o["advice"];
    // One source holds every entry: named first, with the rules to limit it.
    let src = advice(adv, "limit_origin").expect("advice to limit the one source");
    assert_eq!(src["values"]["source"], topo.sender_addr.to_string());
    assert_eq!(
        adv[0]["topic"], "limit_origin",
        "the source comes before any limit: {adv}"
    );
    // Sized from the answered connections, not from the unanswered flood.
    let cap = advice(adv, "capacity").expect("capacity advice");
    assert_eq!(cap["values"]["legit_entries"], M as u64, "{cap}");
    assert_eq!(cap["values"]["change_needed"], false, "{cap}");
    let nt = advice(adv, "notrack").expect("NOTRACK advice");
    let lines: Vec<String> = run_steps(nt).iter().map(|a| a.join(" ")).collect();
    assert!(
        lines.contains(&format!(
            "iptables -t raw -A PREROUTING -p udp --dport {P} -j NOTRACK"
        )),
        "{lines:?}"
    );
    assert!(
        lines.contains(&format!(
            "iptables -t raw -A OUTPUT -p udp --sport {P} -j NOTRACK"
        )),
        "{lines:?}"
    );
    // The assured TCP service is stateful: never advised away.
    assert!(!lines.iter().any(|l| l.contains("8080")), "{lines:?}");
    // The nft form is valid for this kernel (checked, not applied).
    let script = nt["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["kind"] == "nft")
        .unwrap()["script"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(script.contains(&format!("udp dport {P} notrack")));
    let file = std::env::temp_dir().join(format!("ctdo-{}.nft", std::process::id()));
    std::fs::write(&file, &script).unwrap();
    let checked = topo
        .receiver
        .exec(&["nft", "-c", "-f", file.to_str().unwrap()]);
    let _ = std::fs::remove_file(&file);
    checked.expect("nft rejects the advised script");
    // Human output of the same check, for an operator at 80 columns.
    let human = std::process::Command::new(ctdrop_bin())
        .args(["check", "--occupancy", "--netns", &topo.receiver.name])
        .output()
        .unwrap();
    assert!(human.status.success());
    let human = String::from_utf8(human.stdout).unwrap();
    let from = human.find("conntrack table in").expect("occupancy section");
    for l in human[from..].lines() {
        assert!(l.chars().count() <= 80, "wider than 80 columns: {l:?}");
    }
}

#[test]
fn applying_the_advised_notrack_rules_stops_table_full_drops() {
    const FLOWS: usize = 100;
    let topo = Topology::pair_with_prefix(PREFIX).unwrap();
    topo.track_receiver().unwrap();
    let rx = topo.receiver.inode().unwrap();
    let counter = Counter::bind(&topo.receiver, topo.receiver_addr, P);
    let _max = ConntrackMaxGuard::set(64).unwrap();

    // Before: the flood fills the table and the rest is turned away.
    let before = ct_stats(&topo.receiver).unwrap();
    let live = Ctdrop::spawn(&["live", "--json", "--netns", &topo.receiver.name]).unwrap();
    send_udp(&topo.sender, topo.receiver_addr, vec![P; FLOWS]).unwrap();
    let arrived = counter.take(FLOWS as u64);
    let out = live.stop().unwrap();
    let after = ct_stats(&topo.receiver).unwrap();
    let dropped = (after["drop"] - before["drop"]) as usize;
    assert!(dropped > 0, "the flood did not fill the table: {after:?}");
    assert_eq!(arrived as usize + dropped, FLOWS);
    let full = out
        .drops_in(rx)
        .iter()
        .filter(|d| d["cause"] == "conntrack_table_full")
        .count();
    assert_eq!(full, dropped, "ctdrop and the kernel disagree");

    let s = out.summary().unwrap();
    let occ = s["occupancy"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["netns"] == rx)
        .expect("a snapshot of the full table");
    assert_eq!(occ["top_dst_ports"][0]["port"], P);
    let nt = advice(&s["advice"], "notrack")
        .unwrap_or_else(|| panic!("no NOTRACK advice: {}", s["advice"]));
    assert_eq!(nt["netns"], rx);
    // A flood from one source: limit it, do not size the table from it.
    let src = advice(&s["advice"], "limit_origin")
        .unwrap_or_else(|| panic!("no source advice: {}", s["advice"]));
    assert_eq!(src["values"]["source"], topo.sender_addr.to_string());
    let cap = advice(&s["advice"], "capacity").unwrap();
    assert_eq!(cap["values"]["change_needed"], false, "{cap}");

    // Apply exactly what was advised, in the namespace it was advised for.
    for argv in run_steps(nt) {
        let args: Vec<&str> = argv.iter().map(String::as_str).collect();
        let r = topo.receiver.exec(&args);
        // conntrack -D says "0 flow entries" with a failing status when a
        // port has nothing left to delete; the iptables rules must apply.
        if args[0] == "iptables" {
            r.unwrap();
        }
    }

    // After: the same flood, with fresh source ports, all delivered.
    let before = ct_stats(&topo.receiver).unwrap();
    let live = Ctdrop::spawn(&["live", "--json", "--netns", &topo.receiver.name]).unwrap();
    send_udp(&topo.sender, topo.receiver_addr, vec![P; FLOWS]).unwrap();
    let arrived = counter.take(FLOWS as u64);
    let out = live.stop().unwrap();
    let after = ct_stats(&topo.receiver).unwrap();
    assert_eq!(arrived as usize, FLOWS, "untracked flood not delivered");
    assert_eq!(
        after["drop"] - before["drop"],
        0,
        "the kernel still drops: {after:?}"
    );
    assert_eq!(
        out.drops_in(rx).len(),
        0,
        "ctdrop still sees drops: {:?}",
        out.drops_in(rx)
    );
    assert!(out.summary().unwrap()["occupancy"]
        .as_array()
        .unwrap()
        .is_empty());
    // The new flows took no entries: tracked, 36 of them would have found
    // the table full.
    assert!(after["entries"] < 64, "{after:?}");
}

#[test]
fn frag_needed_dropped_by_a_filter_rule_is_icmp_error_blocked() {
    // sender -- router -- far, the router's far link at MTU 1280: a
    // 1400-byte datagram with DF set makes the router answer "fragmentation
    // needed", which the sender's filter drops.
    let sender = Netns::with_prefix(PREFIX).unwrap();
    let router = Netns::with_prefix(PREFIX).unwrap();
    let far = Netns::with_prefix(PREFIX).unwrap();
    let n = (next_id() % 200) as u8 + 20;
    let (s_addr, r1) = (format!("198.19.{n}.1"), format!("198.19.{n}.2"));
    let (r2, f_addr) = (format!("198.19.{}.1", n + 1), format!("198.19.{}.2", n + 1));
    VethPair::create_named(&sender, "ctdo-s", &router, "ctdo-r1").unwrap();
    VethPair::create_named(&router, "ctdo-r2", &far, "ctdo-f").unwrap();
    for (ns, dev, addr, mtu) in [
        (&sender, "ctdo-s", &s_addr, "1500"),
        (&router, "ctdo-r1", &r1, "1500"),
        (&router, "ctdo-r2", &r2, "1280"),
        (&far, "ctdo-f", &f_addr, "1280"),
    ] {
        ns.exec(&["ip", "addr", "add", &format!("{addr}/24"), "dev", dev])
            .unwrap();
        ns.exec(&["ip", "link", "set", dev, "mtu", mtu, "up"])
            .unwrap();
    }
    sender
        .exec(&["ip", "route", "add", "default", "via", &r1])
        .unwrap();
    far.exec(&["ip", "route", "add", "default", "via", &r2])
        .unwrap();
    router
        .exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        .unwrap();
    // The chapter's second case: someone "disabled ICMP".
    sender
        .exec(&[
            "iptables",
            "-A",
            "INPUT",
            "-p",
            "icmp",
            "--icmp-type",
            "fragmentation-needed",
            "-j",
            "DROP",
        ])
        .unwrap();
    let s_ino = sender.inode().unwrap();

    let live = Ctdrop::spawn(&["live", "--json", "--netns", &sender.name]).unwrap();
    let dst: Ipv4Addr = f_addr.parse().unwrap();
    in_netns(&sender.path(), move || {
        let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
        let on: libc::c_int = libc::IP_PMTUDISC_DO;
        unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&s),
                libc::IPPROTO_IP,
                libc::IP_MTU_DISCOVER,
                &on as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        for _ in 0..3 {
            s.send_to(&[0u8; 1400], (dst, 9))?;
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    })
    .unwrap();
    // The rule's own packet counter is the kernel's account of the drops.
    let rule_hits = || -> u64 {
        let t = sender
            .exec(&["iptables", "-L", "INPUT", "-v", "-x", "-n"])
            .unwrap();
        t.lines()
            .find(|l| l.contains("DROP"))
            .and_then(|l| l.split_whitespace().next()?.parse().ok())
            .unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(2);
    while rule_hits() == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = live.stop().unwrap();
    let hits = rule_hits();
    assert!(hits >= 1, "no frag-needed reached the sender");
    let blocked: Vec<&Value> = out
        .drops_in(s_ino)
        .into_iter()
        .filter(|d| d["cause"] == "icmp_error_blocked")
        .collect();
    assert_eq!(
        blocked.len() as u64,
        hits,
        "ctdrop {:?} vs rule counter {hits}",
        out.drops_in(s_ino)
    );
    for d in &blocked {
        assert_eq!(
            (d["icmp_type"].as_u64(), d["icmp_code"].as_u64()),
            (Some(3), Some(4))
        );
        assert_eq!(d["src"], r1.as_str());
    }
    let s = out.summary().unwrap();
    assert_eq!(s["drops_by_cause"]["icmp_error_blocked"], hits);
    let w = advice(&s["advice"], "icmp_error_blocked")
        .unwrap_or_else(|| panic!("no warning: {}", s["advice"]));
    assert_eq!(w["cause"], "icmp_error_blocked");
    assert!(w["headline"]
        .as_str()
        .unwrap()
        .contains("path-MTU discovery"));
}

#[test]
fn a_full_size_table_is_counted_entry_for_entry() {
    // 262144 is the default nf_conntrack_max here; the guard keeps anyone
    // from lowering it while the table fills.
    const FULL: u64 = 262_144;
    let topo = Topology::pair_with_prefix(PREFIX).unwrap();
    topo.track_receiver().unwrap();
    let _max = ConntrackMaxGuard::set(FULL).unwrap();
    let dst = topo.receiver_addr;
    // One flow per (source socket, destination port): five sockets cover
    // 262144 flows without 262144 file descriptors.
    in_netns(&topo.sender.path(), move || {
        let mut left = FULL;
        while left > 0 {
            let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
            for port in 1..=65535u16 {
                if left == 0 {
                    break;
                }
                // A refused port may make a later send fail: that flow
                // still got its entry on the way out.
                let _ = s.send_to(b"f", (dst, port));
                left -= 1;
            }
        }
        Ok(())
    })
    .unwrap();
    // Let the veth deliver what is queued before comparing counts.
    let mut kernel = ct_stats(&topo.receiver).unwrap()["entries"];
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let now = ct_stats(&topo.receiver).unwrap()["entries"];
        if now == kernel {
            break;
        }
        kernel = now;
    }
    assert!(
        kernel >= FULL * 9 / 10,
        "only {kernel} entries after the fill"
    );
    let out = check_occupancy(&topo.receiver, 120);
    assert!(out.status.success(), "{}", out.stderr);
    let o = occupancy_of(&out);
    assert_eq!(o["entries"], kernel, "snapshot vs the kernel's own count");
    assert_eq!(o["unreplied"], kernel);
    assert_eq!(o["unreadable"], 0);
    assert_eq!(o["top_sources"][0]["entries"], kernel);
    assert_eq!(o["top_dst_ports"].as_array().unwrap().len(), 5);
    // Speed is measured, not asserted (cargo xtask bench owns timing).
    eprintln!(
        "full table: {kernel} entries read in {} ms ({} ms CPU)",
        o["elapsed_ms"], o["cpu_ms"]
    );
}

#[test]
fn nat_in_the_namespace_is_named_and_conntrack_kept() {
    let topo = Topology::pair_with_prefix(PREFIX).unwrap();
    topo.track_receiver().unwrap();
    // Port 5353 is redirected: NAT needs conntrack for these flows.
    topo.receiver
        .exec(&[
            "iptables",
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-p",
            "udp",
            "--dport",
            &P.to_string(),
            "-j",
            "REDIRECT",
            "--to-ports",
            "5354",
        ])
        .unwrap();
    let _sink = Counter::bind(&topo.receiver, topo.receiver_addr, 5354);
    send_udp(&topo.sender, topo.receiver_addr, vec![P; 10]).unwrap();
    let out = check_occupancy(&topo.receiver, 60);
    let o = occupancy_of(&out);
    assert_eq!(o["entries"], 10);
    assert_eq!(o["nat"], 10, "{o}");
    assert_eq!(o["nat_rules"], true);
    let nat =
        advice(&o["advice"], "nat").unwrap_or_else(|| panic!("no NAT advice: {}", o["advice"]));
    assert!(
        nat["headline"]
            .as_str()
            .unwrap()
            .contains("conntrack cannot be disabled"),
        "{nat}"
    );
}

#[test]
fn count_mode_snapshots_the_full_table_and_advises_too() {
    const FLOWS: usize = 100;
    let topo = Topology::pair_with_prefix(PREFIX).unwrap();
    topo.track_receiver().unwrap();
    let rx = topo.receiver.inode().unwrap();
    let _sink = Counter::bind(&topo.receiver, topo.receiver_addr, P);
    let _max = ConntrackMaxGuard::set(64).unwrap();
    let before = ct_stats(&topo.receiver).unwrap();
    let live = Ctdrop::spawn(&[
        "live",
        "--json",
        "--count-only",
        "--report-every",
        "200ms",
        "--netns",
        &topo.receiver.name,
    ])
    .unwrap();
    send_udp(&topo.sender, topo.receiver_addr, vec![P; FLOWS]).unwrap();
    // A report period has to see the drops before the stop.
    let deadline = Instant::now() + Duration::from_secs(3);
    while ct_stats(&topo.receiver).unwrap()["drop"] == before["drop"] && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    let out = live.stop().unwrap();
    let after = ct_stats(&topo.receiver).unwrap();
    let dropped = after["drop"] - before["drop"];
    assert!(dropped > 0);
    let s = out.summary().unwrap();
    assert_eq!(s["drops_by_cause"]["conntrack_table_full"], dropped);
    let occ = s["occupancy"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["netns"] == rx)
        .unwrap_or_else(|| panic!("no snapshot: {s}"));
    assert_eq!(occ["top_dst_ports"][0]["port"], P);
    assert_eq!(
        occ["top_dst_ports"][0]["unreplied"],
        occ["top_dst_ports"][0]["entries"]
    );
    let nt = advice(&s["advice"], "notrack")
        .unwrap_or_else(|| panic!("no NOTRACK advice: {}", s["advice"]));
    assert!(run_steps(nt)
        .iter()
        .any(|a| a.join(" ")
            == format!("iptables -t raw -A PREROUTING -p udp --dport {P} -j NOTRACK")));
    let cap = advice(&s["advice"], "capacity").unwrap();
    assert!(
        cap["values"]["recommended_max"].as_u64().unwrap()
            >= cap["values"]["observed_peak"].as_u64().unwrap()
    );
    // The flood's unanswered entries and dropped packets are not demand.
    assert!(
        cap["values"]["observed_peak"].as_u64().unwrap() < 64,
        "{cap}"
    );
    assert!(
        advice(&s["advice"], "limit_origin").is_some(),
        "{}",
        s["advice"]
    );
    assert!(
        out.records.iter().any(|r| r["kind"] == "occupancy"),
        "no occupancy line in the stream"
    );
}

#[test]
fn report_of_a_one_source_flood_capture_names_the_source_and_sizes_from_entries_held() {
    const FLOWS: usize = 100;
    let topo = Topology::pair_with_prefix(PREFIX).unwrap();
    topo.track_receiver().unwrap();
    let rx = topo.receiver.inode().unwrap();
    let _sink = Counter::bind(&topo.receiver, topo.receiver_addr, P);
    let file =
        std::env::temp_dir().join(format!("ctdo-{}-{}.ctdrop", std::process::id(), next_id()));
    let file_s = file.to_str().unwrap().to_string();
    let (dropped, turned_away) = {
        let _max = ConntrackMaxGuard::set(64).unwrap();
        let before = ct_stats(&topo.receiver).unwrap();
        let cap = Ctdrop::spawn(&[
            "capture",
            "-o",
            &file_s,
            "--json",
            "--netns",
            &topo.receiver.name,
        ])
        .unwrap();
        let ports = send_udp(&topo.sender, topo.receiver_addr, vec![P; FLOWS]).unwrap();
        std::thread::sleep(Duration::from_millis(500));
        let out = cap.stop().unwrap();
        assert!(out.status.success(), "{}", out.stderr);
        let dropped = ct_stats(&topo.receiver).unwrap()["drop"] - before["drop"];
        // One datagram per source port: every drop was a distinct flow.
        assert_eq!(ports.len(), FLOWS);
        (dropped, dropped)
    };
    assert!(dropped > 0);
    let json = std::process::Command::new(ctdrop_bin())
        .args(["report", &file_s, "--format", "json"])
        .output()
        .unwrap();
    let text = std::process::Command::new(ctdrop_bin())
        .args(["report", &file_s])
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&file);
    assert!(
        json.status.success(),
        "{}",
        String::from_utf8_lossy(&json.stderr)
    );
    // The report is one pretty-printed JSON document.
    let r: Value = serde_json::from_slice(&json.stdout).unwrap();
    let cap = advice(&r["advice"], "capacity")
        .unwrap_or_else(|| panic!("no capacity advice: {}", r["advice"]));
    assert_eq!(cap["netns"], rx);
    assert_eq!(cap["values"]["current_max"], 64);
    assert_eq!(cap["values"]["turned_away_flows"], turned_away);
    // The sender holds every entry (the capture keeps the snapshot taken
    // when the table filled): limit it first. The table is sized from the
    // entries legitimately held (none: all are the flood's unanswered
    // ones), not from 64 + the dropped flood packets: no raise.
    let src = advice(&r["advice"], "limit_origin")
        .unwrap_or_else(|| panic!("no source advice: {}", r["advice"]));
    assert_eq!(src["values"]["source"], topo.sender_addr.to_string());
    assert_eq!(
        (
            src["values"]["share_of"].as_str(),
            src["values"]["count"].as_u64(),
            src["values"]["of"].as_u64()
        ),
        (Some("entries"), Some(64), Some(64)),
        "{}",
        r["advice"]
    );
    assert_eq!(
        r["advice"][0]["topic"], "limit_origin",
        "the source comes first: {}",
        r["advice"]
    );
    assert_eq!(cap["values"]["legit_entries"], 0, "{cap}");
    assert_eq!(cap["values"]["change_needed"], false, "{cap}");
    assert_eq!(cap["values"]["recommended_max"], 64, "{cap}");
    let text = String::from_utf8(text.stdout).unwrap();
    assert!(
        text.contains("advice:") && text.contains("[limit_origin]") && text.contains("[capacity]"),
        "{text}"
    );
}
