//! Seeing it: `ctdrop top` driven in a real terminal (tmux) during the
//! incident, and the HTML report opened in a real browser (headless
//! Chromium, driven over the DevTools protocol on a pipe). Needs root,
//! tmux, chromium and aha; run single-threaded like the rest of the suite.
//!
//! With CTDROP_SCREENSHOT_DIR set, the screenshots taken here are kept
//! there (the README's docs/top.png and docs/report.png come from a run
//! with CTDROP_SCREENSHOT_DIR=docs).

use std::{
    collections::BTreeSet,
    fs::File,
    io::{BufRead, BufReader, Read, Write},
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc,
    },
    time::{Duration, Instant},
};

use ctdrop_tests::{bpf, *};
use serde_json::{json, Value};

const MAX: u64 = 64;

/// Where a screenshot goes: CTDROP_SCREENSHOT_DIR when set, else scratch.
fn shot_path(scratch: &Scratch, name: &str) -> PathBuf {
    match std::env::var_os("CTDROP_SCREENSHOT_DIR") {
        Some(d) if !d.is_empty() => {
            std::fs::create_dir_all(&d).unwrap();
            Path::new(&d).join(name)
        }
        _ => PathBuf::from(scratch.file(name)),
    }
}

/// The incident: the receiver's table holds `MAX` UDP entries that live
/// 10 minutes (so the table stays full for the whole test however slow
/// the machine), and the guard holds nf_conntrack_max at `MAX`.
struct Incident {
    topo: Topology,
    rx: u32,
    _max: ConntrackMaxGuard,
}

impl Incident {
    fn new() -> Incident {
        let topo = Topology::pair().unwrap();
        topo.track_receiver().unwrap();
        topo.receiver
            .exec(&[
                "sysctl",
                "-qw",
                "net.netfilter.nf_conntrack_udp_timeout=600",
            ])
            .unwrap();
        let rx = topo.receiver.inode().unwrap();
        let max = ConntrackMaxGuard::set(MAX).unwrap();
        send_udp_flows(&topo.sender, topo.receiver_addr, 10_000, MAX as u16 + 16).unwrap();
        let s = settled_ct_stats(&topo.receiver, "drop").unwrap();
        assert_eq!(s["entries"], MAX, "table not full after the fill: {s:?}");
        Incident {
            topo,
            rx,
            _max: max,
        }
    }
}

