//! `ctdrop watch`, the flight recorder, against the real kernel: incident
//! captures whose drop counts equal the kernel's `drop` increase, table
//! snapshots stored in them, every trigger, rotation, a full disk, SIGTERM
//! mid-burst, and `/metrics` checked by promtool and against the deploy/
//! dashboard and alert rules. Short `--pre`/`--post` keep it quick.
//! Needs root; run single-threaded like the rest of the suite.

use std::{
    collections::BTreeSet,
    io::{Read, Write},
    net::TcpStream,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use ctdrop_tests::*;
use serde_json::Value;

const MAX: u64 = 64;
/// This suite's namespace prefix (xtask reaps leftovers by it).
const PREFIX: &str = "ctdw";
/// The port the flood goes to: the snapshot must name it.
const FLOOD_PORT: u16 = 5353;

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(path)
}

/// A scratch directory, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Scratch {
        let p =
            std::env::temp_dir().join(format!("ctdw-test-{}-{}", std::process::id(), next_id()));
        std::fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A receiver namespace with conntrack on, `nf_conntrack_max` at `max`.
struct Scene {
    topo: Topology,
    rx: u32,
    _max: ConntrackMaxGuard,
}

impl Scene {
    fn new(max: u64) -> Scene {
        let topo = Topology::pair_with_prefix(PREFIX).unwrap();
        topo.track_receiver().unwrap();
        let rx = topo.receiver.inode().unwrap();
        let guard = ConntrackMaxGuard::set(max).unwrap();
        Scene {
            topo,
            rx,
            _max: guard,
        }
    }

    /// `n` new flows to [`FLOOD_PORT`] (distinct source ports); returns the
    /// receiver's `drop` increase once every datagram has been handled.
    fn burst(&self, n: usize) -> u64 {
        let before = self.drops();
        let unbound = self.no_ports();
        send_udp(
            &self.topo.sender,
            self.topo.receiver_addr,
            vec![FLOOD_PORT; n],
        )
        .unwrap();
        // The receiver handles them later, in its own softirq (after address
        // resolution, for the first burst), so `drop` holding still for 100
        // ms did not mean they had all arrived: the fill test once found 94
        // entries of its 95. Each one either finds no socket on FLOOD_PORT
        // (UDP NoPorts) or was dropped by conntrack; wait for all n.
        wait_for(
            "every datagram of the burst handled by the receiver",
            || {
                let handled = self.no_ports() - unbound + self.drops() - before;
                (handled >= n as u64).then_some(())
            },
            || format!("{:?}", ct_stats(&self.topo.receiver)),
        );
        settled_ct_stats(&self.topo.receiver, "drop").unwrap()["drop"] - before
    }

    /// The receiver's UDP `NoPorts` counter: datagrams that passed
    /// conntrack and found no socket.
    fn no_ports(&self) -> u64 {
        let snmp = self
            .topo
            .receiver
            .run_in(|| Ok(std::fs::read_to_string("/proc/thread-self/net/snmp")?))
            .unwrap();
        let mut udp = snmp.lines().filter(|l| l.starts_with("Udp: "));
        let (names, values) = (udp.next().unwrap(), udp.next().unwrap());
        let i = names
            .split_whitespace()
            .position(|w| w == "NoPorts")
            .unwrap();
        values.split_whitespace().nth(i).unwrap().parse().unwrap()
    }

    fn drops(&self) -> u64 {
        ct_stats(&self.topo.receiver).unwrap()["drop"]
    }
}

