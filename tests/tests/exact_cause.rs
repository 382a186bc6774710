//! Exact cause per packet on the tracepoint tier (issue #13): conntrack's
//! own drops against rule drops of entry-less packets, interleaved in one
//! namespace, judged record by record against the port each packet was
//! sent to. Needs root; run single-threaded under the dev lock.

use std::{collections::BTreeMap, time::Duration};

use ctdrop_tests::{
    bpf, clash, ct_stats,
    mixed::{self, judge, send_mixed, Scene, MAX},
    settled_ct_stats, ConntrackMaxGuard, Ctdrop, Netns, Topology,
};

fn mixed(v6: bool) {
    let s = Scene::new(v6);
    let _max = ConntrackMaxGuard::set(MAX).unwrap();
    s.fill();
    let ctdrop = Ctdrop::spawn(&["live", "--json"]).unwrap();
    let m = s.mixed_round();
    let out = ctdrop.stop_drained();
    let (flood, ruled) = m.sent;
    eprintln!("sent {flood} flood + {ruled} ruled datagrams");
    let wrong = s.judge(&out, &m);
    assert!(
        m.drop_delta > 1000 && m.rule_delta == ruled,
        "the scene did not happen: {:?} -> {:?}",
        m.before,
        m.after
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
    let out = ctdrop.stop_drained();
    eprintln!("sent {fa:?} and {fb:?}");
    let wa = judge(&a, &out, aa["drop"] - ba["drop"], ra2 - ra);
    let wb = judge(&b, &out, ab["drop"] - bb["drop"], rb2 - rb);
    assert_eq!(
        (wa, wb),
        (0, 0),
        "records whose cause is not their packet's"
    );
}

/// Started while a flood of table-full drops is under way: none may be
/// called a rule drop, and all but a few in flight at the attach instant
/// rest on the mechanism's own evidence (`evidence`), not the totals.
fn started_during_a_flood(args: &[&str], evidence: &str) {
    let (rx, out) = mixed::ctdrop_started_during_a_flood(args);
    let causes = mixed::assert_flood_all_table_full(rx, &out);
    let mine = out.drops_in(rx);
    let inferred = mine.iter().filter(|r| r["evidence"] != evidence).count();
    eprintln!("{causes:?}; {inferred} not decided by {evidence}");
    assert!(
        inferred <= 16,
        "{inferred} records not decided by {evidence}"
    );
}

#[test]
fn ctdrop_started_during_a_flood_never_calls_a_table_full_drop_a_rule() {
    // The counters' seeds move while the flood runs: the first drop on
    // each CPU is left to the totals, every later one is decided.
    started_during_a_flood(&["live", "--json"], "cpu_counter:drop");
}

#[test]
fn with_hook_marks_started_during_a_flood_never_calls_a_table_full_drop_a_rule() {
    // The hooks were in before kfree_skb: a few marks in flight at the
    // attach instant may be left to the counters; a consumer attached
    // first would leave many.
    started_during_a_flood(
        &["live", "--json", "--mode", "netfilter-hook"],
        "hook:conntrack_in",
    );
}

/// Insert clashes (TCP, no clash resolution) in the sender: each record is
/// an insert failure, as many as the kernel's `insert_failed` rose.
fn insert_clash(args: &[&str], evidence: &str) {
    insert_clash_by(args, evidence, |t| {
        clash::race_until_insert_failed(&t.sender, t.sender_addr, t.receiver_addr, 80, 20)
    })
}

fn insert_clash_by(
    args: &[&str],
    evidence: &str,
    scene: impl FnOnce(&Topology) -> anyhow::Result<()>,
) {
    let t = Topology::pair().unwrap();
    // Conntrack on in the sender: its OUTPUT creates, POSTROUTING confirms.
    t.sender.accept_ct("iptables", "OUTPUT", "NEW").unwrap();
    let tx = t.sender.inode().unwrap();
    let c = Ctdrop::spawn(args).unwrap();
    let before = ct_stats(&t.sender).unwrap();
    scene(&t).unwrap();
    let after = settled_ct_stats(&t.sender, "insert_failed").unwrap();
    let out = c.stop_drained();
    let failed = after["insert_failed"] - before["insert_failed"];
    let mine = out.drops_in(tx);
    let causes = mixed::by_cause(mine.iter().copied());
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
        assert_eq!(r["evidence"], evidence, "{r}");
        assert_eq!(
            (r["proto"].as_str(), r["dport"].as_u64()),
            (Some("tcp"), Some(80)),
            "{r}"
        );
    }
}

#[test]
fn insert_clash_drops_are_named_insert_failed_per_packet() {
    insert_clash(&["live", "--json"], "cpu_counter:insert_failed");
}