/// New UDP flows into the full table, a few every 200 ms, until dropped:
/// a steady conntrack_table_full drop rate.
struct Trickle {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Trickle {
    fn start(ns: &Netns, dst: std::net::Ipv4Addr) -> Trickle {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let nsf = File::open(ns.path()).unwrap();
        let handle = std::thread::spawn(move || {
            ctlab::enter_file(&nsf).unwrap();
            let mut port = 20_000u16;
            while !flag.load(Ordering::Relaxed) {
                for _ in 0..10 {
                    let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
                    let _ = s.send_to(&[0u8; 16], (dst, port));
                    port = if port >= 60_000 { 20_000 } else { port + 1 };
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        Trickle {
            stop,
            handle: Some(handle),
        }
    }
}

impl Drop for Trickle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

// ------------------------------------------------------------------ tmux

/// A tmux server of our own (its own socket) running one command in a
/// pane of a fixed size; the pane stays after the command exits so its
/// exit status and last screen can be read. Killed on drop.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn start(cmd: &[&str], width: u16, height: u16) -> Tmux {
        let t = Tmux {
            socket: format!("ctdt-see-{}-{}", std::process::id(), next_id()),
        };
        let line = cmd
            .iter()
            .map(|a| format!("'{}'", a.replace('\'', "'\\''")))
            .collect::<Vec<_>>()
            .join(" ");
        // The pane starts idle; remain-on-exit is set before the command
        // runs, so even a fast failure leaves its pane and status to read.
        t.tmux(&[
            "-f",
            "/dev/null",
            "new-session",
            "-d",
            "-s",
            "see",
            "-x",
            &width.to_string(),
            "-y",
            &height.to_string(),
            "sleep 600",
        ]);
        t.tmux(&["set-option", "-t", "see", "remain-on-exit", "on"]);
        t.tmux(&["respawn-pane", "-k", "-t", "see", &format!("exec {line}")]);
        t
    }

    fn tmux(&self, args: &[&str]) -> String {
        let o = Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .args(args)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// The pane's text (`escapes`: with colours, for a picture).
    fn capture(&self, escapes: bool) -> String {
        let mut args = vec!["capture-pane", "-p", "-t", "see"];
        if escapes {
            args.push("-e");
        }
        self.tmux(&args)
    }

    fn send(&self, key: &str) {
        self.tmux(&["send-keys", "-t", "see", key]);
    }

    /// The exit status once the command ended.
    fn exit_status(&self) -> Option<i32> {
        let s = self.tmux(&[
            "display-message",
            "-p",
            "-t",
            "see",
            "#{pane_dead} #{pane_dead_status} #{pane_dead_signal}",
        ]);
        // A pane killed by a signal has no status, only the signal: 128 + it,
        // as a shell says, so such a death fails the test at once by name.
        let f: Vec<&str> = s.split_whitespace().collect();
        match f.as_slice() {
            ["1", code, ..] if code.parse::<i32>().is_ok() && f.len() == 2 => code.parse().ok(),
            ["1", sig] | ["1", _, sig] => sig.parse::<i32>().ok().map(|n| 128 + n),
            _ => None,
        }
    }

    fn pane_pid(&self) -> u32 {
        self.tmux(&["display-message", "-p", "-t", "see", "#{pane_pid}"])
            .trim()
            .parse()
            .unwrap()
    }

    /// Waits until `pred` holds for the pane's text; the last text either way.
    fn wait_for(&self, what: &str, limit: Duration, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let screen = self.capture(false);
            if pred(&screen) {
                return screen;
            }
            if Instant::now() > deadline {
                panic!("the pane never showed {what}; last screen:\n{screen}");
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .output();
    }
}

/// The drops-per-second number on the line naming `cause` in the causes panel.
fn cause_rate(screen: &str, cause: &str) -> Option<u64> {
    let line = screen
        .lines()
        .find(|l| l.trim_start().starts_with(cause) && l.contains("/s") && l.contains("total"))?;
    let before = line.split("/s").next()?;
    before.split_whitespace().last()?.parse().ok()
}

// -------------------------------------------------------------- browser

/// Headless Chromium driven over the DevTools protocol on a pipe
/// (--remote-debugging-pipe: commands in on fd 3, answers out on fd 4,
/// NUL-separated JSON). It runs in a network namespace of its own with no
/// interface up, so nothing it might try can leave the machine; what the
/// page asks for is seen in the protocol's Network events.
struct Browser {
    child: Child,
    to: File,
    from: mpsc::Receiver<Value>,
    next: u64,
    session: Option<String>,
    events: Vec<Value>,
    _profile: Scratch,
}

/// What a page did while it loaded.
struct PageVisit {
    /// URLs the page requested (the document itself included).
    requests: Vec<String>,
    /// Console errors, exceptions and error log entries.
    errors: Vec<String>,
}

impl Browser {
    fn start(width: u32, height: u32) -> Browser {
        let profile = Scratch::new();
        let (cmd_r, cmd_w) = pipe();
        let (out_r, out_w) = pipe();
        let (cr, ow) = (cmd_r.as_raw_fd(), out_w.as_raw_fd());
        let mut c = Command::new("unshare");
        c.args([
            "--net",
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--remote-debugging-pipe",
            "--no-first-run",
            "--no-default-browser-check",
        ])
        .args([
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--mute-audio",
        ])
        .arg(format!("--user-data-dir={}", profile.0.display()))
        .arg(format!("--window-size={width},{height}"))
        .arg("about:blank")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        // SAFETY: only async-signal-safe calls (dup, dup2) between fork and exec.
        unsafe {
            c.pre_exec(move || {
                // Out of the way first, in case either already is 3 or 4.
                let a = libc::fcntl(cr, libc::F_DUPFD, 10);
                let b = libc::fcntl(ow, libc::F_DUPFD, 10);
                if a < 0 || b < 0 || libc::dup2(a, 3) < 0 || libc::dup2(b, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = c
            .spawn()
            .expect("starting chromium (apt-get install chromium)");
        drop(cmd_r);
        drop(out_w);
        let (tx, from) = mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(out_r);
            loop {
                let mut buf = Vec::new();
                match r.read_until(0, &mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                buf.pop();
                if let Ok(v) = serde_json::from_slice::<Value>(&buf) {
                    if tx.send(v).is_err() {
                        return;
                    }
                }
            }
        });
        let mut b = Browser {
            child,
            to: cmd_w,
            from,
            next: 1,
            session: None,
            events: Vec::new(),
            _profile: profile,
        };
        let target = b.call("Target.createTarget", json!({"url": "about:blank"}));
        let target_id = target["targetId"].as_str().unwrap().to_string();
        let attached = b.call(
            "Target.attachToTarget",
            json!({"targetId": target_id, "flatten": true}),
        );
        b.session = Some(attached["sessionId"].as_str().unwrap().to_string());
        for domain in ["Page", "Network", "Runtime", "Log"] {
            b.call(&format!("{domain}.enable"), json!({}));
        }
        b.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": false}),
        );
        b
    }

    /// Sends one command (to the page once attached) and waits for its answer.
    fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next;
        self.next += 1;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let (Some(s), false) = (
            &self.session,
            method.starts_with("Target.") || method.starts_with("Browser."),
        ) {
            msg["sessionId"] = json!(s);
        }
        let mut bytes = serde_json::to_vec(&msg).unwrap();
        bytes.push(0);
        self.to.write_all(&bytes).unwrap();
        let v = self.next_until(&format!("an answer to {method}"), |v| {
            v["id"].as_u64() == Some(id)
        });
        if let Some(e) = v.get("error") {
            panic!("chromium: {method}: {e}");
        }
        v["result"].clone()
    }

    /// Messages from chromium, kept as events, until one matches (returned).
    fn next_until(&mut self, what: &str, hit: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let v = self
                .from
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("chromium: no {what}"));
            if hit(&v) {
                return v;
            }
            self.events.push(v);
        }
    }

    fn wait_event(&mut self, method: &str) {
        if !self.events.iter().any(|e| e["method"] == method) {
            let v = self.next_until(method, |v| v["method"] == method);
            self.events.push(v);
        }
    }

    /// Loads `file`, waits for its load event, and tells what it did.
    fn open(&mut self, file: &Path) -> PageVisit {
        self.events.clear();
        let url = format!("file://{}", file.canonicalize().unwrap().display());
        self.call("Page.navigate", json!({"url": url}));
        self.wait_event("Page.loadEventFired");
        // A round trip after the load: events sent before it are in.
        self.eval("1");
        let mut v = PageVisit {
            requests: Vec::new(),
            errors: Vec::new(),
        };
        for e in &self.events {
            let p = &e["params"];
            match e["method"].as_str().unwrap_or("") {
                "Network.requestWillBeSent" => v
                    .requests
                    .push(p["request"]["url"].as_str().unwrap_or("?").to_string()),
                "Runtime.exceptionThrown" => v
                    .errors
                    .push(format!("exception: {}", p["exceptionDetails"])),
                "Runtime.consoleAPICalled"
                    if matches!(p["type"].as_str(), Some("error" | "assert")) =>
                {
                    v.errors.push(format!("console: {}", p["args"]))
                }
                "Log.entryAdded" if p["entry"]["level"] == "error" => {
                    v.errors.push(format!("log: {}", p["entry"]["text"]))
                }
                _ => {}
            }
        }
        v
    }

    /// Evaluates a JS expression in the page; its JSON value.
    fn eval(&mut self, expr: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": expr, "returnByValue": true}),
        );
        assert!(
            r.get("exceptionDetails").is_none(),
            "evaluating {expr}: {r}"
        );
        r["result"]["value"].clone()
    }

    /// The whole page as PNG.
    fn screenshot(&mut self, to: &Path) {
        let r = self.call(
            "Page.captureScreenshot",
            json!({"format": "png", "captureBeyondViewport": true}),
        );
        let png = base64_decode(r["data"].as_str().unwrap());
        assert!(
            png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 2000,
            "not a PNG: {} bytes",
            png.len()
        );
        std::fs::write(to, png).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let id = self.next;
        let msg = json!({"id": id, "method": "Browser.close", "params": {}});
        let mut bytes = serde_json::to_vec(&msg).unwrap();
        bytes.push(0);
        let _ = self.to.write_all(&bytes);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pipe() -> (File, File) {
    let mut fds = [0; 2];
    // SAFETY: fds is a valid array for pipe2 to fill.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both fds were just created and are owned by nothing else.
    unsafe {
        (
            std::os::fd::FromRawFd::from_raw_fd(fds[0]),
            std::os::fd::FromRawFd::from_raw_fd(fds[1]),
        )
    }
}

fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("bad base64 byte {c}"),
    } as u32;
    let bytes: Vec<u8> = s
        .bytes()
        .filter(|c| *c != b'=' && !c.is_ascii_whitespace())
        .collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut n = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            n |= val(*c) << (18 - 6 * i);
        }
        for i in 0..chunk.len() - 1 {
            out.push((n >> (16 - 8 * i)) as u8);
        }
    }
    out
}

/// What a rendered report page holds, read through the DOM.
const PAGE_FACTS: &str = r#"JSON.stringify({
  svgs: [...document.querySelectorAll('svg')].map(s => ({
    id: s.id,
    series: [...s.querySelectorAll('path.series')].map(p => p.dataset.cause),
    fills: s.querySelectorAll('path.fill').length,
    lost: s.querySelectorAll('path.lost-probe').length,
    width: s.getBoundingClientRect().width,
  })),
  keys: Object.fromEntries([...document.querySelectorAll('[data-key]')].map(e => [e.dataset.key, e.textContent])),
})"#;

