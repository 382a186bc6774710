//! `ctdrop demo` tells the whole story and leaves nothing behind: no
//! namespace, no iptables rule, no changed sysctl, whether it runs to the
//! end or is interrupted. Needs root.
//!
//! The demo takes the tests' nf_conntrack_max lock itself; these tests only
//! hold it briefly to read the host's state when nobody is changing it.

use std::{
    io::{BufRead, BufReader},
    os::fd::AsRawFd,
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc,
    },
    time::{Duration, Instant},
};

use ctdrop_tests::*;

/// What the demo may touch, read under the lock.
#[derive(Debug, PartialEq, Eq)]
struct HostState {
    conntrack_max: u64,
    ruleset: String,
    demo_namespaces: Vec<String>,
}

fn host_state() -> HostState {
    let lock = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(LOCK_PATH)
        .unwrap();
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
    let state = HostState {
        conntrack_max: read_conntrack_max().unwrap(),
        ruleset: run(&["iptables-save"])
            .unwrap()
            .lines()
            .filter(|l| !l.starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n"),
        demo_namespaces: run(&["ip", "netns", "list"])
            .unwrap()
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|n| n.starts_with("ctdemo-"))
            .map(str::to_string)
            .collect(),
    };
    drop(lock);
    state
}

/// Another namespace in use, as on a host with containers: it holds 300
/// conntrack entries and keeps opening new flows (10 every 100 ms) until
/// dropped. Its kernel `drop` counter must never move.
struct BusyNeighbour {
    topo: Topology,
    stop: Arc<AtomicBool>,
    worker: Option<std::thread::JoinHandle<u64>>,
}

impl BusyNeighbour {
    fn start() -> BusyNeighbour {
        let topo = Topology::pair().unwrap();
        topo.track_receiver().unwrap();
        send_udp_flows(&topo.sender, topo.receiver_addr, 1000, 300).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let (s, sender, dst) = (stop.clone(), topo.sender.path(), topo.receiver_addr);
        let worker = std::thread::spawn(move || {
            in_netns(&sender, move || {
                let mut opened = 0u64;
                let mut port = 2000u16;
                while !s.load(Ordering::Relaxed) {
                    for _ in 0..10 {
                        let sock = std::net::UdpSocket::bind((std::net::Ipv4Addr::UNSPECIFIED, 0))?;
                        sock.send_to(b"busy neighbour", (dst, port))?;
                        port = if port == 60000 { 2000 } else { port + 1 };
                        opened += 1;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                Ok(opened)
            })
            .unwrap()
        });
        let b = BusyNeighbour {
            topo,
            stop,
            worker: Some(worker),
        };
        let entries = settled_ct_stats(&b.topo.receiver, "entries").unwrap()["entries"];
        assert!(entries >= 300, "the neighbour holds only {entries} entries");
        b
    }

    fn counters(&self) -> std::collections::BTreeMap<String, u64> {
        ct_stats(&self.topo.receiver).unwrap()
    }

    /// Stops the flows; how many it opened.
    fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.worker.take().unwrap().join().unwrap()
    }
}

/// Runs the demo; `interrupt_at`: send SIGINT once a line containing it
/// appears. Returns (exit success, stdout lines, stderr).
fn demo(interrupt_at: Option<&str>) -> (bool, Vec<String>, String) {
    demo_with(&[], interrupt_at)
}

fn demo_with(extra: &[&str], interrupt_at: Option<&str>) -> (bool, Vec<String>, String) {
    let mut child = Command::new(ctdrop_bin())
        .arg("demo")
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let out = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let mut err = child.stderr.take().unwrap();
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut err, &mut s);
        s
    });
    // Generous: the demo may first wait for another test's lock.
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut lines = Vec::new();
    let mut sent_int = false;
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(l) => {
                if let Some(mark) = interrupt_at {
                    if !sent_int && l.contains(mark) {
                        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
                        sent_int = true;
                    }
                }
                lines.push(l);
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if Instant::now() > deadline {
                    let _ = child.kill();
                    panic!(
                        "demo still running after 600 s; output so far:\n{}",
                        lines.join("\n")
                    );
                }
            }
        }
    }
    reader.join().unwrap();
    let status = child.wait().unwrap();
    (status.success(), lines, err_reader.join().unwrap())
}

/// The two numbers of a before/after row.
fn row(lines: &[String], label: &str) -> (u64, u64) {
    let l = lines
        .iter()
        .find(|l| l.trim_start().starts_with(label))
        .unwrap_or_else(|| panic!("no {label:?} row:\n{}", lines.join("\n")));
    let nums: Vec<u64> = l[l.find(label).unwrap() + label.len()..]
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    (nums[0], nums[1])
}