/// Polls `f` (every 200 ms, 30 s at most) until it gives a value; on
/// timeout fails with `what` and `context()`.
fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>, context: impl Fn() -> String) -> T {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "no {what} after 30 s:\n{}",
            context()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A free TCP port on loopback for `--metrics`.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Watch {
    c: Ctdrop,
    dir: PathBuf,
    port: u16,
}

impl Watch {
    fn start(dir: &Path, extra: &[&str]) -> Watch {
        let port = free_port();
        let d = dir.display().to_string();
        let p = format!("127.0.0.1:{port}");
        let mut args = vec!["watch", "--dir", &d, "--pre", "2s", "--metrics", &p];
        if !extra.contains(&"--post") {
            args.extend_from_slice(&["--post", "2s"]);
        }
        args.extend_from_slice(extra);
        let c = Ctdrop::spawn(&args).unwrap();
        Watch {
            c,
            dir: dir.to_path_buf(),
            port,
        }
    }

    /// Capture files in the directory, oldest first (names sort by time).
    fn captures(&self) -> Vec<PathBuf> {
        captures(&self.dir)
    }

    /// Waits (30 s at most) until there are `n` captures.
    fn wait_captures(&self, n: usize) -> Vec<PathBuf> {
        wait_for(
            &format!("{n} captures"),
            || Some(self.captures()).filter(|c| c.len() >= n),
            || self.c.stderr_so_far(),
        )
    }

    /// Waits (30 s at most) for a stderr line containing `needle`.
    fn wait_log(&self, needle: &str) -> String {
        self.wait_logs(needle, 1).pop().unwrap()
    }

    /// Waits (30 s at most) for `n` stderr lines containing `needle`; all
    /// such lines, in order.
    fn wait_logs(&self, needle: &str, n: usize) -> Vec<String> {
        let lines = || {
            self.c
                .stderr_so_far()
                .lines()
                .filter(|l| l.contains(needle))
                .map(str::to_string)
                .collect::<Vec<_>>()
        };
        wait_for(
            &format!("{n} stderr lines with {needle:?}"),
            || Some(lines()).filter(|l| l.len() >= n),
            || self.c.stderr_so_far(),
        )
    }

    /// Waits (30 s at most) for a scrape in which `ok` holds.
    fn wait_metrics(&self, what: &str, ok: impl Fn(&str) -> bool) -> String {
        wait_for(
            what,
            || Some(self.metrics()).filter(|m| ok(m)),
            || self.metrics(),
        )
    }

    fn metrics(&self) -> String {
        scrape(self.port)
    }

    /// SIGTERM; checks the service contract on the way out: exit 0,
    /// nothing on stdout, every stderr line `ctdrop: LEVEL: ...`, no colours.
    fn stop(self) -> CtdropOutput {
        let out = self.c.stop_with(libc::SIGTERM).unwrap();
        assert!(out.status.success(), "watch failed: {}", out.stderr);
        assert_eq!(out.stdout, "", "watch printed on stdout");
        for l in out.stderr_lines() {
            assert!(
                [
                    "ctdrop: info: ",
                    "ctdrop: note: ",
                    "ctdrop: warning: ",
                    "ctdrop: error: "
                ]
                .iter()
                .any(|p| l.starts_with(p)),
                "stderr line without a level: {l:?}"
            );
            assert!(!l.contains('\x1b'), "colour in {l:?}");
        }
        out
    }
}

fn captures(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "ctdrop"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn scrape(port: u16) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP answer: {out}"));
    assert!(
        head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200"),
        "{head}"
    );
    body.to_string()
}

/// A sample's value: `name{labels} value` where every `label="v"` given appears.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        let bare = series.split('{').next()?;
        (bare == name
            && labels
                .iter()
                .all(|(k, v)| series.contains(&format!("{k}=\"{v}\""))))
        .then(|| value.parse().ok())?
    })
}

