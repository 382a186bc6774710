//! `ctdrop live --count-only`: the kernel counts, nothing crosses per drop,
//! and the totals still equal the kernel's own `drop` counter, also after
//! the per-flow map has filled up and whether per-flow detail is sampled
//! (the default, `--flow-sample 16`) or taken from every drop
//! (`--flow-sample 1`). Needs root; run single-threaded.

use std::time::{Duration, Instant};

use ctdrop_tests::{
    mixed::{self, Scene},
    *,
};
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

    // Per-flow detail from every drop: the flow map overflows.
    let ctdrop = Ctdrop::spawn(&[
        "live",
        "--json",
        "--count-only",
        "--flow-sample",
        "1",
        "--report-every",
        "200ms",
    ])
    .unwrap();
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
    let stopped = stopped_line(&out);
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
    // Every drop in the flows: counts, not estimates.
    assert_eq!(summary["flow_sampling"]["estimated"], false, "{summary}");
    let top = summary["top_flows"].as_array().unwrap();
    assert!(!top.is_empty(), "no top flows: {summary}");
    assert!(
        top.iter().all(|f| f.get("sampled_drops").is_none()),
        "{top:?}"
    );
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

/// The stopped line's account of per-flow detail under sampling: (flows
/// tracked, drops sampled, sampled drops beyond the kernel flow map).
fn sampled_flow_words(out: &CtdropOutput, one_in: u32) -> (u64, u64, u64) {
    let stopped = stopped_line(out);
    let n = |suffix: &str| {
        number_before(&stopped, suffix).unwrap_or_else(|| panic!("no {suffix:?}: {stopped}"))
    };
    assert!(
        stopped.contains(&format!(
            "(flow counts are estimates: sampled counts x {one_in})"
        )),
        "{stopped}"
    );
    (
        n(" flows tracked"),
        n(&format!(" drops sampled 1 in {one_in}")),
        n(" sampled drops in flows beyond the kernel flow map"),
    )
}

