//! What an operator's terminal and pipes get under a flood: output never
//! holds up tracing, floods fold into one line per second while every lost
//! ping still prints, `--quiet`, and one name per namespace everywhere.
//! Needs root; run single-threaded under the dev lock.

use std::{
    collections::BTreeMap,
    io::Read,
    time::{Duration, Instant},
};

use ctdrop_tests::{
    flood::{Flood, FloodKind},
    *,
};
use serde_json::Value;

const MAX: u64 = 64;

/// A pair whose receiver's table is full (see [`full_pair_with_prefix`]).
fn full_pair() -> (Topology, ConntrackMaxGuard) {
    full_pair_with_prefix("ctdout", MAX).unwrap()
}

/// The number in `ctdrop: N <what>` on stderr.
fn stderr_count(stderr: &str, what: &str) -> Option<u64> {
    stderr.lines().find_map(|l| {
        let i = l.find(what)?;
        l[..i].split_whitespace().last()?.parse().ok()
    })
}

#[test]
fn a_stdout_reader_that_stops_reading_does_not_stop_tracing_or_the_duration() {
    const FLOOD: u64 = 40_000;
    let (topo, _max) = full_pair();
    let before = ct_stats(&topo.receiver).unwrap();
    let started = Instant::now();
    let mut ctdrop = Ctdrop::spawn_own_stdout(&[
        "live",
        "--json",
        "--duration",
        "5s",
        "--netns",
        &topo.receiver.name,
    ])
    .unwrap();
    // The reader: holds the pipe open and reads nothing for 20 s.
    let mut pipe = ctdrop.take_stdout().unwrap();
    // ~500 bytes per drop line: 20 MB, far past the pipe and ctdrop's queue.
    let flood = Flood::start(
        &topo.sender,
        topo.receiver_addr,
        FloodKind::Udp,
        Some(FLOOD),
    )
    .unwrap();
    flood.wait().unwrap();
    let after = settled_ct_stats(&topo.receiver, "drop").unwrap();
    let out = ctdrop
        .wait(Duration::from_secs(20))
        .expect("ctdrop did not end while its reader slept");
    let took = started.elapsed();
    assert!(out.status.success(), "{:?}\n{}", out.status, out.stderr);
    // A bound, not a timing: --duration 5s, with a reader asleep for 20 s.
    assert!(
        took < Duration::from_secs(15),
        "ctdrop ended only after {took:?}"
    );
    let unwritten = stderr_count(&out.stderr, "lines of output not written")
        .unwrap_or_else(|| panic!("no unwritten count on stderr:\n{}", out.stderr));
    assert!(unwritten > 0);
    assert!(
        out.stderr.contains("stdout is not being read"),
        "no live warning:\n{}",
        out.stderr
    );
    // Tracing and counting went on: every drop the kernel counted was recorded.
    let recorded = stderr_count(&out.stderr, "drops recorded").unwrap();
    let lost = stderr_count(&out.stderr, "events lost").unwrap();
    let delta = after["drop"] - before["drop"];
    assert!(
        delta >= FLOOD / 2,
        "the flood did not fill the table: {delta}"
    );
    assert_eq!(recorded + lost, delta, "stderr:\n{}", out.stderr);
    // What the reader finally gets is whole JSON lines, and together with
    // the count of unwritten ones it accounts for every drop line.
    let mut text = String::new();
    pipe.read_to_string(&mut text).unwrap();
    let lines = parse_json_lines(&text).expect("the written part is whole JSON lines");
    let written_drops = lines.iter().filter(|l| l["kind"] == "drop").count() as u64;
    assert!(written_drops > 0);
    assert!(
        written_drops + unwritten >= recorded,
        "{written_drops} written + {unwritten} unwritten < {recorded} recorded"
    );
}

/// Clock second (`hh:mm:ss`) of a drop line or fold line; None for others.
fn drop_or_fold_second(l: &str) -> Option<(&str, Option<u64>)> {
    let sec = l.get(..8)?;
    if !(sec.as_bytes()[2] == b':' && sec.as_bytes()[5] == b':') {
        return None;
    }
    if let Some(i) = l.find(" + ") {
        let n = l[i + 3..].split_whitespace().next()?.parse().ok()?;
        return Some((sec, Some(n)));
    }
    l.contains(" ns ").then_some((sec, None))
}