fn report_json(file: &Path) -> Value {
    let out = Command::new(ctdrop_bin())
        .args(["report", &file.display().to_string(), "--format", "json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "report failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The report's kernel counter entry for `ns`.
fn kernel_entry(rep: &Value, ns: u32) -> Value {
    rep["kernel_counters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["netns"] == ns)
        .cloned()
        .unwrap_or_else(|| panic!("no kernel counters for {ns}: {rep}"))
}

/// One burst's capture against the kernel: every table-full drop the
/// kernel counted is in the file, and the file holds no other.
fn assert_capture_matches_kernel(file: &Path, ns: u32, kernel: u64) -> Value {
    let rep = report_json(file);
    assert_eq!(rep["complete"], true, "{rep}");
    assert_eq!(
        rep["drops_by_cause"]["conntrack_table_full"],
        kernel,
        "file vs kernel drop increase: {}",
        file.display()
    );
    let k = kernel_entry(&rep, ns);
    assert_eq!(k["drop"], kernel, "the file's kernel window: {k}");
    assert_eq!(k["agree"], true, "{k}");
    assert_eq!(rep["events_lost"], 0);
    rep
}

/// The snapshot stored in the file names the flood's port as the table's holder.
fn assert_snapshot_names_flood_port(rep: &Value, ns: u32) {
    let snaps = rep["occupancy"].as_array().unwrap();
    let s = snaps
        .iter()
        .find(|o| o["netns"] == ns)
        .unwrap_or_else(|| panic!("no snapshot of {ns}: {rep}"));
    let top = &s["top_dst_ports"][0];
    assert_eq!(
        (top["proto"].as_str(), top["port"].as_u64()),
        (Some("udp"), Some(FLOOD_PORT as u64)),
        "{s}"
    );
    assert!(top["entries"].as_u64().unwrap() > 0, "{s}");
}

#[test]
fn idle_for_10s_writes_no_capture_and_rss_stays_flat() {
    let s = Scratch::new();
    let w = Watch::start(&s.0, &[]);
    std::thread::sleep(Duration::from_secs(2));
    let rss0 = w.c.rss_kib().unwrap();
    std::thread::sleep(Duration::from_secs(8));
    let rss1 = w.c.rss_kib().unwrap();
    let m = w.metrics();
    let out = w.stop();
    eprintln!("idle RSS {rss0} KiB -> {rss1} KiB over 8 s");
    assert!(
        captures(&s.0).is_empty(),
        "captures while idle: {:?}",
        captures(&s.0)
    );
    // Flat: no more than 1 MiB over 8 idle seconds (allocator noise only).
    assert!(
        rss1 <= rss0 + 1024,
        "RSS grew while idle: {rss0} -> {rss1} KiB"
    );
    assert_eq!(
        sample(&m, "ctdrop_watch_captures_written_total", &[]),
        Some(0.0),
        "{m}"
    );
    assert!(!out.stderr.contains("trigger"), "{}", out.stderr);
}

#[test]
fn each_table_full_burst_writes_one_capture_equal_to_the_kernel_drop_increase() {
    let scene = Scene::new(MAX);
    let s = Scratch::new();
    let w = Watch::start(&s.0, &[]);
    let k1 = scene.burst(300);
    assert!(k1 > 0);
    let files = w.wait_captures(1);
    // The post-trigger window is over: nothing else comes for this burst.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        w.captures().len(),
        1,
        "one burst, one capture: {:?}",
        w.captures()
    );
    let name = files[0].file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        name.contains(&scene.topo.receiver.name) && name.ends_with("-first_drop.ctdrop"),
        "{name}"
    );
    let rep = assert_capture_matches_kernel(&files[0], scene.rx, k1);
    assert_snapshot_names_flood_port(&rep, scene.rx);
    assert_eq!(rep["watch"]["trigger"], "first_drop");
    assert_eq!(rep["watch"]["drops_not_kept"], 0);
    let line = w.wait_log("capture written");
    assert!(
        line.contains(&files[0].display().to_string())
            && line.contains(&format!("kernel drop +{k1}")),
        "{line}"
    );
    let trig = w.wait_log("trigger first_drop");
    assert!(
        trig.contains(&scene.topo.receiver.name) && trig.contains(&format!("{MAX}/{MAX}")),
        "{trig}"
    );
    // Calm, then a second burst: a second file with only its own drops.
    let k2 = scene.burst(200);
    let files = w.wait_captures(2);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(w.captures().len(), 2, "{:?}", w.captures());
    assert_capture_matches_kernel(&files[1], scene.rx, k2);
    let m = w.metrics();
    assert_eq!(
        sample(&m, "ctdrop_watch_captures_written_total", &[]),
        Some(2.0),
        "{m}"
    );
    let rx = scene.topo.receiver.name.as_str();
    assert_eq!(
        sample(
            &m,
            "ctdrop_drops_total",
            &[("cause", "conntrack_table_full"), ("netns", rx)]
        ),
        Some((k1 + k2) as f64),
        "{m}"
    );
    assert_eq!(
        sample(&m, "ctdrop_watch_recording", &[("netns", rx)]),
        Some(0.0),
        "{m}"
    );
    eprintln!("burst 1: kernel drop +{k1}, file {k1}; burst 2: kernel drop +{k2}, file {k2}");
    w.stop();
}

#[test]
fn trigger_fill_90_writes_a_capture_with_the_snapshot_before_any_drop() {
    let scene = Scene::new(100);
    // 95 flows into a 100-entry table: 95 %, nothing dropped.
    assert_eq!(scene.burst(95), 0);
    let s = Scratch::new();
    let w = Watch::start(&s.0, &["--trigger-fill", "90"]);
    let files = w.wait_captures(1);
    let trig = w.wait_log("trigger fill");
    assert!(trig.contains("95/100"), "{trig}");
    let rep = report_json(&files[0]);
    assert_eq!(rep["complete"], true);
    assert_eq!(rep["watch"]["trigger"], "fill");
    assert_eq!(rep["drops_total"], 0, "{rep}");
    assert_snapshot_names_flood_port(&rep, scene.rx);
    let snap = rep["occupancy"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["netns"] == scene.rx)
        .unwrap()
        .clone();
    assert_eq!(snap["entries"], 95, "{snap}");
    // The table stays above 90 %: one capture, not one per second.
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(w.captures().len(), 1);
    w.stop();
}

#[test]
fn sigusr1_writes_a_capture_now() {
    let s = Scratch::new();
    let w = Watch::start(&s.0, &[]);
    assert!(w.captures().is_empty());
    w.c.signal(libc::SIGUSR1);
    let files = w.wait_captures(1);
    assert!(
        files[0].to_string_lossy().ends_with("-signal.ctdrop"),
        "{files:?}"
    );
    let rep = report_json(&files[0]);
    assert_eq!(rep["complete"], true);
    assert_eq!(rep["watch"]["trigger"], "signal");
    w.stop();
}

#[test]
fn max_files_2_after_three_bursts_keeps_the_two_newest() {
    let scene = Scene::new(MAX);
    let s = Scratch::new();
    let w = Watch::start(&s.0, &["--max-files", "2"]);
    let mut written = Vec::new();
    for i in 0..3 {
        scene.burst(100);
        // Each burst's file, in the order written.
        let lines = w.wait_logs("capture written: ", i + 1);
        let path = lines[i]
            .split("capture written: ")
            .nth(1)
            .unwrap()
            .split(" (")
            .next()
            .unwrap();
        written.push(PathBuf::from(path));
    }
    let out = w.stop();
    assert_eq!(
        captures(&s.0),
        written[1..].to_vec(),
        "kept: the two newest"
    );
    let deleted: Vec<&str> = out
        .stderr_lines()
        .into_iter()
        .filter(|l| l.contains("deleted old capture"))
        .collect();
    assert_eq!(deleted.len(), 1, "{}", out.stderr);
    assert!(
        deleted[0].starts_with("ctdrop: info: ")
            && deleted[0].contains(&written[0].display().to_string()),
        "{}",
        deleted[0]
    );
}

/// A small tmpfs, unmounted on drop: a disk that is (nearly) full.
struct SmallDisk(PathBuf);

impl Drop for SmallDisk {
    fn drop(&mut self) {
        if let Err(e) = run(&["umount", &self.0.display().to_string()]) {
            eprintln!("ctdrop-tests: cleanup: {e:#}");
        }
    }
}

#[test]
fn tiny_tmpfs_dir_logs_an_error_and_tracing_and_metrics_go_on() {
    let scene = Scene::new(MAX);
    let s = Scratch::new();
    let at = s.0.join("tiny");
    std::fs::create_dir_all(&at).unwrap();
    run(&[
        "mount",
        "-t",
        "tmpfs",
        "-o",
        "size=16k,mode=0700",
        "ctdw-tiny",
        &at.display().to_string(),
    ])
    .unwrap();
    let _disk = SmallDisk(at.clone());
    let w = Watch::start(&at, &[]);
    let k1 = scene.burst(150);
    let err = w.wait_log("ctdrop: error: ");
    assert!(
        err.contains("not written")
            && err.contains("disk nearly full")
            && err.contains("tracing and metrics go on"),
        "{err}"
    );
    let m = w.metrics();
    let rx = scene.topo.receiver.name.as_str();
    assert_eq!(sample(&m, "ctdrop_watch_disk_full", &[]), Some(1.0), "{m}");
    assert_eq!(
        sample(
            &m,
            "ctdrop_watch_captures_not_written_total",
            &[("reason", "disk_full")]
        ),
        Some(1.0),
        "{m}"
    );
    // Tracing goes on: the next burst is counted too.
    let k2 = scene.burst(100);
    w.wait_metrics(&format!("ctdrop_drops_total = kernel {}", k1 + k2), |m| {
        sample(
            m,
            "ctdrop_drops_total",
            &[("cause", "conntrack_table_full"), ("netns", rx)],
        ) == Some((k1 + k2) as f64)
    });
    assert!(captures(&at).is_empty(), "{:?}", captures(&at));
    w.stop();
}

#[test]
fn sigterm_during_a_burst_leaves_a_capture_with_its_trailer() {
    let scene = Scene::new(MAX);
    let s = Scratch::new();
    let w = Watch::start(&s.0, &["--post", "30s"]);
    scene.burst(200);
    w.wait_log("trigger first_drop");
    // The incident is still being recorded (--post 30s) when SIGTERM comes.
    let out = w.stop();
    let files = captures(&s.0);
    assert_eq!(files.len(), 1, "{files:?}; stderr {}", out.stderr);
    let rep = report_json(&files[0]);
    assert_eq!(rep["complete"], true, "no trailer: {rep}");
    assert_eq!(rep["watch"]["cut_by_shutdown"], true);
    // Nothing more was sent after the burst: the counts still agree.
    let k = kernel_entry(&rep, scene.rx);
    assert_eq!(k["agree"], true, "{k}");
}

/// Metric names a PromQL expression uses: `ctdrop_*` words.
fn ctdrop_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let b = expr.as_bytes();
    let mut i = 0;
    while let Some(off) = expr[i..].find("ctdrop_") {
        let start = i + off;
        let mut end = start;
        while end < b.len() && (b[end].is_ascii_alphanumeric() || b[end] == b'_') {
            end += 1;
        }
        if start == 0 || !(b[start - 1].is_ascii_alphanumeric() || b[start - 1] == b'_') {
            out.insert(expr[start..end].to_string());
        }
        i = end;
    }
    out
}

/// Every `"expr"` string in the dashboard.
fn dashboard_exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("expr", Value::String(s)) => out.push(s.clone()),
                    _ => dashboard_exprs(x, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| dashboard_exprs(x, out)),
        _ => {}
    }
}

