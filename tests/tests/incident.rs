//! The foundation incident: pings lost because the conntrack table is full.
//! Needs root. Meant to run single-threaded (tests that change the sysctl
//! also serialize on a flock, and records are matched by namespace inode):
//! `CTDROP_BIN=... cargo test --release -p ctdrop-tests -- --test-threads=1`.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use ctdrop_tests::*;
use serde_json::Value;

const MAX: u64 = 64;

fn as_u64(v: &Value) -> Option<u64> {
    v.as_u64()
}

fn count_by_cause<'a>(recs: impl IntoIterator<Item = &'a Value>) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    for r in recs {
        *m.entry(r["cause"].as_str().unwrap_or("?").to_string())
            .or_default() += 1;
    }
    m
}

/// Waits until `ns`'s stat counter `col` stops moving (packets on a veth
/// are delivered asynchronously), at most 2 s.
fn settle(ns: &Netns, col: &str) -> BTreeMap<String, u64> {
    ctdrop_tests::settled_ct_stats_within(ns, col, Duration::from_secs(2)).unwrap()
}

#[test]
fn table_full_drops_match_kernel_drop_counter_and_explain_each_lost_ping() {
    const N: u16 = 300;
    const M: u16 = 10;
    let topo = Topology::pair().unwrap();
    topo.track_receiver().unwrap();
    let rx = topo.receiver.inode().unwrap();
    let _max = ConntrackMaxGuard::set(MAX).unwrap();

    // Fill the receiver's table: MAX flows get entries, the rest are dropped.
    send_udp_flows(&topo.sender, topo.receiver_addr, 10_000, MAX as u16 + 16).unwrap();
    let before = settle(&topo.receiver, "drop");
    assert_eq!(
        before["entries"], MAX,
        "table not full after the fill: {before:?}"
    );

    // Listeners for the storm's ports: a datagram either arrives or is dropped.
    let sink = UdpSink::bind(
        &topo.receiver,
        topo.receiver_addr,
        (20_000..20_000 + N).collect(),
    )
    .unwrap();

    let ctdrop = Ctdrop::spawn(&["live", "--json"]).unwrap();
    let t0 = Instant::now();
    send_udp_flows(&topo.sender, topo.receiver_addr, 20_000, N).unwrap();
    let probes = ping(
        &topo.sender,
        topo.receiver_addr,
        0x4300,
        M,
        Duration::from_secs(1),
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let after = settle(&topo.receiver, "drop");
    let arrived = sink.received();
    let out = ctdrop.stop().unwrap();
    let traffic_s = t0.elapsed().as_secs_f64();
    out.assert_success();

    let drop_delta = after["drop"] - before["drop"];
    let mine = out.drops_in(rx);
    let full: Vec<&Value> = mine
        .iter()
        .copied()
        .filter(|r| r["cause"] == "conntrack_table_full")
        .collect();
    let lost: Vec<_> = probes.iter().filter(|p| !p.replied).collect();
    eprintln!(
        "receiver netns {rx}: drop +{drop_delta}, early_drop +{}, entries {}; udp arrived {}/{N}, pings lost {}/{M}; \
         ctdrop: {} records there {:?}; traffic+stop {traffic_s:.1}s",
        after["early_drop"] - before["early_drop"],
        after["entries"],
        arrived.len(),
        lost.len(),
        mine.len(),
        count_by_cause(mine.iter().copied()),
    );

    // Every packet sent into the full table either arrived or was counted
    // as a conntrack drop (an early drop can make room now and then).
    let delivered = arrived.len() as u64 + (probes.len() - lost.len()) as u64;
    assert_eq!(
        drop_delta + delivered,
        (N + M) as u64,
        "packets unaccounted for: {before:?} -> {after:?}"
    );
    // The table stayed full: nearly everything was dropped, pings included.
    assert!(
        drop_delta >= (N + M) as u64 * 9 / 10,
        "only {drop_delta} of {} dropped",
        N + M
    );
    assert!(!lost.is_empty(), "no ping was lost");

    // ctdrop: one table-full record per packet the kernel counted, no more.
    assert_eq!(
        full.len() as u64,
        drop_delta,
        "table-full records vs kernel drop counter; by cause {:?}",
        count_by_cause(mine.iter().copied())
    );
    assert_eq!(
        mine.len(),
        full.len(),
        "other records in the receiver: {:?}",
        count_by_cause(mine.iter().copied())
    );

    // The kernel raises its count before checking the limit and lowers it
    // again when the allocation fails, so a sample taken meanwhile reads
    // MAX + (allocations in flight, at most one per CPU): seen as 65/64.
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get() as u64)
        .unwrap_or(1);
    for r in &full {
        let count = as_u64(&r["ct_count"]).unwrap_or_else(|| panic!("no ct_count in {r}"));
        assert!((MAX..=MAX + cpus).contains(&count), "ct_count in {r}");
        assert_eq!(as_u64(&r["ct_max"]), Some(MAX), "ct_max in {r}");
        assert_eq!(r["ifname"], topo.veth.receiver_if.as_str(), "ifname in {r}");
        assert_eq!(
            r["netns_name"],
            topo.receiver.name.as_str(),
            "netns_name in {r}"
        );
        assert_eq!(r["dst"], topo.receiver_addr.to_string(), "dst in {r}");
        assert_eq!(r["src"], topo.sender_addr.to_string(), "src in {r}");
        assert_eq!(r["reason"], "NETFILTER_DROP", "reason in {r}");
        assert_eq!(r["has_ct"], false, "has_ct in {r}");
    }
    // UDP: exactly the ports whose datagram did not arrive, each once.
    let mut ports: Vec<u64> = full
        .iter()
        .filter(|r| r["proto"] == "udp")
        .map(|r| as_u64(&r["dport"]).unwrap())
        .collect();
    ports.sort();
    let n_udp = ports.len();
    let missing: Vec<u64> = (20_000..20_000 + N as u64)
        .filter(|p| !arrived.contains(&(*p as u16)))
        .collect();
    assert_eq!(
        ports, missing,
        "udp records vs datagrams that did not arrive"
    );

    // Each lost ping is explained exactly once; answered pings not at all.
    let icmp: Vec<&Value> = full
        .iter()
        .copied()
        .filter(|r| r["proto"] == "icmp")
        .collect();
    assert_eq!(
        icmp.len() + n_udp,
        full.len(),
        "records neither udp nor icmp"
    );
    for p in &probes {
        let hits = icmp
            .iter()
            .filter(|r| {
                as_u64(&r["icmp_id"]) == Some(p.id as u64)
                    && as_u64(&r["icmp_seq"]) == Some(p.seq as u64)
            })
            .count();
        let want = if p.replied { 0 } else { 1 };
        assert_eq!(
            hits, want,
            "echo id {:#x} seq {} (replied: {}) has {hits} records",
            p.id, p.seq, p.replied
        );
    }
    assert_eq!(icmp.len(), lost.len(), "icmp records vs lost pings");
    assert!(
        icmp.iter().all(|r| as_u64(&r["icmp_type"]) == Some(8)),
        "records of non-echo-request ICMP"
    );

    let summary = out.summary().unwrap();
    assert_eq!(
        as_u64(&summary["events_lost"]),
        Some(0),
        "summary {summary}"
    );
    assert_eq!(
        as_u64(&summary["decode_errors"]),
        Some(0),
        "summary {summary}"
    );
    assert_eq!(
        as_u64(&summary["drops_by_netns"][rx.to_string()]),
        Some(drop_delta),
        "summary {summary}"
    );
    let kc = out
        .kernel_counters(rx)
        .unwrap()
        .unwrap_or_else(|| panic!("no kernel_counters for {rx}: {summary}"));
    assert_eq!(kc["agree"], true, "kernel counters {kc}");
    assert_eq!(
        as_u64(&kc["drop"]),
        Some(drop_delta),
        "kernel counters {kc}"
    );
    assert_eq!(
        as_u64(&kc["table_full_records"]),
        Some(drop_delta),
        "kernel counters {kc}"
    );
}