#[test]
fn with_hook_marks_insert_clash_drops_are_named_insert_failed_per_packet() {
    insert_clash(
        &["live", "--json", "--mode", "netfilter-hook"],
        "hook:conntrack_confirm",
    );
}

/// The insert clashes of an inline IPS (an NFQUEUE reader in POSTROUTING):
/// confirm runs in `nf_reinject` after the verdict, which frees the loser
/// as NOT_SPECIFIED, not NETFILTER_DROP. Ten clashes made on purpose,
/// and five SYNs the queue refuses, freed the same way with an
/// unconfirmed entry: no record of theirs may appear.
fn queued_insert_clash(args: &[&str], evidence: &str) {
    insert_clash_by(args, evidence, |t| {
        clash::held_clashes(t, 80, 2000, 10, 5)?;
        let failed = ct_stats(&t.sender)?["insert_failed"];
        anyhow::ensure!(failed == 10, "10 held pairs made {failed} clashes");
        Ok(())
    });
}

#[test]
fn insert_clashes_after_an_nfqueue_verdict_are_named_insert_failed_per_packet() {
    queued_insert_clash(&["live", "--json"], "cpu_counter:insert_failed");
}

#[test]
fn with_hook_marks_insert_clashes_after_an_nfqueue_verdict_are_named_per_packet() {
    queued_insert_clash(
        &["live", "--json", "--mode", "netfilter-hook"],
        "hook:conntrack_confirm",
    );
}

#[test]
fn sigkill_leaves_no_hook_link_program_or_map() {
    let _ns = Netns::new().unwrap();
    let since = bpf::high_water().unwrap();
    let ctdrop = Ctdrop::spawn(&["live", "--json", "--mode", "netfilter-hook"]).unwrap();
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
    let (left, orphans) = bpf::wait_released(&held, &since, Duration::from_secs(10)).unwrap();
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

#[test]
fn a_namespace_created_after_start_gets_marks_and_exact_causes() {
    let ctdrop = Ctdrop::spawn(&["live", "--json", "--mode", "netfilter-hook"]).unwrap();
    let s = Scene::new(false);
    let _max = ConntrackMaxGuard::set(MAX).unwrap();
    // The watcher says when the new namespace is covered (bounded wait).
    let line = format!("marks attached in new network namespace {}", s.rx);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !ctdrop.stderr_so_far().contains(&line) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        ctdrop.stderr_so_far().contains(&line),
        "no hook marks in the new namespace: {}",
        ctdrop.stderr_so_far()
    );
    let undecided = judge_new_namespace(ctdrop, &s, "hook:");
    assert_eq!(undecided, 0, "records not decided by a mark");
}

#[test]
fn a_namespace_created_after_start_gets_exact_causes_from_its_counters() {
    let ctdrop = Ctdrop::spawn(&["live", "--json"]).unwrap();
    let s = Scene::new(false);
    let _max = ConntrackMaxGuard::set(MAX).unwrap();
    // No seed for it: its first conntrack drop on each CPU finds the
    // counter already moved and is left to the totals; all others are
    // decided by the counters.
    let undecided = judge_new_namespace(ctdrop, &s, "cpu_counter:");
    let cpus = std::thread::available_parallelism().unwrap().get();
    assert!(
        undecided <= cpus,
        "{undecided} records not decided by the counters ({cpus} CPUs)"
    );
}

/// Fills the new namespace's table and sends the mixed round, all judged
/// per record; returns how many records rest on other evidence than
/// `evidence` (a prefix).
fn judge_new_namespace(ctdrop: Ctdrop, s: &Scene, evidence: &str) -> usize {
    // Everything from here on, the fill's own overflow included, is judged.
    let m = s.measure(|| {
        s.fill();
        send_mixed(&s.topo.sender.path(), s.dst)
    });
    let out = ctdrop.stop_drained();
    let wrong = s.judge(&out, &m);
    assert_eq!(wrong, 0, "records whose cause is not their packet's");
    out.drops_in(s.rx)
        .iter()
        .filter(|r| {
            !r["evidence"]
                .as_str()
                .is_some_and(|e| e.starts_with(evidence))
        })
        .count()
}

