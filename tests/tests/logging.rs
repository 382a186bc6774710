//! Diagnostics on stderr: `ctdrop: LEVEL: message` records whose levels
//! -q, -v and RUST_LOG choose, while results (the `attached` and `stopped`
//! lines) show whatever the level; and the kernel programs' own
//! diagnostics (aya-log), off unless asked for.

use std::time::{Duration, Instant};

use ctdrop_tests::*;

fn lines_with<'a>(stderr: &'a str, prefix: &str) -> Vec<&'a str> {
    stderr.lines().filter(|l| l.starts_with(prefix)).collect()
}

/// The kernel programs' records (target `bpf`).
fn kernel_lines(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter(|l| l.starts_with("ctdrop: ") && l.contains(": bpf: "))
        .collect()
}

/// Results that no level hides.
fn assert_results_shown(out: &CtdropOutput, what: &str) {
    assert!(
        out.status.success(),
        "{what}: {:?}\n{}",
        out.status,
        out.stderr
    );
    for l in ["ctdrop: attached", "ctdrop: stopped after"] {
        assert!(out.stderr.contains(l), "{what}: no {l:?}:\n{}", out.stderr);
    }
}

/// ctdrop's own debug records: how each signal is watched, one line each
/// (`check` prints the same table on stdout).
fn assert_debug_shown(out: &CtdropOutput, what: &str) {
    assert!(
        out.stderr
            .contains("ctdrop: debug: drops signal: tp_btf/kfree_skb"),
        "{what}: no debug line:\n{}",
        out.stderr
    );
}

/// `ctdrop live --duration 1s` in `ns` with extra arguments and
/// environment, to the end.
fn short_live(ns: &Netns, env: &[&str], flags: &[&str]) -> CtdropOutput {
    let mut prefix = vec!["env"];
    prefix.extend_from_slice(env);
    let mut args = flags.to_vec();
    args.extend_from_slice(&["live", "--duration", "1s", "--netns", &ns.name]);
    run_ctdrop(&prefix, &args, Duration::from_secs(60)).unwrap()
}

/// A pair whose receiver drops every ARP packet in an `arp` family nft
/// chain: a datagram from the sender makes it ask for the receiver's
/// address, and netfilter drops each request. ctdrop's parser finds no IP
/// header in those packets, so each is a drop it records without a flow:
/// what the kernel programs log, when asked, as an skb they gave up on.
struct ArpDrops {
    topo: Topology,
}

impl ArpDrops {
    fn new() -> ArpDrops {
        let topo = Topology::pair_with_prefix("ctlog").unwrap();
        let rx = &topo.receiver;
        rx.exec(&["nft", "add", "table", "arp", "ctlog"]).unwrap();
        rx.exec(&[
            "nft",
            "add",
            "chain",
            "arp",
            "ctlog",
            "in",
            "{ type filter hook input priority 0; policy accept; }",
        ])
        .unwrap();
        rx.exec(&[
            "nft", "add", "rule", "arp", "ctlog", "in", "counter", "drop",
        ])
        .unwrap();
        ArpDrops { topo }
    }

    /// ARP packets the receiver's rule dropped so far (the kernel's count).
    fn dropped(&self) -> u64 {
        let text = self
            .topo
            .receiver
            .exec(&["nft", "list", "chain", "arp", "ctlog", "in"])
            .unwrap();
        let after = text
            .split("counter packets ")
            .nth(1)
            .unwrap_or_else(|| panic!("no counter in {text}"));
        after.split_whitespace().next().unwrap().parse().unwrap()
    }

    /// Three ARP requests from the sender, sent from this thread: each is
    /// dropped by the receiver's rule before the send returns, so the
    /// count is final at once. (Not the neighbour code's own requests: its
    /// retries come from a timer a second apart, and in two full-suite runs
    /// one of those three was missing from ctdrop's records with the
    /// kernel's `sent` at 2 and nothing lost or skipped: open, in the README's
    /// "What ctdrop promises". This test is about the log lines.) Returns
    /// how many were dropped.
    fn provoke(&self) -> u64 {
        let before = self.dropped();
        let topo = &self.topo;
        ctdrop_tests::send_arp_requests(
            &topo.sender,
            &topo.veth.sender_if,
            topo.sender_addr,
            topo.receiver_addr,
            3,
        )
        .unwrap();
        let n = self.dropped() - before;
        assert_eq!(n, 3, "the receiver's rule dropped {n} of 3 ARP requests");
        n
    }