#[test]
fn filter_rule_drop_is_not_table_full() {
    const N: u16 = 20;
    let topo = Topology::pair().unwrap();
    topo.track_receiver().unwrap();
    topo.receiver
        .exec(&[
            "iptables", "-A", "INPUT", "-p", "udp", "--dport", "5555", "-j", "DROP",
        ])
        .unwrap();
    let rx = topo.receiver.inode().unwrap();
    let before = ct_stats(&topo.receiver).unwrap();

    let ctdrop = Ctdrop::spawn(&["live", "--json"]).unwrap();
    let mut sent = send_udp(&topo.sender, topo.receiver_addr, vec![5555; N as usize]).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let after = ct_stats(&topo.receiver).unwrap();
    let out = ctdrop.stop().unwrap();
    out.assert_success();

    let mine = out.drops_in(rx);
    eprintln!(
        "receiver netns {rx}: drop +{}, entries {}; ctdrop: {:?}",
        after["drop"] - before["drop"],
        after["entries"],
        count_by_cause(mine.iter().copied())
    );
    assert_eq!(
        after["drop"], before["drop"],
        "conntrack itself dropped packets"
    );
    assert_eq!(
        mine.len(),
        N as usize,
        "records in the receiver: {:?}",
        count_by_cause(mine.iter().copied())
    );
    let mut sports = Vec::new();
    for r in &mine {
        assert_eq!(r["cause"], "netfilter_rule", "cause in {r}");
        assert_eq!(r["reason"], "NETFILTER_DROP", "reason in {r}");
        assert_eq!(r["proto"], "udp", "proto in {r}");
        assert_eq!(as_u64(&r["dport"]), Some(5555), "dport in {r}");
        assert_eq!(r["dst"], topo.receiver_addr.to_string(), "dst in {r}");
        assert_eq!(r["ifname"], topo.veth.receiver_if.as_str(), "ifname in {r}");
        assert_eq!(
            r["has_ct"], true,
            "the rule drops after conntrack made an entry: {r}"
        );
        sports.push(as_u64(&r["sport"]).unwrap());
    }
    sports.sort();
    sent.sort();
    assert_eq!(
        sports,
        sent.iter().map(|p| *p as u64).collect::<Vec<_>>(),
        "one record per datagram sent, by source port"
    );
    let summary = out.summary().unwrap();
    // The summary is host-wide (other namespaces may drop meanwhile): look at ours.
    assert_eq!(
        as_u64(&summary["drops_by_netns"][rx.to_string()]),
        Some(N as u64),
        "summary {summary}"
    );
    assert_eq!(
        as_u64(&summary["events_lost"]),
        Some(0),
        "summary {summary}"
    );
    if let Some(kc) = out.kernel_counters(rx).unwrap() {
        assert_eq!(kc["agree"], true, "kernel counters {kc}");
    }
}