/// Without marks or per-CPU counters (`--mode tracepoint` where the
/// counters cannot be read, as CTDROP_CPU_STAT=off pretends) the totals
/// decide among mixed candidates: totals stay exact, and every such record
/// says so.
#[test]
fn without_marks_each_budget_decided_record_says_so_and_is_counted() {
    let s = Scene::new(false);
    let _max = ConntrackMaxGuard::set(MAX).unwrap();
    s.fill();
    let ctdrop = Ctdrop::spawn_env(
        &["live", "--json", "--mode", "tracepoint"],
        &[("CTDROP_CPU_STAT", "off")],
    )
    .unwrap();
    let m = s.mixed_round();
    let out = ctdrop.stop_drained();
    // The wrong records of the inference are the point of issue #13; here
    // only their honesty is checked.
    let wrong = s.judge(&out, &m);
    eprintln!("--mode tracepoint: {wrong} records carry the other packet's cause");
    let mine = out.drops_in(s.rx);
    let budget = mine
        .iter()
        .filter(|r| r["evidence"] == "inferred:drop_counter")
        .count() as u64;
    assert_eq!(
        budget,
        mine.len() as u64,
        "records decided by budget without saying so"
    );
    let summary = out.summary().unwrap();
    assert!(
        summary["inferred_by_budget"].as_u64().unwrap() >= budget,
        "summary: {}",
        summary["inferred_by_budget"]
    );
}

#[test]
fn check_names_the_cpu_counters_and_mode_can_force_the_hooks_or_the_totals() {
    let run = |args: &[&str], env: &[(&str, &str)]| -> serde_json::Value {
        let out = std::process::Command::new(ctdrop_tests::ctdrop_bin())
            .args(args)
            .envs(env.iter().copied())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let mechanism = |v: &serde_json::Value, signal: &str| -> String {
        let m = v["mechanisms"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["signal"] == signal)
            .unwrap();
        m["mechanism"].as_str().unwrap_or("none").to_string()
    };
    let auto = run(&["check", "--json"], &[]);
    assert_eq!(auto["tier"], "tracepoint+cpu-counters", "{auto}");
    for signal in ["table_full", "insert_failed", "conntrack_in"] {
        assert!(
            mechanism(&auto, signal).starts_with("tp_btf/kfree_skb reads"),
            "{signal}: {auto}"
        );
    }
    let forced = run(&["check", "--json", "--mode", "netfilter-hook"], &[]);
    assert_eq!(forced["tier"], "tracepoint+netfilter-hook");
    for signal in ["table_full", "insert_failed", "conntrack_in"] {
        assert!(
            mechanism(&forced, signal).starts_with("bpf netfilter hooks"),
            "{signal}: {forced}"
        );
    }
    // Without the counters, auto falls back to the hooks...
    let off = [("CTDROP_CPU_STAT", "off")];
    let fallback = run(&["check", "--json"], &off);
    assert_eq!(fallback["tier"], "tracepoint+netfilter-hook", "{fallback}");
    // ...and --mode tracepoint to the totals.
    let refused = run(&["check", "--json", "--mode", "tracepoint"], &off);
    assert_eq!(refused["tier"], "tracepoint");
    assert!(
        mechanism(&refused, "table_full").starts_with("inferred"),
        "{refused}"
    );
    assert_eq!(mechanism(&refused, "insert_failed"), "none");
}

/// Pins the calling thread to one CPU.
fn pin_to(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET writes inside it; the
    // call only reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set),
            0,
            "sched_setaffinity"
        );
    }
}