#[test]
fn a_flood_in_human_mode_folds_to_bounded_lines_per_second_and_every_lost_ping_still_prints() {
    let (topo, _max) = full_pair();
    let rx = topo.receiver.inode().unwrap();
    // No traffic yet: every drop from here on happens while ctdrop is attached.
    let before = ct_stats(&topo.receiver).unwrap();
    let ctdrop = Ctdrop::spawn(&[
        "live",
        "--netns",
        &topo.receiver.name,
        "--color",
        "never",
        "--ping",
        &topo.receiver_addr.to_string(),
        "--from-netns",
        &topo.sender.name,
        "--interval",
        "300ms",
    ])
    .unwrap();
    let flood = Flood::start(&topo.sender, topo.receiver_addr, FloodKind::Udp, None).unwrap();
    std::thread::sleep(Duration::from_secs(4));
    flood.stop().unwrap();
    let after = settled_ct_stats(&topo.receiver, "drop").unwrap();
    let out = ctdrop.stop().unwrap();
    assert!(out.status.success(), "{}", out.stderr);
    let delta = after["drop"] - before["drop"];

    let mut per_second: BTreeMap<&str, u64> = BTreeMap::new();
    let (mut single, mut folded, mut fold_lines) = (0u64, 0u64, 0u64);
    for l in out.stdout.lines() {
        if let Some((sec, n)) = drop_or_fold_second(l) {
            *per_second.entry(sec).or_default() += 1;
            match n {
                Some(n) => {
                    folded += n;
                    fold_lines += 1;
                    assert!(
                        l.contains(&format!(
                            "conntrack_table_full in ns {}",
                            topo.receiver.name
                        )),
                        "{l}"
                    );
                    assert!(l.contains(", top port udp/"), "{l}");
                }
                None => single += 1,
            }
        }
    }
    assert!(delta > 10_000, "not a flood: {delta}");
    assert!(fold_lines > 0, "nothing folded:\n{}", out.stdout);
    // Bounded: 10 single lines per (namespace, cause) and second, one fold
    // line, and a second's stragglers drained after the next began.
    for (sec, n) in &per_second {
        assert!(*n <= 25, "{n} drop lines stamped {sec}");
    }
    // Folding loses nothing: single + folded == every drop recorded, and
    // recorded + lost (ring full) == every drop the kernel counted.
    let head = out
        .stdout
        .lines()
        .find(|l| l.starts_with("ctdrop summary:"))
        .expect("summary");
    let num = |what: &str| -> u64 {
        head.split(", ")
            .find(|p| p.ends_with(what) || p.contains(&format!(" {what}")))
            .and_then(|p| p.split_whitespace().next())
            .unwrap()
            .parse()
            .unwrap()
    };
    let (recorded, lost) = (num("drops"), num("events lost"));
    assert_eq!(
        single + folded,
        recorded,
        "single {single} + folded {folded}: {head}"
    );
    // Against the kernel: nothing it dropped went unaccounted (the equality
    // per cause is the conservation tests' job; a stray non-conntrack
    // netfilter drop may add one here).
    assert!(recorded + lost >= delta, "{head}: kernel dropped {delta}");
    // Every lost ping still prints, each with its cause.
    let downs: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| l.contains("  down  "))
        .collect();
    let summary_line = out
        .stdout
        .lines()
        .find(|l| {
            l.trim_start()
                .starts_with(&format!("{}:", topo.receiver_addr))
        })
        .expect("probe summary");
    let pings_lost = lost_in(summary_line);
    assert!(pings_lost >= 5, "{summary_line}");
    assert_eq!(downs.len() as u64, pings_lost, "{}", out.stdout);
    // Each with its cause, unless its drop record was among those the ring
    // lost under the flood (then it says so: no drop seen).
    assert!(
        downs
            .iter()
            .all(|l| l.contains("conntrack_table_full") || l.contains("no drop seen")),
        "{downs:?}"
    );
    if lost == 0 {
        assert!(
            downs.iter().all(|l| l.contains("conntrack_table_full")),
            "{downs:?}"
        );
    }
    // The summary's namespace table uses the name the drop lines use.
    let by_ns = out
        .stdout
        .split("by namespace:")
        .nth(1)
        .expect("namespace table");
    assert!(
        by_ns
            .lines()
            .nth(1)
            .unwrap()
            .trim_start()
            .starts_with(&topo.receiver.name),
        "{by_ns}"
    );
    assert!(!by_ns.lines().nth(1).unwrap().contains(&rx.to_string()));
}