    /// `ctdrop [flags] live --json --netns RECEIVER` around one
    /// [`ArpDrops::provoke`]: its output, and the kernel's count.
    fn trace(env: &[(&str, &str)], flags: &[&str]) -> (CtdropOutput, u64, u32) {
        let scene = ArpDrops::new();
        let rx = &scene.topo.receiver;
        let mut args = flags.to_vec();
        args.extend_from_slice(&["live", "--json", "--netns", &rx.name]);
        let c = Ctdrop::spawn_env(&args, env).unwrap();
        let dropped = scene.provoke();
        let out = c.stop().unwrap();
        assert_results_shown(&out, &format!("{env:?} {flags:?}"));
        // Every ARP drop the kernel counted is a record without a flow.
        let netns = rx.inode().unwrap();
        let flowless = out
            .drops_in(netns)
            .into_iter()
            .filter(|d| d["src"].is_null() && d["reason"] == "NETFILTER_DROP")
            .count() as u64;
        assert_eq!(
            flowless,
            dropped,
            "{flags:?}: records without a flow vs ARP packets the rule dropped; stderr:\n{}\nstdout:\n{}",
            out.stderr,
            out.stdout
        );
        (out, dropped, netns)
    }
}

#[test]
fn kernel_log_is_silent_by_default_even_with_v() {
    for flags in [&[][..], &["-v"][..]] {
        let (out, dropped, _) = ArpDrops::trace(&[], flags);
        assert!(dropped > 0);
        assert_eq!(
            kernel_lines(&out.stderr),
            Vec::<&str>::new(),
            "{flags:?}: kernel lines with kernel logging off"
        );
    }
}

#[test]
fn kernel_log_says_each_drop_the_parser_gave_up_on_with_bpf_log_vv_or_rust_log() {
    type Env<'a> = &'a [(&'a str, &'a str)];
    let runs: [(Env, &[&str]); 3] = [
        (&[], &["--bpf-log"]),
        (&[], &["-vv"]),
        (&[("RUST_LOG", "bpf=debug")], &[]),
    ];
    for (env, flags) in runs {
        let (out, dropped, netns) = ArpDrops::trace(env, flags);
        let lines = kernel_lines(&out.stderr);
        // One line per such drop (ARP: protocol 0x806), in the receiver's
        // namespace: the same number the kernel's rule counted.
        let ours: Vec<&&str> = lines
            .iter()
            .filter(|l| {
                l.starts_with("ctdrop: debug: bpf: kfree_skb: skb 0x")
                    && l.contains(&format!("in netns {netns} "))
                    && l.contains("protocol 0x806")
                    && l.contains("no IPv4/IPv6 header")
            })
            .collect();
        assert_eq!(
            ours.len() as u64,
            dropped,
            "{env:?} {flags:?}: kernel lines vs ARP drops; stderr:\n{}",
            out.stderr
        );
        // Nothing else in a namespace with only those drops.
        assert_eq!(ours.len(), lines.len(), "{env:?} {flags:?}: {lines:?}");
    }
}

#[test]
fn v_shows_debug_lines_that_the_default_hides() {
    let ns = Netns::with_prefix("ctlog").unwrap();
    let plain = short_live(&ns, &[], &[]);
    assert_results_shown(&plain, "default");
    assert_eq!(
        lines_with(&plain.stderr, "ctdrop: debug:"),
        Vec::<&str>::new(),
        "debug lines by default"
    );
    let v = short_live(&ns, &[], &["-v"]);
    assert_results_shown(&v, "-v");
    assert_debug_shown(&v, "-v");
    // -v is ctdrop's own debug: neither the libraries' nor the kernel's.
    for l in lines_with(&v.stderr, "ctdrop: debug:") {
        assert!(!l.contains(": aya"), "library line with -v: {l}");
    }
    assert_eq!(kernel_lines(&v.stderr), Vec::<&str>::new());
}

#[test]
fn rust_log_decides_over_v_and_q() {
    let ns = Netns::with_prefix("ctlog").unwrap();
    // RUST_LOG=debug beats -q: debug lines, the libraries' (aya) included.
    let out = short_live(&ns, &["RUST_LOG=debug"], &["-q"]);
    assert_results_shown(&out, "RUST_LOG=debug -q");
    assert_debug_shown(&out, "RUST_LOG=debug -q");
    assert!(
        !lines_with(&out.stderr, "ctdrop: debug: aya").is_empty(),
        "no library debug line with RUST_LOG=debug:\n{}",
        out.stderr
    );
    // RUST_LOG=warn beats -v: no debug, no info.
    let out = short_live(&ns, &["RUST_LOG=warn"], &["-v"]);
    assert_results_shown(&out, "RUST_LOG=warn -v");
    for p in ["ctdrop: debug:", "ctdrop: info:", "ctdrop: trace:"] {
        assert_eq!(lines_with(&out.stderr, p), Vec::<&str>::new(), "{p}");
    }
    // Empty is unset: -v decides.
    let out = short_live(&ns, &["RUST_LOG="], &["-v"]);
    assert!(
        out.stderr.contains("ctdrop: debug: drops signal:"),
        "{}",
        out.stderr
    );
}