/// The per-CPU counters' one soft spot, provoked: a task's own table-full
/// drops (LOCAL_OUT, process context, CPU 1) while RPS steers rule drops of
/// the same namespace to a softirq on CPU 1, which an IPI can start right
/// between conntrack's counter increment and the free. Each record is
/// judged; the totals must be exact whatever happens (a nested swap keeps
/// them), and the swaps, if any, are counted and printed.
#[test]
fn task_table_full_drops_under_softirq_rule_drops_on_one_cpu() {
    // SAFETY: sysconf has no preconditions.
    if unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) } < 2 {
        eprintln!("one CPU: no IPI nesting to provoke");
        return;
    }
    let s = Scene::new(false);
    s.topo
        .receiver
        .exec(&[
            "sh",
            "-c",
            &format!(
                "echo 2 > /sys/class/net/{}/queues/rx-0/rps_cpus",
                s.topo.veth.receiver_if
            ),
        ])
        .unwrap();
    // Outgoing new flows from the receiver go through its conntrack too.
    s.topo
        .receiver
        .accept_ct("iptables", "OUTPUT", "NEW,ESTABLISHED,RELATED")
        .unwrap();
    let _max = ConntrackMaxGuard::set(MAX).unwrap();
    s.fill();
    let ctdrop = Ctdrop::spawn(&["live", "--json"]).unwrap();
    let (rx_path, back) = (s.topo.receiver.path(), s.topo.sender_addr);
    let m = s.measure(|| {
        let own = std::thread::spawn(move || {
            pin_to(1);
            ctdrop_tests::in_netns(&rx_path, move || {
                let sock = std::net::UdpSocket::bind("0.0.0.0:0")?;
                let mut sent = 0u64;
                for _ in 0..6 {
                    for port in mixed::FLOOD {
                        // EPERM: conntrack dropped it in OUTPUT, as meant.
                        let _ = sock.send_to(b"ctdrop-tests own", (back, port));
                        sent += 1;
                    }
                }
                Ok(sent)
            })
            .unwrap()
        });
        let path = s.topo.sender.path();
        let dst = s.dst;
        let ruled = std::thread::spawn(move || {
            pin_to(0);
            ctdrop_tests::in_netns(&path, move || {
                let sock = std::net::UdpSocket::bind("0.0.0.0:0")?;
                let mut sent = 0u64;
                for _ in 0..12 {
                    for port in mixed::RULED {
                        sock.send_to(b"ctdrop-tests ruled", (dst, port))?;
                        sent += 1;
                    }
                }
                Ok(sent)
            })
            .unwrap()
        });
        (own.join().unwrap(), ruled.join().unwrap())
    });
    let out = ctdrop.stop_drained();
    eprintln!("sent {:?}", m.sent);
    assert!(
        m.drop_delta > 1000 && m.rule_delta == m.sent.1,
        "the scene did not happen: {:?} -> {:?}",
        m.before,
        m.after
    );
    // Not judged here: the totals. Under this IPI storm the kernel skips
    // kfree_skb runs nested on a busy CPU (said in the summary as
    // kfree_skb_skipped) and the test's own reader falls behind ctdrop's
    // stdout (said on stderr as lines not written).
    let mine = out.drops_in(s.rx);
    let wrong: Vec<_> = mine
        .iter()
        .filter(|r| r["cause"] != mixed::expected_cause(r))
        .collect();
    // The summary line itself may be among the lines not written.
    let skipped = out.summary().map(|s| s["kfree_skb_skipped"].clone());
    eprintln!(
        "{} records, {} swapped by nesting; kernel drop +{}, rule +{}; kfree_skb_skipped {:?}",
        mine.len(),
        wrong.len(),
        m.drop_delta,
        m.rule_delta,
        skipped.ok()
    );
    for r in wrong.iter().take(4) {
        eprintln!("  {r}");
    }
    assert!(
        mine.len() as u64 > m.drop_delta / 2,
        "too few records to judge: {}",
        out.stderr
    );
    // Each wrong record must be half of a swap: on one CPU, a softirq rule
    // drop nested in the task's conntrack drop takes its counter move
    // (called table-full), and the task's own free after it finds none
    // (called a rule). In each CPU's order, every "table-full called a
    // rule" closes an earlier "rule called table-full"; correct records
    // may lie between (the softirq may drop several).
    let mut by_cpu: BTreeMap<u64, Vec<&serde_json::Value>> = BTreeMap::new();
    for r in &mine {
        by_cpu
            .entry(r["cpu"].as_u64().unwrap())
            .or_default()
            .push(r);
    }
    let mut unpaired = Vec::new();
    for (cpu, mut rs) in by_cpu {
        rs.sort_by_key(|r| r["mono_ns"].as_u64().unwrap());
        let mut open: Vec<&serde_json::Value> = Vec::new();
        for r in rs {
            let (expected, got) = (mixed::expected_cause(r), r["cause"].as_str().unwrap());
            match (expected, got) {
                ("netfilter_rule", "conntrack_table_full") => open.push(r),
                ("conntrack_table_full", "netfilter_rule") if open.pop().is_some() => {}
                (e, g) if e != g => unpaired.push(format!("cpu {cpu}: {r}")),
                _ => {}
            }
        }
        // A swap the run's end cut in half, at most one per CPU.
        if open.len() > 1 {
            unpaired.extend(open.iter().map(|r| format!("cpu {cpu} (open): {r}")));
        }
    }
    assert!(
        unpaired.is_empty(),
        "{} wrong records are not half of a nesting swap: {:#?}",
        unpaired.len(),
        &unpaired[..unpaired.len().min(4)]
    );
    // Measured: 2-6 per ~59,000 records on the VM this was written on,
    // 68-260 (0.1-0.44%) on a later AMD EPYC one, where the IPI lands in
    // the window more often. The pairing above is the exact check; this
    // bound only catches a witness wrong wholesale (12,000 rule drops).
    assert!(
        wrong.len() * 20 <= mine.len(),
        "{} of {} records carry the other packet's cause",
        wrong.len(),
        mine.len()
    );
}