/// The story, told while another namespace holds 300 entries and keeps
/// opening flows: the demo fills only its own namespace's table (to the
/// real limit, no sysctl changed), and the neighbour drops nothing.
#[test]
fn demo_tells_the_story_without_touching_the_limit_and_a_busy_neighbour_drops_nothing() {
    let before = host_state();
    assert!(
        before.demo_namespaces.is_empty(),
        "demo namespaces exist before the test: {before:?}"
    );
    assert!(
        before.conntrack_max >= 4096,
        "nf_conntrack_max is {}: someone left it lowered",
        before.conntrack_max
    );
    let busy = BusyNeighbour::start();
    let busy_before = busy.counters();
    let (ok, lines, stderr) = demo(None);
    let busy_after = busy.counters();
    let opened = busy.stop();
    let after = host_state();
    let text = lines.join("\n");
    assert!(ok, "demo failed: {stderr}\n{text}");
    assert_eq!(after, before, "the demo left something behind");
    assert_eq!(
        busy_after["drop"], busy_before["drop"],
        "the busy namespace dropped packets during the demo"
    );
    assert!(
        busy_after["entries"] > busy_before["entries"] && opened > 100,
        "the neighbour did not keep opening flows ({opened})"
    );
    // Its own table filled to the real limit, with no sysctl changed.
    // (The baseline pings' entries hold a few places the fill cannot take.)
    let filled = lines.iter().find_map(|l| {
        l.split("table: ")
            .nth(1)?
            .split('/')
            .next()?
            .parse::<u64>()
            .ok()
    });
    let filled = filled.unwrap_or_else(|| panic!("no fill line:\n{text}"));
    assert!(
        filled + 32 >= before.conntrack_max
            && text.contains(&format!("/{} entries", before.conntrack_max)),
        "the demo did not fill its table to {}:\n{text}",
        before.conntrack_max
    );
    assert!(text.contains("no sysctl was changed"), "{text}");

    // Baseline ok, then pings down and each one explained.
    let step = |s: &str| {
        lines
            .iter()
            .position(|l| l.starts_with(s))
            .unwrap_or_else(|| panic!("no {s}:\n{text}"))
    };
    let (s1, s2, s3, s4, s5) = (
        step("[1/5]"),
        step("[2/5]"),
        step("[3/5]"),
        step("[4/5]"),
        step("[5/5]"),
    );
    assert!(s1 < s2 && s2 < s3 && s3 < s4 && s4 < s5);
    assert!(
        lines[s1..s2].iter().any(|l| l.contains("  ok ")),
        "no ok ping in the baseline:\n{text}"
    );
    assert!(
        lines[s2..s3]
            .iter()
            .any(|l| l.contains("down  conntrack_table_full in ctdemo-srv")),
        "no explained down ping:\n{text}"
    );
    // Occupancy names the flood; the advice and the applied rule name its port.
    assert!(
        lines[s3..s4]
            .iter()
            .any(|l| l.trim_start().starts_with("udp 5353")),
        "{text}"
    );
    let rule = "$ iptables -t raw -A PREROUTING -p udp --dport 5353 -j NOTRACK";
    assert!(
        lines[s4..s5].iter().filter(|l| l.contains(rule)).count() >= 2,
        "rule not advised and applied:\n{text}"
    );
    // Before/after, by ctdrop and by the kernel.
    let (lost_before, lost_after) = row(&lines, "pings lost");
    let (ct_before, ct_after) = row(&lines, "conntrack_table_full drops (ctdrop)");
    let (k_before, k_after) = row(&lines, "kernel drop counter (ctdemo-srv)");
    assert!(lost_before > 0 && ct_before > 0, "{text}");
    assert_eq!((lost_after, ct_after, k_after), (0, 0, 0), "{text}");
    assert_eq!(
        ct_before, k_before,
        "ctdrop and the kernel disagree:\n{text}"
    );
    assert!(text.contains("the fix worked"));
    for l in &lines {
        assert!(l.chars().count() <= 80, "wider than 80 columns: {l:?}");
    }
}

/// Lowering the global limit is refused, in one line naming the namespace
/// that holds entries and its count, and nothing is changed.
#[test]
fn demo_refuses_to_lower_the_limit_while_another_namespace_holds_entries() {
    let before = host_state();
    let busy = BusyNeighbour::start();
    let name = busy.topo.receiver.name.clone();
    let busy_before = busy.counters();
    let (ok, lines, stderr) = demo_with(&["--max", "1000"], None);
    let busy_after = busy.counters();
    busy.stop();
    let after = host_state();
    assert!(!ok, "lowering was not refused:\n{}", lines.join("\n"));
    let err: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("ctdrop:"))
        .collect();
    assert_eq!(err.len(), 1, "one line: {stderr}");
    assert!(
        err[0].contains("not lowering nf_conntrack_max") && err[0].contains("conntrack entries"),
        "{stderr}"
    );
    // Named by the namespace the neighbour's entries are in, with its count.
    assert!(
        err[0].contains(&format!("namespace {name} holds ")),
        "the refusal does not name {name}: {stderr}"
    );
    assert_eq!(busy_after["drop"], busy_before["drop"]);
    assert_eq!(after, before, "a refused demo changed something");
}

#[test]
fn demo_refuses_nonsensical_max_values() {
    let current = host_state().conntrack_max.to_string();
    for bad in ["0", "5", current.as_str(), "1000000000000000"] {
        let out = run_ctdrop(&[], &["demo", "--max", bad], Duration::from_secs(60)).unwrap();
        assert!(!out.status.success(), "--max {bad} accepted");
        assert_eq!(out.stderr_lines().len(), 1, "--max {bad}: {}", out.stderr);
        assert!(out.stderr.contains("--max"), "--max {bad}: {}", out.stderr);
        assert!(out.stdout.is_empty(), "--max {bad}: {}", out.stdout);
    }
}

#[test]
fn interrupted_demo_cleans_up() {
    let before = host_state();
    let (ok, lines, stderr) = demo(Some("[2/5]"));
    let after = host_state();
    assert!(
        !ok,
        "an interrupted demo must not claim success:\n{}",
        lines.join("\n")
    );
    assert!(stderr.contains("interrupted"), "{stderr}");
    assert_eq!(after, before, "the interrupted demo left something behind");
}
