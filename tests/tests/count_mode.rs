//! `ctdrop live --count-only`: the kernel counts, nothing crosses per drop,
//! and the totals still equal the kernel's own `drop` counter, also after
//! the per-flow map has filled up. Needs root; run single-threaded.

use std::time::{Duration, Instant};

use ctdrop_tests::*;
use serde_json::Value;

const MAX: u64 = 64;
/// More distinct flows than the kernel flow map holds (65536).
const FLOWS: u32 = 75_000;

/// Waits until `ns`'s `drop` counter stops moving, at most 3 s.
fn settled_drops(ns: &Netns) -> u64 {
    let mut last = ct_stats(ns).unwrap()["drop"];
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let now = ct_stats(ns).unwrap()["drop"];
        if now == last || Instant::now() > deadline {
            return now;
        }
        last = now;
    }
}

/// `n` datagrams, each a new flow: destination ports 1..=65535 from one
/// source socket, then again from the next one.
fn send_many_flows(ns: &Netns, dst: std::net::Ipv4Addr, n: u32) {
    in_netns(&ns.path(), move || {
        let mut sent = 0u32;
        while sent < n {
            let sock = std::net::UdpSocket::bind((std::net::Ipv4Addr::UNSPECIFIED, 0))?;
            for port in 1..=u16::MAX {
                if sent == n {
                    break;
                }
                sock.send_to(b"ctdrop-tests count", (dst, port))?;
                sent += 1;
            }
        }
        Ok(())
    })
    .unwrap();
}

/// A sender/receiver pair whose receiver table is full (nf_conntrack_max
/// held at MAX), with its `drop` counter settled: (topology, receiver
/// inode, the guard, the counter).
fn receiver_with_a_full_table() -> (Topology, u32, ConntrackMaxGuard, u64) {
    let topo = Topology::pair().unwrap();
    topo.track_receiver().unwrap();
    let rx = topo.receiver.inode().unwrap();
    let max = ConntrackMaxGuard::set(MAX).unwrap();
    send_udp_flows(&topo.sender, topo.receiver_addr, 10_000, MAX as u16 + 16).unwrap();
    let before = settled_drops(&topo.receiver);
    (topo, rx, max, before)
}

#[test]
fn count_only_totals_equal_kernel_drop_counter_even_past_the_flow_map() {
    let (topo, rx, _max, before) = receiver_with_a_full_table();

    let ctdrop =
        Ctdrop::spawn(&["live", "--json", "--count-only", "--report-every", "200ms"]).unwrap();
    send_many_flows(&topo.sender, topo.receiver_addr, FLOWS);
    let delta = settled_drops(&topo.receiver) - before;
    // An idle machine floods in less than one 200 ms period: let a few
    // periods pass so the run has periodic lines to add up, whatever the
    // flood's speed (a wait, not a timed assertion).
    std::thread::sleep(std::time::Duration::from_secs(1));
    let out = ctdrop.stop().unwrap();
    out.assert_success();
    assert!(
        delta >= FLOWS as u64 * 9 / 10,
        "the table did not stay full: drop +{delta} for {FLOWS} flows"
    );

    // Count mode sends no per-drop records, only periodic counts.
    assert!(out.drops().is_empty(), "drop records in count mode");
    let counts: Vec<&Value> = out
        .records
        .iter()
        .filter(|r| r["kind"] == "counts")
        .collect();
    assert!(
        counts.len() >= 2,
        "expected periodic counts lines, got {}",
        counts.len()
    );

    let summary = out.summary().unwrap();
    let total = summary["drops_total"].as_u64().unwrap();
    let in_rx = summary["drops_by_netns"][rx.to_string()]
        .as_u64()
        .unwrap_or(0);
    assert_eq!(
        in_rx, delta,
        "count-mode drops in the receiver vs kernel drop counter; summary {summary}"
    );
    assert_eq!(
        summary["drops_by_cause"]["conntrack_table_full"].as_u64(),
        Some(in_rx),
        "causes: {}",
        summary["drops_by_cause"]
    );
    let kc = out
        .kernel_counters(rx)
        .unwrap()
        .unwrap_or_else(|| panic!("no kernel_counters for {rx}: {summary}"));
    assert_eq!(kc["agree"], true, "kernel counters {kc}");

    // The periodic lines add up to the total, and each one to its causes.
    let periodic: u64 = counts.iter().map(|c| c["drops"].as_u64().unwrap()).sum();
    assert_eq!(periodic, total, "sum of counts lines vs summary total");
    for c in &counts {
        let by_cause: u64 = c["drops_by_cause"]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_u64().unwrap())
            .sum();
        assert_eq!(by_cause, c["drops"].as_u64().unwrap(), "counts line {c}");
    }

    // The flow map overflowed (more flows than it holds), and says so.
    let stopped = out
        .stderr_lines()
        .into_iter()
        .find(|l| l.starts_with("ctdrop: stopped"))
        .unwrap_or_else(|| panic!("no stopped line: {}", out.stderr))
        .to_string();
    let beyond = number_before(&stopped, " drops in flows beyond the kernel flow map").unwrap();
    assert!(
        beyond > 0,
        "flow map did not overflow with {FLOWS} flows: {stopped}"
    );
    assert_eq!(
        number_before(&stopped, " drops counted"),
        Some(total),
        "{stopped}"
    );
    let top = summary["top_flows"].as_array().unwrap();
    assert!(!top.is_empty(), "no top flows: {summary}");
    assert!(
        top.iter()
            .any(|f| f["dst"] == topo.receiver_addr.to_string()
                && f["cause"] == "conntrack_table_full"),
        "top flows {top:?}"
    );
}