#[test]
fn count_only_totals_equal_kernel_drop_counter_under_a_new_flow_flood_past_every_flow_bound() {
    let bound = kernel_flow_bound();
    // 1 drop in 4 reaches the per-flow path: twice what all CPUs together
    // could keep per flow, after sampling, so it overflows on every CPU
    // whatever the spread.
    const ONE_IN: u32 = 4;
    let flows = (2 * bound * ONE_IN as u64).max(FLOWS as u64) as u32;
    let (topo, rx, _max, before) = receiver_with_a_full_table();

    // Only the receiver's drops: other namespaces on the machine stay out
    // of the per-flow arithmetic below.
    let ctdrop = Ctdrop::spawn(&[
        "live",
        "--json",
        "--count-only",
        "--flow-sample",
        &ONE_IN.to_string(),
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

    let (tracked, sampled, beyond) = sampled_flow_words(&out, ONE_IN);
    assert_eq!(
        summary["flow_sampling"]["sampled_drops"].as_u64(),
        Some(sampled),
        "{summary}"
    );
    // 1 in 4 on average, drawn at random: far inside a factor of two over
    // this many drops.
    assert!(
        sampled >= total / (2 * ONE_IN as u64) && sampled <= 2 * total / ONE_IN as u64,
        "{sampled} drops sampled of {total} at 1 in {ONE_IN}"
    );
    assert!(
        tracked <= bound,
        "{tracked} flows kept in detail, bound {bound}"
    );
    assert!(
        beyond > 0,
        "no sampled drop past the per-flow bound with {flows} flows"
    );
    // Every flow of the flood is one packet: each sampled drop is either in
    // a kept flow or counted as beyond the bound, never in neither or both.
    // (A later sending socket may get an earlier one's port: each such
    // reuse can make one kept flow two packets.)
    let reuses = (flows as u64).div_ceil(u16::MAX as u64) - 1;
    assert!(
        tracked + beyond <= sampled && tracked + beyond + reuses >= sampled,
        "flows kept {tracked} + sampled drops beyond {beyond} vs sampled {sampled}"
    );
}

/// The raw-table rule of [`full_table_and_a_drop_rule`] drops every
/// datagram to this port, before conntrack.
const HEAVY_PORT: u16 = 9000;

/// From `ns`: `flows` datagrams each to a new flow (as [`send_many_flows`],
/// skipping the ports the rule drops) and, after every `every`-th, one more from one
/// other socket to `HEAVY_PORT`: one heavy flow among many light ones.
/// Returns the heavy flow's source port.
fn send_flows_and_a_heavy_one(ns: &Netns, dst: std::net::Ipv4Addr, flows: u32, every: u32) -> u16 {
    in_netns(&ns.path(), move || {
        let heavy = std::net::UdpSocket::bind((std::net::Ipv4Addr::UNSPECIFIED, 0))?;
        let mut sent = 0u32;
        while sent < flows {
            let sock = std::net::UdpSocket::bind((std::net::Ipv4Addr::UNSPECIFIED, 0))?;
            for port in (1..=u16::MAX).filter(|p| !mixed::RULED.contains(p)) {
                if sent == flows {
                    break;
                }
                sock.send_to(b"ctdrop-tests count", (dst, port))?;
                sent += 1;
                if sent.is_multiple_of(every) {
                    heavy.send_to(b"ctdrop-tests heavy", (dst, HEAVY_PORT))?;
                }
            }
        }
        Ok(heavy.local_addr()?.port())
    })
    .unwrap()
}

/// A receiver whose table is full and whose raw table drops UDP to ports
/// 9000-9999, [`HEAVY_PORT`] among them (the scene of tests/src/mixed.rs):
/// a heavy flow's true drop count is then the rule's counter (a table-full
/// drop of it could turn into an entry whenever early_drop evicts one for
/// it). (scene, guard, `drop` counter, rule counter.)
fn full_table_and_a_drop_rule() -> (Scene, ConntrackMaxGuard, u64, u64) {
    let scene = Scene::new(false);
    assert!(mixed::RULED.contains(&HEAVY_PORT));
    let max = ConntrackMaxGuard::set(MAX).unwrap();
    scene.fill();
    let before = settled_drops(&scene.topo.receiver);
    let rule = scene.rule_packets();
    (scene, max, before, rule)
}

/// `ctdrop live --json --count-only` on namespace `rx` only, with `extra`.
fn count_only_in(rx: u32, extra: &[&str]) -> Ctdrop {
    let ns = rx.to_string();
    let mut args = vec!["live", "--json", "--count-only", "--netns", &ns];
    args.extend_from_slice(extra);
    Ctdrop::spawn(&args).unwrap()
}

#[test]
fn count_only_names_a_heavy_flow_from_its_sampled_drops() {
    const FLOWS: u32 = 40_000;
    const EVERY: u32 = 4;
    const ONE_IN: u64 = tracer_common::DEFAULT_FLOW_SAMPLE as u64;
    let (scene, _max, before, rule_before) = full_table_and_a_drop_rule();
    let (topo, rx) = (&scene.topo, scene.rx);

    // Default sampling; fewer flows kept in userspace than were sampled, so
    // the kept ones must be the heaviest.
    let ctdrop = count_only_in(rx, &["--max-flows", "200"]);
    let heavy_sport = send_flows_and_a_heavy_one(&topo.sender, topo.receiver_addr, FLOWS, EVERY);
    let delta = settled_drops(&topo.receiver) - before;
    let heavy = scene.rule_packets() - rule_before;
    let out = ctdrop.stop().unwrap();
    out.assert_success();
    assert_eq!(
        heavy,
        (FLOWS / EVERY) as u64,
        "rule drops of the heavy flow"
    );

    // Totals: every drop, of both kinds.
    let summary = out.summary().unwrap();
    let total = summary["drops_total"].as_u64().unwrap();
    assert_eq!(
        total,
        delta + heavy,
        "count-mode total vs the kernel's drop counter +{delta} and rule counter +{heavy}; summary {summary}"
    );

    let fs = &summary["flow_sampling"];
    assert_eq!(fs["one_in"].as_u64(), Some(ONE_IN), "{summary}");
    assert_eq!(fs["estimated"], true, "{summary}");
    let sampled = fs["sampled_drops"].as_u64().unwrap();
    assert!(
        sampled >= total / (2 * ONE_IN) && sampled <= 2 * total / ONE_IN,
        "{sampled} drops sampled of {total} at 1 in {ONE_IN}"
    );
    assert!(
        summary["flows_untracked"].as_u64().unwrap() > 0,
        "more sampled flows than --max-flows 200, none beyond: {summary}"
    );

    // The heavy flow leads, named, its estimate its sampled drops x 16 and
    // near its true count (~625 drops sampled of 10,000 at 1 in 16: the
    // factor of two is many standard deviations).
    let top = &summary["top_flows"][0];
    assert_eq!(top["dst"], topo.receiver_addr.to_string(), "{top}");
    assert_eq!(top["dport"].as_u64(), Some(HEAVY_PORT as u64), "{top}");
    assert_eq!(top["sport"].as_u64(), Some(heavy_sport as u64), "{top}");
    let est = top["drops"].as_u64().unwrap();
    let its_sampled = top["sampled_drops"].as_u64().unwrap();
    assert_eq!(est, its_sampled * ONE_IN, "{top}");
    assert!(
        est >= heavy / 2 && est <= heavy * 2,
        "heavy flow estimated at {est} drops, {heavy} dropped: {top}"
    );
    let (_, sampled_line, _) = sampled_flow_words(&out, ONE_IN as u32);
    assert_eq!(sampled_line, sampled);
    eprintln!(
        "heavy flow: {heavy} dropped, estimated {est} ({its_sampled} sampled); {sampled} of {total} drops sampled"
    );
}

#[test]
fn count_only_with_a_port_filter_counts_exactly_that_ports_drops() {
    // A filter on ports reads every drop's record (the group's fields do
    // not hold ports): the other count path, with the same sampling.
    let (scene, _max, _, rule_before) = full_table_and_a_drop_rule();
    let (topo, rx) = (&scene.topo, scene.rx);
    let ctdrop = count_only_in(rx, &["--port", &HEAVY_PORT.to_string()]);
    let heavy_sport = send_flows_and_a_heavy_one(&topo.sender, topo.receiver_addr, 20_000, 2);
    settled_drops(&topo.receiver);
    let heavy = scene.rule_packets() - rule_before;
    let out = ctdrop.stop().unwrap();
    out.assert_success();
    assert_eq!(heavy, 10_000, "rule drops of the heavy flow");

    // Only the port's drops, all of them; the table-full flood beside
    // them (other ports) not at all.
    let summary = out.summary().unwrap();
    assert_eq!(summary["drops_total"].as_u64(), Some(heavy), "{summary}");
    assert_eq!(summary["flows_tracked"].as_u64(), Some(1), "{summary}");
    let top = &summary["top_flows"][0];
    assert_eq!(top["dport"].as_u64(), Some(HEAVY_PORT as u64), "{top}");
    assert_eq!(top["sport"].as_u64(), Some(heavy_sport as u64), "{top}");
    let est = top["drops"].as_u64().unwrap();
    assert!(
        top["sampled_drops"].as_u64().is_some() && est >= heavy / 2 && est <= heavy * 2,
        "heavy flow estimated at {est} drops, {heavy} dropped: {top}"
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

/// ctdrop's last stderr line, `ctdrop: stopped after ...`.
fn stopped_line(out: &CtdropOutput) -> String {
    out.stderr_lines()
        .into_iter()
        .find(|l| l.starts_with("ctdrop: stopped"))
        .unwrap_or_else(|| panic!("no stopped line: {}", out.stderr))
        .to_string()
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