/// The JSON value at a `/`-separated path (array indexes as numbers).
fn at<'a>(v: &'a Value, path: &str) -> &'a Value {
    path.split('/').fold(v, |v, k| match k.parse::<usize>() {
        Ok(i) if v.is_array() => &v[i],
        _ => &v[k],
    })
}

/// Causes with at least one drop in a JSON report.
fn causes_seen(report: &Value) -> BTreeSet<String> {
    report["drops_by_cause"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, n)| n.as_u64() > Some(0))
        .map(|(c, _)| c.clone())
        .collect()
}

fn report_len(json: &[u8]) -> u64 {
    serde_json::from_slice::<Value>(json)
        .ok()
        .and_then(|v| v["drops_total"].as_u64())
        .unwrap_or(0)
}

fn ctdrop(args: &[&str]) -> std::process::Output {
    Command::new(ctdrop_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Captures `duration` of the incident into `file`: pings from the sender
/// into the receiver, and `rounds` of 30 new UDP flows plus 5 datagrams to
/// port 9, 400 ms apart, from port `first_port` up.
fn capture_incident(inc: &Incident, file: &str, duration: &str, rounds: u16, first_port: u16) {
    let rx_addr = inc.topo.receiver_addr.to_string();
    let capture = Ctdrop::spawn(&[
        "capture",
        "--duration",
        duration,
        "-o",
        file,
        "--ping",
        &rx_addr,
        "--from-netns",
        &inc.topo.sender.name,
        "--interval",
        "500ms",
    ])
    .unwrap();
    for round in 0..rounds {
        send_udp_flows(
            &inc.topo.sender,
            inc.topo.receiver_addr,
            first_port + round * 40,
            30,
        )
        .unwrap();
        send_udp(&inc.topo.sender, inc.topo.receiver_addr, vec![9; 5]).unwrap();
        std::thread::sleep(Duration::from_millis(400));
    }
    let out = capture.wait(Duration::from_secs(60)).unwrap();
    assert!(out.status.success(), "capture failed: {}", out.stderr);
}

// ---------------------------------------------------------------- tests

/// `top` in a real terminal while the receiver's table is full: the pane
/// names the namespace with its count/max and shows a non-zero
/// conntrack_table_full rate; the keys sort, filter and pause; `q` ends it
/// with status 0, the terminal given back, and no program left attached.
#[test]
fn top_in_a_terminal_shows_the_full_namespace_and_detaches_on_q() {
    let inc = Incident::new();
    let scratch = Scratch::new();
    let since = bpf::high_water().unwrap();
    let bin = ctdrop_bin().display().to_string();
    let rx_addr = inc.topo.receiver_addr.to_string();
    let rx_name = inc.topo.receiver.name.clone();
    let _trickle = Trickle::start(&inc.topo.sender, inc.topo.receiver_addr);
    let tmux = Tmux::start(
        &[
            &bin,
            "top",
            "--ping",
            &rx_addr,
            "--from-netns",
            &inc.topo.sender.name,
            "--interval",
            "500ms",
        ],
        150,
        44,
    );

    let row = |screen: &str| {
        screen
            .lines()
            .find(|l| l.contains(&format!("{rx_name} ({})", inc.rx)))
            .map(str::to_string)
    };
    let screen = tmux.wait_for(
        "the full namespace with a table-full rate",
        Duration::from_secs(90),
        |s| {
            row(s).is_some_and(|r| r.contains(&format!("{MAX}/{MAX}")))
                && cause_rate(s, "conntrack_table_full").is_some_and(|n| n > 0)
        },
    );
    eprintln!("{screen}");
    // The program that draws is the one attached: remember what it holds.
    let pid = tmux.pane_pid();
    assert_eq!(
        std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .unwrap()
            .trim(),
        "ctdrop",
        "the pane runs something else"
    );
    let held = bpf::held_by(pid);
    assert!(
        bpf::still_listed(&held)
            .unwrap()
            .iter()
            .any(|o| o.kind == bpf::Kind::Prog && o.name == "kfree_skb"),
        "top holds no kfree_skb program"
    );
    let rate = cause_rate(&screen, "conntrack_table_full").unwrap();
    let r = row(&screen).unwrap();
    eprintln!("namespace row: {r}\ntable-full rate on screen: {rate}/s");

    // Probes into the full table are down, and say why.
    tmux.wait_for("a lost probe explained", Duration::from_secs(30), |s| {
        s.contains(&rx_addr) && s.contains("down: conntrack_table_full")
    });

    // s: sort by fill; n: only one namespace (cycle to ours); p: pause.
    tmux.send("s");
    tmux.wait_for("sort by fill", Duration::from_secs(10), |s| {
        s.contains("sort fill")
    });
    let mut filtered = false;
    for _ in 0..20 {
        tmux.send("n");
        std::thread::sleep(Duration::from_millis(400));
        if tmux
            .capture(false)
            .contains(&format!("only {rx_name} ({})", inc.rx))
        {
            filtered = true;
            break;
        }
    }
    assert!(
        filtered,
        "n never filtered to {rx_name}:\n{}",
        tmux.capture(false)
    );
    let only = tmux.wait_for("one namespace listed", Duration::from_secs(10), |s| {
        s.contains("namespaces (1)")
    });
    assert!(
        row(&only).is_some(),
        "the filtered list is not ours:\n{only}"
    );
    tmux.send("p");
    tmux.wait_for("PAUSED", Duration::from_secs(10), |s| s.contains("PAUSED"));
    tmux.send("p");
    tmux.wait_for("unpaused", Duration::from_secs(10), |s| {
        !s.contains("PAUSED")
    });
    tmux.send("a");
    tmux.wait_for("all namespaces again", Duration::from_secs(10), |s| {
        s.contains("all namespaces")
    });
    std::thread::sleep(Duration::from_millis(1500));

    // The picture for the README: the pane with its colours, as HTML, in the browser.
    let colored = tmux.capture(true);
    let html = PathBuf::from(scratch.file("top.html"));
    let mut aha = Command::new("aha")
        .args(["--black", "--title", "ctdrop top"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("aha (apt-get install aha)");
    aha.stdin
        .take()
        .unwrap()
        .write_all(colored.as_bytes())
        .unwrap();
    let mut page = String::new();
    aha.stdout
        .take()
        .unwrap()
        .read_to_string(&mut page)
        .unwrap();
    assert!(aha.wait().unwrap().success());
    let page = page.replace(
        "<pre>",
        "<pre style=\"font:13px/1.25 'DejaVu Sans Mono',monospace;margin:8px\">",
    );
    std::fs::write(&html, page).unwrap();
    let mut browser = Browser::start(1240, 800);
    let visit = browser.open(&html);
    assert!(visit.errors.is_empty(), "{:?}", visit.errors);
    browser.screenshot(&shot_path(&scratch, "top.png"));
    drop(browser);

    tmux.send("q");
    let deadline = Instant::now() + Duration::from_secs(90);
    let pid = tmux.pane_pid();
    let status = loop {
        if let Some(s) = tmux.exit_status() {
            break s;
        }
        // Seen twice: ctdrop had exited (a zombie) but tmux had not reaped
        // it, so the pane was not dead yet. The kernel keeps a zombie's
        // wait status in /proc/PID/stat (field 52): the same check of it.
        if let Some(s) = zombie_exit_status(pid) {
            break s;
        }
        // Once seen here (2 of ~12 runs) with the summary already printed:
        // say where each of the process's threads waits, to find the cause.
        assert!(
            Instant::now() < deadline,
            "top still running 90 s after q:\n{}\nthreads:\n{}",
            tmux.capture(false),
            threads_waiting(tmux.pane_pid())
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let after = tmux.capture(false);
    assert_eq!(status, 0, "top exited {status}:\n{after}");
    // The terminal is ours again: the main screen with the summary, no panel left.
    assert!(
        after.contains("ctdrop: stopped after"),
        "no end-of-run line:\n{after}"
    );
    assert!(
        !after.contains("drops/s by cause (last 60 s)"),
        "the TUI is still on screen after q:\n{after}"
    );

    let (left, orphans) = bpf::wait_released(&held, &since, Duration::from_secs(10)).unwrap();
    assert!(
        left.is_empty(),
        "still attached after q: {:?}",
        left.iter().map(|o| &o.raw).collect::<Vec<_>>()
    );
    assert!(
        orphans.is_empty(),
        "ctdrop programs nobody holds: {:?}",
        orphans.iter().map(|o| &o.raw).collect::<Vec<_>>()
    );
}

/// Ctrl-C in the terminal (a key in raw mode, not a signal), SIGTERM and a
/// panic while the screen is drawn all end `top` with the terminal given
/// back (after it exits, `stty` finds canonical mode and echo on again and
/// the screen holds the end-of-run lines, not the panels) and nothing
/// attached; the first two with status 0, the panic with 101 and one line.
#[test]
fn top_gives_the_terminal_back_on_ctrl_c_sigterm_and_panic() {
    for how in ["C-c", "TERM", "panic"] {
        let since = bpf::high_water().unwrap();
        let bin = ctdrop_bin().display().to_string();
        let env = if how == "panic" {
            "CTDROP_TEST_PANIC_IN_TOP=1 RUST_BACKTRACE=0"
        } else {
            "RUST_BACKTRACE=0"
        };
        let script = format!("env {env} '{bin}' top; echo \"exit=$?\"; stty -a");
        let tmux = Tmux::start(&["sh", "-c", &script], 120, 30);
        tmux.wait_for("the screen", Duration::from_secs(60), |s| {
            s.contains("ctdrop top") && s.contains("q quit")
        });
        // The pane runs sh; ctdrop is its child.
        let sh = tmux.pane_pid();
        let pid: u32 = std::fs::read_to_string(format!("/proc/{sh}/task/{sh}/children"))
            .unwrap()
            .split_whitespace()
            .map(|p| p.parse().unwrap())
            .find(|p: &u32| {
                std::fs::read_to_string(format!("/proc/{p}/comm"))
                    .is_ok_and(|c| c.trim() == "ctdrop")
            })
            .unwrap_or_else(|| panic!("{how}: no ctdrop under the pane's shell"));
        let held = bpf::held_by(pid);
        assert!(
            !bpf::still_listed(&held).unwrap().is_empty(),
            "{how}: top holds nothing"
        );
        match how {
            // SAFETY: kill(2) to the ctdrop process found above.
            "TERM" => unsafe {
                libc::kill(pid as i32, libc::SIGTERM);
            },
            "C-c" => tmux.send(how),
            _ => {} // the hook panics two seconds in
        }
        let after = tmux.wait_for("the shell after ctdrop", Duration::from_secs(60), |s| {
            s.contains("exit=") && s.contains("speed")
        });
        let code = if how == "panic" { "exit=101" } else { "exit=0" };
        assert!(after.contains(code), "{how}: want {code}:\n{after}");
        assert!(
            !after.contains("q quit"),
            "{how}: the panels are still on screen:\n{after}"
        );
        let modes: Vec<&str> = after.split_whitespace().collect();
        for m in ["icanon", "echo", "isig"] {
            assert!(
                modes.contains(&m) && !modes.contains(&format!("-{m}").as_str()),
                "{how}: terminal left without {m}:\n{after}"
            );
        }
        if how == "panic" {
            let line = after
                .lines()
                .find(|l| l.starts_with("ctdrop: internal error"))
                .unwrap_or_else(|| panic!("no panic line:\n{after}"));
            assert!(line.contains("CTDROP_TEST_PANIC_IN_TOP"), "{line}");
        } else {
            assert!(
                after.contains("ctdrop: stopped after"),
                "{how}: no end-of-run line:\n{after}"
            );
        }
        let (left, orphans) = bpf::wait_released(&held, &since, Duration::from_secs(10)).unwrap();
        assert!(
            left.is_empty() && orphans.is_empty(),
            "{how}: left attached: {left:?} {orphans:?}"
        );
    }
}

/// Without a terminal on stdout, `top` says so in one line and exits 1
/// before loading anything.
#[test]
fn top_refuses_when_stdout_is_not_a_terminal() {
    let o = ctdrop(&["top"]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert_eq!(lines.len(), 1, "not one line: {stderr}");
    assert!(
        lines[0].starts_with("ctdrop: ") && lines[0].contains("not a terminal"),
        "{stderr}"
    );
    assert!(
        o.stdout.is_empty(),
        "wrote to stdout: {:?}",
        String::from_utf8_lossy(&o.stdout)
    );
}

/// The browser check itself can fail: a page that fetches an image and
/// logs an error is caught on both counts.
#[test]
fn browser_check_catches_a_fetch_and_a_console_error() {
    let scratch = Scratch::new();
    let page = PathBuf::from(scratch.file("bad.html"));
    std::fs::write(&page, "<!DOCTYPE html><html><body><img src=\"elsewhere.png\"><script>console.error('boom')</script></body></html>").unwrap();
    let mut b = Browser::start(800, 600);
    let v = b.open(&page);
    assert!(
        v.requests.iter().any(|u| u.ends_with("/elsewhere.png")),
        "the image fetch went unseen: {:?}",
        v.requests
    );
    assert!(
        v.errors.iter().any(|e| e.contains("boom")),
        "the console error went unseen: {:?}",
        v.errors
    );
}

/// A capture of the incident (table full, a raw-table DROP rule, pings
/// lost into the full table) as HTML, opened in headless Chromium: a
/// screenshot, no console error, no request but the page itself, one
/// series per cause seen, a mark per lost probe, and every number tagged
/// with a JSON key equal to `--format json`'s. `--before/--after` draws
/// two timelines on one page.
#[test]
fn html_report_opens_offline_and_matches_the_json_report() {
    let inc = Incident::new();
    let scratch = Scratch::new();
    // UDP to port 9 is dropped by a rule before conntrack sees it.
    inc.topo
        .receiver
        .exec(&[
            "iptables",
            "-t",
            "raw",
            "-I",
            "PREROUTING",
            "-p",
            "udp",
            "--dport",
            "9",
            "-j",
            "DROP",
        ])
        .unwrap();
    let cap = PathBuf::from(scratch.file("incident.ctdrop"));
    let cap_s = cap.display().to_string();
    capture_incident(&inc, &cap_s, "6s", 8, 30_000);

    let t = Instant::now();
    let j = ctdrop(&["report", &cap_s, "--format", "json"]);
    let json_ms = t.elapsed().as_secs_f64() * 1e3;
    assert!(j.status.success(), "{}", String::from_utf8_lossy(&j.stderr));
    let report: Value = serde_json::from_slice(&j.stdout).unwrap();
    let html = PathBuf::from(scratch.file("report.html"));
    let t = Instant::now();
    let h = ctdrop(&[
        "report",
        &cap_s,
        "--format",
        "html",
        "-o",
        &html.display().to_string(),
    ]);
    let html_ms = t.elapsed().as_secs_f64() * 1e3;
    eprintln!(
        "report of {} drops: --format json {json_ms:.1} ms, --format html {html_ms:.1} ms, {} bytes of HTML",
        report_len(&j.stdout),
        std::fs::metadata(&html).map(|m| m.len()).unwrap_or(0)
    );
    assert!(h.status.success(), "{}", String::from_utf8_lossy(&h.stderr));
    assert!(h.stdout.is_empty(), "-o: nothing on stdout");

    let seen = causes_seen(&report);
    let want: BTreeSet<String> = ["conntrack_table_full", "netfilter_rule"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert!(
        want.is_subset(&seen),
        "the capture lacks a cause the test made: {seen:?}\n{report}"
    );
    let lost_total: u64 = report["probes"]
        .as_object()
        .unwrap()
        .values()
        .map(|p| p["lost"].as_u64().unwrap())
        .sum();
    assert!(
        lost_total > 0,
        "no probe lost into the full table: {}",
        report["probes"]
    );
    // The timeline's numbers add up to the totals.
    for c in &seen {
        let sum: u64 = report["timeline"]["drops_per_second_by_cause"][c]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .sum();
        assert_eq!(
            Some(sum),
            report["drops_by_cause"][c].as_u64(),
            "{c}: per-second series vs total"
        );
    }

    let mut b = Browser::start(1100, 900);
    let visit = b.open(&html);
    assert!(
        visit.errors.is_empty(),
        "errors in the page: {:?}",
        visit.errors
    );
    assert_eq!(
        visit.requests.len(),
        1,
        "the page asked for more than itself: {:?}",
        visit.requests
    );
    assert!(
        visit.requests[0].starts_with("file://") && visit.requests[0].ends_with("report.html"),
        "{:?}",
        visit.requests
    );
    let facts: Value = serde_json::from_str(b.eval(PAGE_FACTS).as_str().unwrap()).unwrap();
    b.screenshot(&shot_path(&scratch, "report.png"));

    let svgs = facts["svgs"].as_array().unwrap();
    assert_eq!(svgs.len(), 1, "{facts}");
    let series: BTreeSet<String> = svgs[0]["series"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        series.len(),
        svgs[0]["series"].as_array().unwrap().len(),
        "a cause drawn twice: {facts}"
    );
    assert_eq!(series, seen, "one series per cause seen");
    assert_eq!(
        svgs[0]["lost"].as_u64(),
        Some(lost_total),
        "a mark per lost probe"
    );
    assert_eq!(
        svgs[0]["lost"].as_u64(),
        Some(report["timeline"]["lost_probes"].as_array().unwrap().len() as u64)
    );
    assert!(
        svgs[0]["fills"].as_u64() >= Some(1),
        "no fill line: {facts}"
    );
    assert!(
        svgs[0]["width"].as_f64() > Some(500.0),
        "the plot is not laid out: {facts}"
    );

    let keys = facts["keys"].as_object().unwrap();
    for must in [
        "drops_total",
        "events_lost",
        "duration_s",
        "kernel_counters/0/drop",
    ] {
        assert!(keys.contains_key(must), "no {must} in the page: {keys:?}");
    }
    for c in &seen {
        assert!(
            keys.contains_key(&format!("drops_by_cause/{c}")),
            "no total for {c}: {keys:?}"
        );
    }
    assert!(
        keys.contains_key(&format!("drops_by_netns/{}", inc.rx)),
        "no total for the receiver: {keys:?}"
    );
    // The capture holds the table snapshot taken when the table filled up.
    let snaps = report["occupancy"].as_array().map(Vec::len).unwrap_or(0);
    for i in 0..snaps {
        assert!(
            keys.contains_key(&format!("occupancy/{i}/entries")),
            "snapshot {i} not in the page: {keys:?}"
        );
    }
    eprintln!("snapshots in the capture: {snaps}");
    for (k, text) in keys {
        let text = text.as_str().unwrap().trim().trim_start_matches('+');
        let want = at(&report, k);
        match want {
            Value::Number(n) if n.is_f64() => {
                let got: f64 = text
                    .parse()
                    .unwrap_or_else(|_| panic!("{k}: {text:?} is not a number"));
                assert!(
                    (got - n.as_f64().unwrap()).abs() <= 0.05,
                    "{k}: page {got}, JSON {n}"
                );
            }
            Value::Number(n) => assert_eq!(text, n.to_string(), "{k}: page vs JSON"),
            other => panic!("{k}: the page shows {text:?}, JSON has {other}"),
        }
    }
    eprintln!("page numbers checked against JSON: {}", keys.len());

    // Before/after: the advised NOTRACK rules applied in the receiver
    // (PREROUTING for what comes in, OUTPUT for its echo replies; the raw
    // DROP for port 9 stays first), the same traffic captured again.
    for chain in ["PREROUTING", "OUTPUT"] {
        for proto in ["udp", "icmp"] {
            inc.topo
                .receiver
                .exec(&[
                    "iptables", "-t", "raw", "-A", chain, "-p", proto, "-j", "NOTRACK",
                ])
                .unwrap();
        }
    }
    let after = scratch.file("after.ctdrop");
    capture_incident(&inc, &after, "4s", 5, 40_000);
    let aj = ctdrop(&["report", &after, "--format", "json"]);
    let after_report: Value = serde_json::from_slice(&aj.stdout).unwrap();
    let after_seen = causes_seen(&after_report);
    assert!(
        !after_seen.contains("conntrack_table_full") && after_seen.contains("netfilter_rule"),
        "after NOTRACK: {after_seen:?}"
    );
    let cmp_html = PathBuf::from(scratch.file("compare.html"));
    let c = ctdrop(&[
        "report",
        "--before",
        &cap_s,
        "--after",
        &after,
        "--format",
        "html",
        "-o",
        &cmp_html.display().to_string(),
    ]);
    assert!(c.status.success(), "{}", String::from_utf8_lossy(&c.stderr));
    let cj = ctdrop(&[
        "report", "--before", &cap_s, "--after", &after, "--format", "json",
    ]);
    let cmp: Value = serde_json::from_slice(&cj.stdout).unwrap();
    let visit = b.open(&cmp_html);
    assert!(
        visit.errors.is_empty() && visit.requests.len() == 1,
        "{:?} {:?}",
        visit.errors,
        visit.requests
    );
    let facts: Value = serde_json::from_str(b.eval(PAGE_FACTS).as_str().unwrap()).unwrap();
    b.screenshot(&shot_path(&scratch, "report-before-after.png"));
    let svgs = facts["svgs"].as_array().unwrap();
    let ids: Vec<&str> = svgs.iter().map(|s| s["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["before", "after"], "{facts}");
    for (svg, want) in svgs.iter().zip([&seen, &after_seen]) {
        let got: BTreeSet<String> = svg["series"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect();
        assert_eq!(
            &got, want,
            "{}: one series per cause seen on that side",
            svg["id"]
        );
    }
    assert_eq!(
        facts["keys"]["after/drops_total"].as_str(),
        Some(after_report["drops_total"].to_string().as_str())
    );
    assert_eq!(
        facts["keys"]["verdict"], cmp["verdict"],
        "verdict in the page vs JSON"
    );
    assert_eq!(
        facts["keys"]["before/drops_total"].as_str(),
        Some(report["drops_total"].to_string().as_str())
    );
}

/// Each thread of `pid` with its name, state, wait channel and kernel stack.
fn threads_waiting(pid: u32) -> String {
    let read = |p: String| std::fs::read_to_string(p).unwrap_or_default();
    let mut out = String::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return format!("pid {pid} is gone");
    };
    for t in tasks.flatten() {
        let dir = t.path().display().to_string();
        let state = read(format!("{dir}/status"))
            .lines()
            .find(|l| l.starts_with("State:"))
            .unwrap_or_default()
            .to_string();
        out += &format!(
            "{} {} {} wchan={}\n{}\n",
            t.file_name().to_string_lossy(),
            read(format!("{dir}/comm")).trim(),
            state,
            read(format!("{dir}/wchan")),
            read(format!("{dir}/stack"))
        );
    }
    out
}

/// The exit status of `pid` when it is a zombie (exited, not yet reaped).
fn zombie_exit_status(pid: u32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses.
    let rest: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    if rest.first() != Some(&"Z") {
        return None;
    }
    // Field 52 overall; `rest` starts at field 3.
    let wait: i32 = rest.get(52 - 3)?.parse().ok()?;
    Some(if wait & 0x7f == 0 {
        (wait >> 8) & 0xff
    } else {
        128 + (wait & 0x7f)
    })
}