/// The kernel keeps per-flow detail for at most this many flows per CPU
/// (count.rs: 4-way sets in a per-CPU array); beyond it drops are counted
/// only in the totals.
fn kernel_flow_bound() -> u64 {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1) as u64;
    tracer_common::FLOW_SETS as u64 * tracer_common::SET_WAYS as u64 * cpus
}

#[test]
fn count_only_totals_equal_kernel_drop_counter_under_a_new_flow_flood_past_every_flow_bound() {
    let bound = kernel_flow_bound();
    // Twice what all CPUs together could keep per flow, so the per-flow
    // path overflows on every CPU whatever the spread.
    let flows = (2 * bound).max(FLOWS as u64) as u32;
    let (topo, rx, _max, before) = receiver_with_a_full_table();

    // Only the receiver's drops: other namespaces on the machine stay out
    // of the per-flow arithmetic below.
    let ctdrop = Ctdrop::spawn(&[
        "live",
        "--json",
        "--count-only",
        "--netns",
        &rx.to_string(),
        "--report-every",
        "500ms",
    ])
    .unwrap();
    send_many_flows(&topo.sender, topo.receiver_addr, flows);
    let delta = settled_drops(&topo.receiver) - before;
    let out = ctdrop.stop().unwrap();
    out.assert_success();
    assert!(
        delta >= flows as u64 * 9 / 10,
        "the table did not stay full: drop +{delta} for {flows} flows"
    );

    let summary = out.summary().unwrap();
    let total = summary["drops_total"].as_u64().unwrap();
    assert_eq!(
        total, delta,
        "count-mode total vs the receiver's kernel drop counter; summary {summary}"
    );
    assert_eq!(
        summary["drops_by_cause"]["conntrack_table_full"].as_u64(),
        Some(delta),
        "causes: {}",
        summary["drops_by_cause"]
    );

    let stopped = out
        .stderr_lines()
        .into_iter()
        .find(|l| l.starts_with("ctdrop: stopped"))
        .unwrap_or_else(|| panic!("no stopped line: {}", out.stderr))
        .to_string();
    let tracked = number_before(&stopped, " flows tracked").unwrap();
    let beyond = number_before(&stopped, " drops in flows beyond the kernel flow map").unwrap();
    assert!(
        tracked <= bound,
        "{tracked} flows kept in detail, bound {bound}: {stopped}"
    );
    assert!(
        beyond > 0,
        "no drop past the per-flow bound with {flows} flows: {stopped}"
    );
    // Every flow of the flood is one packet: each drop is either in a kept
    // flow or counted as beyond the bound, never in neither or both. (A
    // later sending socket may get an earlier one's port: each such reuse
    // can make one kept flow two packets.)
    let reuses = (flows as u64).div_ceil(u16::MAX as u64) - 1;
    assert!(
        tracked + beyond <= total && tracked + beyond + reuses >= total,
        "flows kept {tracked} + drops beyond {beyond} vs total {total}: {stopped}"
    );
}

#[test]
fn count_only_refuses_probes_with_a_usage_error() {
    let out = run_ctdrop(
        &[],
        &["live", "--count-only", "--ping", "198.18.0.1"],
        Duration::from_secs(15),
    )
    .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        out.stderr.contains("--count-only") && out.stderr.contains("--ping"),
        "stderr: {}",
        out.stderr
    );
    assert!(
        out.stdout.trim().is_empty(),
        "stdout on error: {}",
        out.stdout
    );
}

/// The integer just before `suffix` in `line`.
fn number_before(line: &str, suffix: &str) -> Option<u64> {
    let head = &line[..line.find(suffix)?];
    let start = head
        .rfind(|c: char| !c.is_ascii_digit())
        .map(|i| i + 1)
        .unwrap_or(0);
    head[start..].parse().ok()
}