#[test]
fn metrics_during_a_burst_pass_promtool_and_name_every_metric_the_dashboard_and_rules_use() {
    let scene = Scene::new(MAX);
    let s = Scratch::new();
    let w = Watch::start(&s.0, &["--post", "30s"]);
    let k = scene.burst(200);
    w.wait_log("trigger first_drop");
    let rx = scene.topo.receiver.name.as_str();
    // The table gauges follow once a second: wait for the full table to show.
    let m = w.wait_metrics("fill 1.0", |m| {
        sample(m, "ctdrop_conntrack_fill_ratio", &[("netns", rx)]) == Some(1.0)
    });
    w.stop();
    let (ok, out, err) = tool("promtool", &["check", "metrics"], Some(&m));
    assert!(ok, "promtool check metrics: {out}{err}\n{m}");
    assert_eq!(
        sample(&m, "ctdrop_watch_recording", &[("netns", rx)]),
        Some(1.0),
        "trigger state: {m}"
    );
    assert_eq!(
        sample(
            &m,
            "ctdrop_watch_triggers_total",
            &[("trigger", "first_drop"), ("netns", rx)]
        ),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        sample(
            &m,
            "ctdrop_drops_total",
            &[("cause", "conntrack_table_full"), ("netns", rx)]
        ),
        Some(k as f64),
        "{m}"
    );
    assert_eq!(
        sample(&m, "ctdrop_conntrack_fill_ratio", &[("netns", rx)]),
        Some(1.0),
        "{m}"
    );
    let scraped: BTreeSet<String> = m
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap().to_string())
        .collect();
    let dash_text = std::fs::read_to_string(deploy("grafana/ctdrop-dashboard.json")).unwrap();
    let dash: Value = serde_json::from_str(&dash_text).unwrap();
    let mut exprs = Vec::new();
    dashboard_exprs(&dash, &mut exprs);
    assert!(exprs.len() >= 4, "dashboard has {} queries", exprs.len());
    // Every name anywhere in the file: panel queries and variable queries.
    let rules = std::fs::read_to_string(deploy("prometheus/ctdrop-alerts.yml")).unwrap();
    for (what, names) in [
        ("dashboard", ctdrop_names(&dash_text)),
        ("alert rules", ctdrop_names(&rules)),
    ] {
        assert!(!names.is_empty(), "{what} uses no ctdrop metric");
        let missing: Vec<&String> = names.iter().filter(|n| !scraped.contains(*n)).collect();
        assert!(
            missing.is_empty(),
            "{what} uses metrics a real scrape does not have: {missing:?}\nscraped: {scraped:?}"
        );
    }
}