#[test]
fn nf_conntrack_max_is_restored_when_the_test_body_panics() {
    let original = {
        // Hold the lock while reading, so no other run is mid-change.
        let g = ConntrackMaxGuard::set(read_conntrack_max().unwrap()).unwrap();
        g.previous()
    };
    let r = std::panic::catch_unwind(|| {
        let _g = ConntrackMaxGuard::set(MAX).unwrap();
        assert_eq!(read_conntrack_max().unwrap(), MAX);
        panic!("deliberate panic (expected in the output) while nf_conntrack_max is {MAX}");
    });
    assert!(r.is_err(), "the body did not panic");
    assert_eq!(
        read_conntrack_max().unwrap(),
        original,
        "not restored after a panic"
    );
    // The lock was released: taking it again does not block.
    let g = ConntrackMaxGuard::set(MAX + 1).unwrap();
    assert_eq!(read_conntrack_max().unwrap(), MAX + 1);
    drop(g);
    assert_eq!(
        read_conntrack_max().unwrap(),
        original,
        "not restored after a normal drop"
    );
}

// ------------------------------------------------------------- bad input

fn short(args: &[&str]) -> CtdropOutput {
    run_ctdrop(&[], args, Duration::from_secs(15)).unwrap()
}

#[test]
fn unknown_flag_exits_2_with_usage_error() {
    let out = short(&["live", "--no-such-flag"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        out.stderr.contains("error:") && out.stderr.contains("--no-such-flag"),
        "stderr: {}",
        out.stderr
    );
    out.assert_clean_error();
}

#[test]
fn missing_btf_exits_1_with_one_line_naming_btf() {
    let out = short(&["live", "--btf", "/nonexistent", "--duration", "2s"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let lines = out.stderr_lines();
    assert_eq!(lines.len(), 1, "stderr: {}", out.stderr);
    assert!(lines[0].starts_with("ctdrop:"), "stderr: {}", out.stderr);
    assert!(
        lines[0].contains("BTF") && lines[0].contains("/nonexistent"),
        "stderr: {}",
        out.stderr
    );
    out.assert_clean_error();
}

#[test]
fn bogus_duration_is_refused_with_a_clear_message() {
    let out = short(&["live", "--duration", "bogus"]);
    assert!(!out.status.success(), "{out:?}");
    assert!(
        out.stderr.contains("duration") && out.stderr.contains("bogus"),
        "stderr: {}",
        out.stderr
    );
    out.assert_clean_error();
}

#[test]
fn ring_size_not_a_power_of_two_is_refused() {
    let out = short(&["live", "--ring-size", "1000", "--duration", "2s"]);
    assert!(!out.status.success(), "{out:?}");
    assert!(
        out.stderr.contains("power of two"),
        "stderr: {}",
        out.stderr
    );
    out.assert_clean_error();
}

#[test]
fn non_root_exits_1_and_says_root_is_needed() {
    let prefix = [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
    ];
    let out = run_ctdrop(
        &prefix,
        &["live", "--duration", "1s"],
        Duration::from_secs(15),
    )
    .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let lines = out.stderr_lines();
    assert_eq!(lines.len(), 1, "stderr: {}", out.stderr);
    assert!(
        lines[0].starts_with("ctdrop:") && lines[0].contains("root"),
        "stderr: {}",
        out.stderr
    );
    out.assert_clean_error();
}