#[test]
fn quiet_and_metrics_without_json_print_no_drop_lines_but_the_pings() {
    let (topo, _max) = full_pair();
    for extra in [&["--quiet"][..], &["--metrics", "127.0.0.1:0"][..]] {
        let mut args = vec![
            "live",
            "--netns",
            &topo.receiver.name,
            "--color",
            "never",
            "--count",
            "3",
            "--interval",
            "200ms",
        ];
        let addr = topo.receiver_addr.to_string();
        args.extend(["--ping", &addr, "--from-netns", &topo.sender.name]);
        args.extend(extra);
        let ctdrop = Ctdrop::spawn(&args).unwrap();
        send_udp_flows(&topo.sender, topo.receiver_addr, 30_000, 200).unwrap();
        let out = ctdrop.wait(Duration::from_secs(30)).unwrap();
        assert!(out.status.success(), "{extra:?}: {}", out.stderr);
        let drop_lines = out
            .stdout
            .lines()
            .filter(|l| drop_or_fold_second(l).is_some())
            .count();
        assert_eq!(
            drop_lines, 0,
            "{extra:?} printed drop lines:\n{}",
            out.stdout
        );
        // Every lost ping prints (early_drop may let one through: count them).
        let probe_line = out
            .stdout
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{addr}: sent")))
            .expect("probe summary");
        let pings_lost = lost_in(probe_line) as usize;
        assert!(pings_lost >= 1, "{probe_line}");
        assert_eq!(
            out.stdout
                .lines()
                .filter(|l| l.contains("  down  "))
                .count(),
            pings_lost,
            "{extra:?}:\n{}",
            out.stdout
        );
        let drops: u64 = out
            .stdout
            .lines()
            .find(|l| l.starts_with("ctdrop summary:"))
            .unwrap()
            .split(", ")
            .nth(1)
            .unwrap()
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            drops >= 150, // 200 flows and pings; early_drop lets a few in
            "{extra:?}: the drops were still counted: {drops}"
        );
    }
}

#[test]
fn a_namespace_has_the_same_name_in_drop_records_summary_and_kernel_counters() {
    let (topo, _max) = full_pair();
    let rx = topo.receiver.inode().unwrap();
    let before = ct_stats(&topo.receiver).unwrap();
    let ctdrop = Ctdrop::spawn(&["live", "--json", "--netns", &topo.receiver.name]).unwrap();
    send_udp_flows(&topo.sender, topo.receiver_addr, 30_000, 50).unwrap();
    let after = settled_ct_stats(&topo.receiver, "drop").unwrap();
    let out = ctdrop.stop().unwrap();
    let drops = out.drops_in(rx);
    // (early_drop now and then makes room for one of the 50 flows)
    assert_eq!(drops.len() as u64, after["drop"] - before["drop"]);
    assert!(drops.len() >= 40);
    assert!(drops
        .iter()
        .all(|d| d["netns_name"] == topo.receiver.name.as_str()));
    let s = out.summary().unwrap();
    assert_eq!(
        s["netns_names"][rx.to_string()],
        topo.receiver.name.as_str(),
        "{s}"
    );
    let k = out.kernel_counters(rx).unwrap().expect("kernel counters");
    assert_eq!(k["netns_name"], topo.receiver.name.as_str());
    let occ: Vec<&Value> = s["occupancy"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o["netns"] == rx)
        .collect();
    assert!(
        occ.iter()
            .all(|o| o["netns_name"] == topo.receiver.name.as_str()),
        "{occ:?}"
    );
    let adv: Vec<&Value> = s["advice"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["netns"] == rx)
        .collect();
    assert!(
        !adv.is_empty()
            && adv
                .iter()
                .all(|a| a["netns_name"] == topo.receiver.name.as_str()),
        "{adv:?}"
    );
}

/// The count after "lost " in a probe summary line.
fn lost_in(line: &str) -> u64 {
    line.split("lost ")
        .nth(1)
        .unwrap()
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}