#[test]
fn a_rust_log_that_does_not_parse_is_refused_in_one_line() {
    let out = run_ctdrop(
        &["env", "RUST_LOG=ctdrop=debug=x"],
        &["check"],
        Duration::from_secs(30),
    )
    .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
    let lines = out.stderr_lines();
    assert_eq!(lines.len(), 1, "{}", out.stderr);
    assert!(
        lines[0].starts_with("ctdrop: RUST_LOG=") && !lines[0].contains("panicked"),
        "{}",
        out.stderr
    );
    assert_eq!(out.stdout, "");
}

/// ctdrop's netfilter links: file descriptors of link type netfilter.
fn netfilter_links(pid: u32) -> usize {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return 0;
    };
    fds.filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
        .filter(|info| info.lines().any(|l| l == "link_type:\tnetfilter"))
        .count()
}

/// `live --mode netfilter-hook` on every namespace while a new one
/// appears: the hook marks attached there are an info line by default,
/// and nothing with -q (the links prove the same thing happened).
#[test]
fn q_silences_info_lines_but_not_attached_or_the_summary() {
    let run = |flags: &[&str]| {
        let mut args = flags.to_vec();
        args.extend_from_slice(&["live", "--json", "--mode", "netfilter-hook"]);
        let c = Ctdrop::spawn(&args).unwrap();
        let before = netfilter_links(c.pid());
        assert!(before > 0, "{flags:?}: no netfilter links at start");
        let ns = Netns::with_prefix("ctlog").unwrap();
        let inode = ns.inode().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while netfilter_links(c.pid()) <= before {
            assert!(
                Instant::now() < deadline,
                "{flags:?}: no hook links for the new namespace {inode}; stderr:\n{}",
                c.stderr_so_far()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = c.stop().unwrap();
        assert_results_shown(&out, &format!("{flags:?}"));
        (out, inode)
    };
    let (plain, inode) = run(&[]);
    let said =
        format!("ctdrop: info: netfilter hook marks attached in new network namespace {inode}");
    assert!(
        plain.stderr.lines().any(|l| l == said),
        "default: no {said:?}:\n{}",
        plain.stderr
    );
    let (quiet, _) = run(&["-q"]);
    for p in ["ctdrop: info:", "ctdrop: debug:", "ctdrop: trace:"] {
        assert_eq!(lines_with(&quiet.stderr, p), Vec::<&str>::new(), "-q: {p}");
    }
}

/// A capture whose end is cut off: reading it warns (prometheus format
/// reads it to the cut and says so on stderr).
#[test]
fn q_keeps_warnings_and_rust_log_error_drops_them() {
    let ns = Netns::with_prefix("ctlog").unwrap();
    let s = Scratch::new();
    let file = s.file("whole.ctdrop");
    let out = run_ctdrop(
        &[],
        &[
            "capture",
            "--duration",
            "1s",
            "--netns",
            &ns.name,
            "-o",
            &file,
        ],
        Duration::from_secs(60),
    )
    .unwrap();
    assert!(out.status.success(), "{}", out.stderr);
    let bytes = std::fs::read(&file).unwrap();
    let cut = s.file("cut.ctdrop");
    std::fs::write(&cut, &bytes[..bytes.len() - 1]).unwrap();
    let report = |env: &[&str], flags: &[&str]| {
        let mut prefix = vec!["env"];
        prefix.extend_from_slice(env);
        let mut args = flags.to_vec();
        args.extend_from_slice(&["report", &cut, "--format", "prometheus"]);
        let out = run_ctdrop(&prefix, &args, Duration::from_secs(30)).unwrap();
        assert!(out.status.success(), "{env:?} {flags:?}: {}", out.stderr);
        assert!(!out.stdout.is_empty(), "{env:?} {flags:?}: no metrics");
        out
    };
    let warning = format!("ctdrop: warning: {cut}: ");
    for flags in [&[][..], &["-q"][..]] {
        let out = report(&[], flags);
        assert!(
            out.stderr.lines().any(|l| l.starts_with(&warning)),
            "{flags:?}: no {warning:?}:\n{}",
            out.stderr
        );
    }
    let out = report(&["RUST_LOG=error"], &[]);
    assert_eq!(out.stderr, "", "RUST_LOG=error");
}
