//! Capture files, reports and exports against the real kernel: a capture of
//! the incident reports what the live run printed and what the kernel
//! counted; damaged, killed and disk-full captures still read; exports pass
//! promtool and tshark; `--before/--after` shows a NOTRACK fix working.
//! Needs root; run single-threaded like the rest of the suite.

use std::{
    collections::BTreeMap,
    os::unix::fs::PermissionsExt,
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use ctdrop_tests::*;
use serde_json::Value;

const MAX: u64 = 64;
/// This suite's namespace prefix (xtask reaps leftovers by it).
const PREFIX: &str = "ctdc";

/// A small tmpfs, unmounted on drop: a disk that fills up.
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn mount(at: PathBuf, bytes: u64) -> SmallDisk {
        std::fs::create_dir_all(&at).unwrap();
        run(&[
            "mount",
            "-t",
            "tmpfs",
            "-o",
            &format!("size={bytes},mode=0700"),
            "ctdc-small",
            &at.display().to_string(),
        ])
        .unwrap();
        SmallDisk(at)
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        if let Err(e) = run(&["umount", &self.0.display().to_string()]) {
            eprintln!("ctdrop-tests: cleanup: {e:#}");
        }
    }
}

/// The incident: a receiver whose table is full (`MAX` entries from a
/// fill), holding the conntrack_max guard for the whole test.
struct Incident {
    topo: Topology,
    rx: u32,
    _max: ConntrackMaxGuard,
}

impl Incident {
    fn new() -> Incident {
        let topo = Topology::pair_with_prefix(PREFIX).unwrap();
        topo.track_receiver().unwrap();
        let rx = topo.receiver.inode().unwrap();
        let max = ConntrackMaxGuard::set(MAX).unwrap();
        send_udp_flows(&topo.sender, topo.receiver_addr, 10_000, MAX as u16 + 16).unwrap();
        let s = settle(&topo.receiver, "drop");
        assert_eq!(s["entries"], MAX, "table not full after the fill: {s:?}");
        Incident {
            topo,
            rx,
            _max: max,
        }
    }

    fn flood(&self, first_port: u16, n: u16) {
        send_udp_flows(&self.topo.sender, self.topo.receiver_addr, first_port, n).unwrap();
    }

    fn drops_counted(&self) -> u64 {
        ct_stats(&self.topo.receiver).unwrap()["drop"]
    }
}

/// Waits until `ns`'s stat counter `col` stops moving (veth delivery is
/// asynchronous), at most 2 s.
fn settle(ns: &Netns, col: &str) -> BTreeMap<String, u64> {
    ctdrop_tests::settled_ct_stats_within(ns, col, Duration::from_secs(2)).unwrap()
}

/// A short ctdrop command run to its end; its stdout need not be JSON lines.
struct Out {
    status: std::process::ExitStatus,
    stdout: String,
    stderr: String,
}

impl Out {
    fn stderr_lines(&self) -> Vec<&str> {
        self.stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect()
    }
}