#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() {
    let rules = deploy("prometheus/ctdrop-alerts.yml").display().to_string();
    let (ok, out, err) = tool("promtool", &["check", "rules", &rules], None);
    assert!(ok, "promtool check rules: {out}{err}");
    let tests = deploy("prometheus/ctdrop-alerts.test.yml")
        .display()
        .to_string();
    let (ok, out, err) = tool("promtool", &["test", "rules", &tests], None);
    assert!(ok, "promtool test rules: {out}{err}");
}

#[test]
fn systemd_unit_passes_systemd_analyze_verify() {
    let unit = deploy("systemd/ctdrop-watch.service");
    // verify resolves ExecStart: point it at the binary under test, in a
    // copy of the unit named as installed.
    let s = Scratch::new();
    let text = std::fs::read_to_string(&unit)
        .unwrap()
        .replace("/usr/local/bin/ctdrop", &ctdrop_bin().display().to_string());
    let copy = s.0.join("ctdrop-watch.service");
    std::fs::write(&copy, text).unwrap();
    let (ok, out, err) = tool(
        "systemd-analyze",
        &["verify", &copy.display().to_string()],
        None,
    );
    assert!(
        ok && !err.contains("ctdrop-watch.service:"),
        "systemd-analyze verify: {out}{err}"
    );
}

#[test]
fn drops_past_the_buffer_cap_are_counted_in_the_trailer() {
    let scene = Scene::new(MAX);
    let s = Scratch::new();
    let w = Watch::start(&s.0, &["--buffer-records", "50"]);
    let k = scene.burst(300);
    let files = w.wait_captures(1);
    let m = w.metrics();
    w.stop();
    let rep = report_json(&files[0]);
    assert_eq!(rep["complete"], true);
    let written = rep["drops_by_cause"]["conntrack_table_full"]
        .as_u64()
        .unwrap();
    let not_kept = rep["watch"]["drops_not_kept"].as_u64().unwrap();
    assert_eq!(rep["watch"]["buffer_cap"], 50);
    // The incident keeps its first 50 drops; the rest are counted, not lost silently.
    assert_eq!(written, 50, "{rep}");
    assert_eq!(
        written + not_kept,
        k,
        "kept + not kept vs the kernel's drop increase"
    );
    assert_eq!(kernel_entry(&rep, scene.rx)["drop"], k);
    assert_eq!(
        sample(&m, "ctdrop_watch_buffer_not_kept_total", &[]),
        Some(not_kept as f64),
        "{m}"
    );
}