fn ctdrop(args: &[&str]) -> Out {
    let o = Command::new(ctdrop_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    Out {
        status: o.status,
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

fn report(args: &[&str]) -> Out {
    let mut a = vec!["report"];
    a.extend_from_slice(args);
    ctdrop(&a)
}

fn report_json(file: &str) -> Value {
    let out = report(&[file, "--format", "json"]);
    assert!(out.status.success(), "report failed: {}", out.stderr);
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("report JSON: {e}\n{}", out.stdout))
}

/// Never a panic or a backtrace: ctdrop's errors are one `ctdrop:` line.
fn assert_one_line_error(out: &Out) {
    assert_eq!(
        out.status.code(),
        Some(1),
        "status {:?}; stderr {}",
        out.status,
        out.stderr
    );
    let lines = out.stderr_lines();
    assert_eq!(lines.len(), 1, "stderr: {}", out.stderr);
    assert!(lines[0].starts_with("ctdrop: "), "stderr: {}", out.stderr);
    assert!(!out.stderr.contains("panicked"), "stderr: {}", out.stderr);
}

#[test]
fn capture_report_equals_the_live_run_and_the_kernel_counters() {
    const N: u16 = 300;
    let inc = Incident::new();
    let s = Scratch::new();
    let file = s.file("incident.ctdrop");
    let host = inc.topo.receiver_addr.to_string();
    let before = inc.drops_counted();
    let c = Ctdrop::spawn(&[
        "capture",
        "-o",
        &file,
        "--json",
        "--ping",
        &host,
        "--from-netns",
        &inc.topo.sender.name,
        "--interval",
        "200ms",
    ])
    .unwrap();
    inc.flood(20_000, N);
    settle(&inc.topo.receiver, "drop");
    // A few probes into the full table.
    std::thread::sleep(Duration::from_millis(1200));
    let live = c.stop().unwrap();
    let kernel = inc.drops_counted() - before;
    assert!(live.status.success(), "capture failed: {}", live.stderr);
    let sum = live.summary().unwrap();

    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "capture file mode {mode:o}");

    let rep = report_json(&file);
    assert_eq!(rep["complete"], true, "{rep}");
    for key in [
        "drops_total",
        "drops_by_cause",
        "drops_by_netns",
        "events_lost",
        "events_sent",
        "decode_errors",
        "kernel_counters",
        "top_flows",
        "flows_tracked",
        "flows_untracked",
        "filtered",
    ] {
        assert_eq!(
            rep[key], sum[key],
            "report {key} differs from the live summary"
        );
    }
    let probes = sum["probes"]
        .as_object()
        .unwrap_or_else(|| panic!("no probes in {sum}"));
    for (h, p) in probes {
        for k in [
            "sent",
            "answered",
            "lost",
            "late",
            "lost_by_cause",
            "lost_unexplained",
        ] {
            assert_eq!(rep["probes"][h][k], p[k], "probe {h} {k}");
        }
    }

    // And both equal the kernel's own count in the receiver.
    let rx = inc.rx.to_string();
    assert!(
        kernel >= N as u64 * 9 / 10,
        "kernel counted {kernel} drops for {N} new flows"
    );
    assert_eq!(
        rep["drops_by_netns"][&rx], kernel,
        "records vs the kernel's drop counter"
    );
    let kc = rep["kernel_counters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["netns"] == inc.rx)
        .unwrap_or_else(|| panic!("no counters for {rx}: {rep}"))
        .clone();
    assert_eq!(
        (
            kc["drop"].as_u64(),
            kc["table_full_records"].as_u64(),
            &kc["agree"]
        ),
        (Some(kernel), Some(kernel), &Value::Bool(true)),
        "{kc}"
    );
    assert_eq!(rep["kernel_counters_agree"], true);
    let p = &rep["probes"][&host];
    assert!(
        p["lost"].as_u64().unwrap() >= 1,
        "no probe lost into a full table: {p}"
    );
    assert_eq!(p["lost_by_cause"]["conntrack_table_full"], p["lost"], "{p}");
    assert_eq!(
        p["lost_probes"].as_array().unwrap().len() as u64,
        p["lost"].as_u64().unwrap()
    );

    // The table snapshot taken when the table filled is stored in the file
    // (format 2) and is the one the live run showed.
    let snaps = rep["occupancy"].as_array().unwrap();
    let live_snaps = sum["occupancy"].as_array().unwrap();
    assert_eq!(snaps.len(), live_snaps.len(), "{rep}");
    let snap = snaps
        .iter()
        .find(|o| o["netns"] == inc.rx)
        .unwrap_or_else(|| panic!("no snapshot of the receiver in {rep}"));
    assert_eq!(snap["entries"], MAX, "{snap}");
    let live_snap = live_snaps.iter().find(|o| o["netns"] == inc.rx).unwrap();
    assert_eq!(
        (&snap["top_dst_ports"], &snap["taken_ns"]),
        (&live_snap["top_dst_ports"], &live_snap["taken_ns"])
    );

    // CSV: one row per drop, the very fields and values of the JSON lines.
    let csv_out = report(&[&file, "--format", "csv"]);
    assert!(csv_out.status.success(), "{}", csv_out.stderr);
    let mut rdr = csv::Reader::from_reader(csv_out.stdout.as_bytes());
    let head: Vec<String> = rdr.headers().unwrap().iter().map(str::to_string).collect();
    let rows: Vec<csv::StringRecord> = rdr.records().map(|r| r.unwrap()).collect();
    let drops = live.drops();
    assert_eq!(rows.len(), drops.len(), "CSV rows vs live drop lines");
    for (row, d) in rows.iter().zip(&drops) {
        let keys: Vec<&String> = d.as_object().unwrap().keys().collect();
        assert_eq!(
            head.iter().collect::<std::collections::BTreeSet<_>>(),
            keys.into_iter().collect(),
            "CSV columns vs JSON fields"
        );
        for (k, cell) in head.iter().zip(row.iter()) {
            let want = match &d[k] {
                Value::Null => String::new(),
                Value::String(s) => s.clone(),
                v => v.to_string(),
            };
            assert_eq!(cell, want, "column {k} of {d}");
        }
    }

    // People's formats say the same.
    let table = report(&[&file]);
    assert!(table.status.success());
    assert!(
        table
            .stdout
            .contains("every conntrack drop the kernel counted has its record here"),
        "{}",
        table.stdout
    );
    assert!(
        table
            .stdout
            .contains(&format!("{} ({rx})", inc.topo.receiver.name)),
        "{}",
        table.stdout
    );
    let md = report(&[&file, "--format", "markdown"]);
    assert!(
        md.stdout.starts_with("## ctdrop capture report"),
        "{}",
        md.stdout
    );
    assert!(
        md.stdout.contains(&format!(
            "| conntrack_table_full | {} |",
            sum["drops_by_cause"]["conntrack_table_full"]
        )),
        "{}",
        md.stdout
    );
}

#[test]
fn prometheus_export_passes_promtool_and_pcapng_reads_back_in_tshark() {
    const N: u16 = 120;
    let inc = Incident::new();
    let s = Scratch::new();
    let file = s.file("headers.ctdrop");
    let c = Ctdrop::spawn(&["capture", "-o", &file, "--headers", "--json"]).unwrap();
    inc.flood(21_000, N);
    settle(&inc.topo.receiver, "drop");
    let live = c.stop().unwrap();
    assert!(live.status.success(), "{}", live.stderr);
    let mine = live.drops_in(inc.rx).len();
    assert!(mine >= N as usize * 9 / 10, "only {mine} drops recorded");

    let prom = report(&[&file, "--format", "prometheus"]);
    assert!(prom.status.success(), "{}", prom.stderr);
    let (ok, out, err) = tool("promtool", &["check", "metrics"], Some(&prom.stdout));
    assert!(ok, "promtool: {out}{err}\n{}", prom.stdout);
    let series = format!(
        r#"ctdrop_drops_total{{cause="conntrack_table_full",netns="{}",proto="udp"}} {mine}"#,
        inc.topo.receiver.name
    );
    assert!(
        prom.stdout.lines().any(|l| l == series),
        "no {series} in\n{}",
        prom.stdout
    );
    let entries = format!(
        r#"ctdrop_conntrack_entries{{netns="{}"}} {MAX}"#,
        inc.topo.receiver.name
    );
    assert!(
        prom.stdout.lines().any(|l| l == entries),
        "no {entries} in\n{}",
        prom.stdout
    );

    let pcap = s.file("drops.pcapng");
    let ex = ctdrop(&["export", &file, "--pcap", &pcap]);
    assert!(ex.status.success(), "{}", ex.stderr);
    let (ok, out, err) = tool(
        "tshark",
        &[
            "-r",
            &pcap,
            "-T",
            "fields",
            "-e",
            "frame.comment",
            "-e",
            "ip.dst",
            "-e",
            "udp.dstport",
        ],
        None,
    );
    assert!(ok, "tshark: {err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines.len(),
        live.drops().len(),
        "packets in the pcap-ng vs drops"
    );
    let want = format!(
        "conntrack_table_full netns {} ({})",
        inc.topo.receiver.name, inc.rx
    );
    let udp: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| l.starts_with(&want))
        .collect();
    assert_eq!(
        udp.len(),
        mine,
        "comments naming the cause and namespace; first: {:?}",
        lines.first()
    );
    let dst = inc.topo.receiver_addr.to_string();
    assert!(
        udp.iter()
            .all(|l| l.split('\t').nth(1) == Some(dst.as_str())),
        "IP header not the packet's: {:?}",
        udp.first()
    );
    let ports: std::collections::BTreeSet<u16> = udp
        .iter()
        .filter_map(|l| l.split('\t').nth(2)?.parse().ok())
        .collect();
    assert!(
        ports.iter().all(|p| (21_000..21_000 + N).contains(p)) && ports.len() == mine,
        "ports from the packets: {ports:?}"
    );
}

#[test]
fn capture_killed_mid_run_reports_what_was_flushed_and_says_the_trailer_is_missing() {
    const N: u16 = 200;
    let inc = Incident::new();
    let s = Scratch::new();
    let file = s.file("killed.ctdrop");
    let before = inc.drops_counted();
    let c = Ctdrop::spawn(&["capture", "-o", &file, "--json"]).unwrap();
    inc.flood(22_000, N);
    settle(&inc.topo.receiver, "drop");
    let kernel = inc.drops_counted() - before;
    // Read the growing file until every drop is in it: records reach the
    // disk while the capture runs (at most a second later).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = report_json(&file);
        if r["drops_by_netns"][inc.rx.to_string()].as_u64() == Some(kernel) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "drops not flushed while running: {r}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(c); // SIGKILL

    let r = report_json(&file);
    assert_eq!(r["complete"], false, "{r}");
    assert!(
        r["stopped"]
            .as_str()
            .unwrap_or("")
            .contains("trailer missing"),
        "{r}"
    );
    assert_eq!(r["drops_by_netns"][inc.rx.to_string()], kernel, "{r}");
    assert_eq!(
        r["kernel_counters"],
        Value::Null,
        "counters at the end were never read: {r}"
    );
    let t = report(&[&file]);
    assert!(t.status.success(), "{}", t.stderr);
    assert!(
        t.stdout.contains("WARNING: trailer missing"),
        "{}",
        t.stdout
    );
}

#[test]
fn full_disk_stops_the_capture_with_one_line_and_keeps_what_was_flushed() {
    let inc = Incident::new();
    let s = Scratch::new();
    // Room for the header and a few hundred drops with packet headers.
    let disk = SmallDisk::mount(s.0.join("small"), 64 << 10);
    let file = disk.0.join("full.ctdrop").display().to_string();
    let before = inc.drops_counted();
    let c = Ctdrop::spawn(&["capture", "-o", &file, "--headers", "--json"]).unwrap();
    // A first few drops that fit, flushed within the second...
    inc.flood(23_000, 50);
    settle(&inc.topo.receiver, "drop");
    let first = inc.drops_counted() - before;
    std::thread::sleep(Duration::from_millis(1500));
    // ...then far more than the disk holds.
    for i in 0..3 {
        inc.flood(23_100 + i * 500, 500);
        std::thread::sleep(Duration::from_millis(600));
    }
    settle(&inc.topo.receiver, "drop");
    let total = inc.drops_counted() - before;
    std::thread::sleep(Duration::from_millis(1500));
    let out = c.stop().unwrap();
    // Informational lines first (attached, ...), then the one error line.
    assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
    assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
    let last = out.stderr_lines().last().copied().unwrap_or_default();
    assert!(
        last.starts_with("ctdrop: ")
            && last.contains("No space left on device")
            && last.contains("readable up to its last flush"),
        "{}",
        out.stderr
    );

    let r = report_json(&file);
    assert_eq!(r["complete"], false, "{r}");
    let n = r["drops_by_netns"][inc.rx.to_string()]
        .as_u64()
        .unwrap_or(0);
    assert!(
        first > 0 && n >= first && n < total,
        "drops kept {n}: flushed before the disk filled {first}, in all {total}"
    );
}

#[test]
fn truncated_captures_read_up_to_the_cut_or_fail_in_one_line() {
    let inc = Incident::new();
    let s = Scratch::new();
    let file = s.file("whole.ctdrop");
    let c = Ctdrop::spawn(&["capture", "-o", &file, "--headers", "--json"]).unwrap();
    inc.flood(24_000, 100);
    settle(&inc.topo.receiver, "drop");
    std::thread::sleep(Duration::from_millis(1100));
    inc.flood(24_100, 100);
    settle(&inc.topo.receiver, "drop");
    let out = c.stop().unwrap();
    assert!(out.status.success(), "{}", out.stderr);
    let bytes = std::fs::read(&file).unwrap();
    let whole = report_json(&file)["drops_total"].as_u64().unwrap();
    assert!(whole >= 180, "{whole}");

    let mut offsets: Vec<usize> = vec![
        0,
        1,
        7,
        8,
        11,
        12,
        13,
        23,
        24,
        25,
        100,
        200,
        bytes.len() - 1,
    ];
    offsets.extend((1..40).map(|i| bytes.len() * i / 40));
    let (mut failed, mut partial, mut last) = (0, 0, 0u64);
    offsets.sort();
    offsets.dedup();
    for cut in offsets {
        let p = s.file(&format!("cut-{cut}.ctdrop"));
        std::fs::write(&p, &bytes[..cut]).unwrap();
        let out = report(&[&p, "--format", "json"]);
        if !out.status.success() {
            assert_one_line_error(&out);
            assert!(
                out.stderr.contains("cut short") || out.stderr.contains("unreadable"),
                "cut at {cut}: {}",
                out.stderr
            );
            failed += 1;
            continue;
        }
        let r: Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(r["complete"], false, "cut at {cut}");
        let why = r["stopped"].as_str().unwrap_or_default();
        assert!(
            why.contains("trailer missing") && why.contains("byte"),
            "cut at {cut}: {why}"
        );
        let n = r["drops_total"].as_u64().unwrap();
        assert!(
            n >= last && n <= whole,
            "cut at {cut}: {n} drops (whole file {whole}, earlier cut {last})"
        );
        last = n;
        partial += 1;
    }
    assert!(
        failed > 0 && partial > 0,
        "cuts failed {failed}, read {partial}"
    );
    assert!(last > 0, "no drops read from any cut");
}

#[test]
fn a_capture_from_a_newer_format_version_is_refused_by_name() {
    let s = Scratch::new();
    let file = s.file("new.ctdrop");
    let c = ctdrop(&["capture", "-o", &file, "--duration", "1s"]);
    assert!(c.status.success(), "{}", c.stderr);
    let mut bytes = std::fs::read(&file).unwrap();
    // One past the version this ctdrop writes (and so reads).
    let newer = u32::from_le_bytes(bytes[8..12].try_into().unwrap()) + 1;
    bytes[8..12].copy_from_slice(&newer.to_le_bytes());
    std::fs::write(&file, &bytes).unwrap();
    let named = format!("format version {newer}");
    for args in [
        vec!["report", file.as_str()],
        vec!["export", file.as_str(), "--pcap", "/dev/null", "--force"],
    ] {
        let out = ctdrop(&args);
        assert_one_line_error(&out);
        assert!(
            out.stderr.contains(&named) && out.stderr.contains("newer ctdrop"),
            "{}",
            out.stderr
        );
    }
}

#[test]
fn an_existing_file_is_kept_unless_force_and_captures_are_private() {
    let s = Scratch::new();
    let file = s.file("precious");
    std::fs::write(&file, b"not mine to overwrite").unwrap();
    let out = ctdrop(&["capture", "-o", &file, "--duration", "1s"]);
    assert_one_line_error(&out);
    assert!(
        out.stderr.contains("already exists") && out.stderr.contains("--force"),
        "{}",
        out.stderr
    );
    assert_eq!(std::fs::read(&file).unwrap(), b"not mine to overwrite");

    let out = ctdrop(&["capture", "-o", &file, "--duration", "1s", "--force"]);
    assert!(out.status.success(), "{}", out.stderr);
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(&std::fs::read(&file).unwrap()[..8], b"\x89CTDROP\n");
    assert_eq!(report_json(&file)["complete"], true);

    let out = report(&[&s.file("missing.ctdrop")]);
    assert_one_line_error(&out);
    let out = report(&[&file, "--before", &file]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "FILE with --before is a usage error: {}",
        out.stderr
    );
}

#[test]
fn before_after_shows_notrack_stopping_the_table_full_drops_and_ping_loss() {
    const N: u16 = 200;
    let inc = Incident::new();
    let s = Scratch::new();
    let host = inc.topo.receiver_addr.to_string();
    let capture = |file: &str, first_port: u16| {
        let c = Ctdrop::spawn(&[
            "capture",
            "-o",
            file,
            "--json",
            "--ping",
            &host,
            "--from-netns",
            &inc.topo.sender.name,
            "--interval",
            "200ms",
        ])
        .unwrap();
        inc.flood(first_port, N);
        settle(&inc.topo.receiver, "drop");
        std::thread::sleep(Duration::from_millis(1200));
        let out = c.stop().unwrap();
        assert!(out.status.success(), "{}", out.stderr);
    };
    let (a, b) = (s.file("before.ctdrop"), s.file("after.ctdrop"));
    capture(&a, 30_000);
    // The fix: untrack the flood's ports and the pings (their replies are
    // sent locally, so OUTPUT too).
    let r = &inc.topo.receiver;
    r.exec(&[
        "iptables",
        "-t",
        "raw",
        "-A",
        "PREROUTING",
        "-p",
        "udp",
        "--dport",
        "30000:31000",
        "-j",
        "NOTRACK",
    ])
    .unwrap();
    r.exec(&[
        "iptables",
        "-t",
        "raw",
        "-A",
        "PREROUTING",
        "-p",
        "icmp",
        "-j",
        "NOTRACK",
    ])
    .unwrap();
    r.exec(&[
        "iptables", "-t", "raw", "-A", "OUTPUT", "-p", "icmp", "-j", "NOTRACK",
    ])
    .unwrap();
    let still_full = ct_stats(r).unwrap()["entries"];
    capture(&b, 30_500);

    let out = report(&["--before", &a, "--after", &b, "--format", "json"]);
    assert!(out.status.success(), "{}", out.stderr);
    let c: Value = serde_json::from_str(&out.stdout).unwrap();
    let tf = &c["causes"]["conntrack_table_full"];
    assert!(
        tf["before_per_s"].as_f64().unwrap() > 0.0
            && tf["before"].as_u64().unwrap() >= N as u64 * 9 / 10,
        "{c}"
    );
    assert_eq!(
        (tf["after"].as_u64(), tf["change"].as_str()),
        (Some(0), Some("stopped")),
        "{c}"
    );
    assert_eq!(
        c["kernel_drop_counter"]["after"], 0,
        "the kernel agrees nothing was dropped after: {c}"
    );
    assert_eq!(c["conntrack_drops"]["change"], "stopped", "{c}");
    let p = &c["probes"][&host];
    assert!(p["before"]["loss_pct"].as_f64().unwrap() > 0.0, "{c}");
    assert!(
        p["after"]["sent"].as_u64().unwrap() > 0 && p["after"]["lost"] == 0,
        "{c}"
    );
    assert!(
        c["verdict"]
            .as_str()
            .unwrap()
            .starts_with("conntrack drops stopped"),
        "{c}"
    );
    assert_eq!(
        still_full, MAX,
        "the table was still full when the fix was checked"
    );

    let t = report(&["--before", &a, "--after", &b]);
    assert!(
        t.stdout.contains("conntrack_table_full") && t.stdout.contains("stopped"),
        "{}",
        t.stdout
    );
    let md = report(&["--before", &a, "--after", &b, "--format", "markdown"]);
    assert!(
        md.stdout.contains("**Verdict:** conntrack drops stopped"),
        "{}",
        md.stdout
    );
}

fn get_metrics(port: u16, accept: Option<&str>) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let accept = accept
        .map(|a| format!("Accept: {a}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: localhost\r\n{accept}\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let (head, body) = resp
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("bad response {resp:?}"));
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_string()
}

#[test]
fn live_metrics_on_loopback_pass_promtool_and_count_the_drops() {
    const N: u16 = 100;
    let inc = Incident::new();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // A bare port: loopback only.
    let c = Ctdrop::spawn(&["live", "--json", "--metrics", &port.to_string()]).unwrap();
    inc.flood(25_000, N);
    settle(&inc.topo.receiver, "drop");
    let name = &inc.topo.receiver.name;
    let series = format!(
        r#"ctdrop_drops_total{{cause="conntrack_table_full",netns="{name}",proto="udp"}} "#
    );
    let entries = format!(r#"ctdrop_conntrack_entries{{netns="{name}"}} {MAX}"#);
    // Gauges are refreshed once a second: wait for the first refresh.
    let deadline = Instant::now() + Duration::from_secs(10);
    let body = loop {
        let b = get_metrics(port, None);
        if b.contains(&entries) {
            break b;
        }
        assert!(Instant::now() < deadline, "no {entries} in\n{b}");
        std::thread::sleep(Duration::from_millis(200));
    };
    let om = get_metrics(port, Some("application/openmetrics-text;version=1.0.0"));
    let out = c.stop().unwrap();
    assert!(out.status.success(), "{}", out.stderr);

    let (ok, o, e) = tool("promtool", &["check", "metrics"], Some(&body));
    assert!(ok, "promtool: {o}{e}\n{body}");
    let mine = out.drops_in(inc.rx).len();
    let got: u64 = body
        .lines()
        .find_map(|l| l.strip_prefix(&series))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert_eq!(got, mine as u64, "metric vs drop lines\n{body}");
    assert!(
        om.trim_end().ends_with("# EOF") && om.contains("# TYPE ctdrop_drops counter"),
        "OpenMetrics on request:\n{om}"
    );
    assert!(
        out.stderr.contains(&format!(
            "ctdrop: metrics on http://127.0.0.1:{port}/metrics"
        )),
        "not on loopback: {}",
        out.stderr
    );
}

#[test]
fn progress_line_is_drawn_only_on_a_terminal() {
    let s = Scratch::new();
    let file = s.file("tty.ctdrop");
    let bin = ctdrop_bin().display().to_string();
    // `script` gives ctdrop a pseudo-terminal as stderr.
    let cmd = format!("{bin} capture -o {file} --duration 2s");
    let (ok, out, err) = tool("script", &["-qfec", &cmd, "/dev/null"], None);
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("\r\x1b[Kcapture 1s of 2s (1s left)  ")
            || out.contains("\r\x1b[Kcapture 2s of 2s (0s left)  "),
        "no progress line in {out:?}"
    );
    assert!(out.contains("events lost"), "{out:?}");
    let piped = ctdrop(&["capture", "-o", &s.file("pipe.ctdrop"), "--duration", "1s"]);
    assert!(piped.status.success(), "{}", piped.stderr);
    assert!(
        !piped.stderr.contains("\x1b[K"),
        "progress drawn into a pipe: {:?}",
        piped.stderr
    );
}
