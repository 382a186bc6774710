//! The tracers under test: how each is started, when it counts as
//! attached, and what it reports once stopped.

use std::{
    io::{BufRead, BufReader, Read},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::mpsc::{self, Receiver, RecvTimeoutError},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// No tracer: the baseline.
    None,
    /// `ctdrop live --json > /dev/null`: one record per drop.
    CtdropJson,
    /// `ctdrop live --count-only > /dev/null`: in-kernel counters.
    CtdropCount,
    /// `ctdrop <extra args> > /dev/null`: a configuration named on the
    /// command line (`--ctdrop-config watch='watch ...'`); it must print
    /// ctdrop's `attached` and `stopped` lines like `live` does.
    CtdropCustom,
    /// bpftrace map-count one-liner.
    BpftraceCount,
    /// bpftrace per-event printf one-liner.
    BpftracePrintf,
}

#[derive(Clone, Debug)]
pub struct Config {
    /// Short key used in the table and the JSON file ("a", "b", "b@1M").
    pub key: String,
    pub kind: Kind,
    /// Extra ctdrop arguments (e.g. `--ring-size 1M` for a sweep).
    pub extra: Vec<String>,
    /// Another ctdrop build to run instead of this tree's (custom
    /// configurations whose arguments start with a path): an A/B of two
    /// builds in one run, where the machine's drift between runs cannot
    /// pass for a difference.
    pub bin: Option<PathBuf>,
}

impl Config {
    pub fn new(key: &str, kind: Kind) -> Config {
        Config {
            key: key.to_string(),
            kind,
            extra: Vec::new(),
            bin: None,
        }
    }

    pub fn describe(&self, env: &Env) -> String {
        let mut s = match self.kind {
            Kind::None => "no tracer".to_string(),
            Kind::CtdropJson => "ctdrop live --json > /dev/null".to_string(),
            Kind::CtdropCount => "ctdrop live --count-only > /dev/null".to_string(),
            Kind::CtdropCustom => match &self.bin {
                Some(bin) => bin.display().to_string(),
                None => "ctdrop".to_string(),
            },
            Kind::BpftraceCount => format!("bpftrace '{}'", bpftrace_count_script()),
            Kind::BpftracePrintf => format!(
                "bpftrace '{}' | wc -l",
                bpftrace_printf_script(env.netfilter_drop)
            ),
        };
        for a in &self.extra {
            s.push(' ');
            s.push_str(a);
        }
        s
    }
}

/// What every tracer run needs to know.
pub struct Env {
    pub ctdrop: PathBuf,
    /// This kernel's SKB_DROP_REASON_NETFILTER_DROP (from the tracepoint format).
    pub netfilter_drop: u32,
    /// Arguments added to every ctdrop run.
    pub ctdrop_args: Vec<String>,
}

fn bpftrace_count_script() -> String {
    "tracepoint:skb:kfree_skb { @[args->reason] = count(); }".to_string()
}

fn bpftrace_printf_script(nf: u32) -> String {
    format!("tracepoint:skb:kfree_skb /args->reason == {nf}/ {{ printf(\"%p %p %d\\n\", args->skbaddr, args->location, args->reason); }}")
}

/// BEGIN fires once every probe is attached, so its line means "ready".
const BPFTRACE_READY: &str = "BEGIN { printf(\"ready\\n\"); } ";

/// What a tracer reported after it was stopped.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub delivered: Option<u64>,
    pub lost: Option<u64>,
    /// User+sys CPU seconds from just before the flood to exit.
    pub cpu_s: Option<f64>,
    pub peak_rss_kb: Option<u64>,
    /// Process start to attached (wall clock, seen from here).
    pub attach_ms: Option<f64>,
    /// Attach time the tracer itself printed (ctdrop only).
    pub own_attach_ms: Option<f64>,
    /// Extra facts (flows tracked, flows beyond the cap, ...).
    pub notes: Vec<(String, u64)>,
    /// Kernel run time of the tracer's BPF programs during the flood.
    pub bpf: Option<super::bpf_stats::ProgStats>,
}

enum Line {
    Out(String),
    Err(String),
}

pub struct Running {
    child: Child,
    kind: Kind,
    started: Instant,
    lines: Receiver<(Line, Instant)>,
    readers: Vec<JoinHandle<u64>>,
    out: Vec<String>,
    err: Vec<String>,
    report: Report,
    cpu_at_flood: Option<f64>,
    bpf_at_flood: Option<super::bpf_stats::ProgStats>,
    netfilter_drop: u32,
}

pub fn start(cfg: &Config, env: &Env) -> Result<Option<Running>> {
    let mut cmd = match cfg.kind {
        Kind::None => return Ok(None),
        Kind::CtdropCustom => {
            let mut c = Command::new(cfg.bin.as_ref().unwrap_or(&env.ctdrop));
            c.args(&cfg.extra).args(&env.ctdrop_args);
            c.stdout(Stdio::null());
            c
        }
        Kind::CtdropJson | Kind::CtdropCount => {
            let mut c = Command::new(&env.ctdrop);
            c.arg("live").arg(if cfg.kind == Kind::CtdropJson {
                "--json"
            } else {
                "--count-only"
            });
            c.args(&env.ctdrop_args).args(&cfg.extra);
            c.stdout(Stdio::null());
            c
        }
        Kind::BpftraceCount | Kind::BpftracePrintf => {
            let script = match cfg.kind {
                Kind::BpftraceCount => bpftrace_count_script(),
                _ => bpftrace_printf_script(env.netfilter_drop),
            };
            let mut c = Command::new("bpftrace");
            c.arg("-e").arg(format!("{BPFTRACE_READY}{script}"));
            c.stdout(Stdio::piped());
            c
        }
    };
    cmd.stderr(Stdio::piped()).stdin(Stdio::null());
    let started = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {}", cfg.describe(env)))?;
    let (tx, rx) = mpsc::channel();
    let mut readers = Vec::new();
    if let Some(out) = child.stdout.take() {
        let tx = tx.clone();
        // Event lines are counted here, not forwarded: a million channel
        // sends a second would cost this process more than the count.
        let is_event = cfg.kind == Kind::BpftracePrintf;
        readers.push(std::thread::spawn(move || {
            read_lines(
                out,
                |l| is_event && l.starts_with("0x"),
                |l| tx.send((Line::Out(l), Instant::now())).is_ok(),
            )
        }));
    }
    if let Some(err) = child.stderr.take() {
        let tx = tx.clone();
        readers.push(std::thread::spawn(move || {
            read_lines(
                err,
                |_| false,
                |l| tx.send((Line::Err(l), Instant::now())).is_ok(),
            )
        }));
    }
    Ok(Some(Running {
        child,
        kind: cfg.kind,
        started,
        lines: rx,
        readers,
        out: Vec::new(),
        err: Vec::new(),
        report: Report::default(),
        cpu_at_flood: None,
        bpf_at_flood: None,
        netfilter_drop: env.netfilter_drop,
    }))
}

/// Reads lines; those `counted` are only counted, the rest go to `forward`.
fn read_lines(
    r: impl Read,
    counted: impl Fn(&str) -> bool,
    forward: impl Fn(String) -> bool,
) -> u64 {
    let mut r = BufReader::with_capacity(1 << 16, r);
    let mut line = String::new();
    let mut n = 0;
    loop {
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) | Err(_) => return n,
            Ok(_) => {}
        }
        let l = line.trim_end();
        if counted(l) {
            n += 1;
        } else {
            forward(l.to_string());
        }
    }
}

impl Running {
    fn take_line(&mut self, timeout: Duration) -> Result<Option<(String, bool, Instant)>> {
        match self.lines.recv_timeout(timeout) {
            Ok((Line::Out(l), t)) => {
                self.out.push(l.clone());
                Ok(Some((l, true, t)))
            }
            Ok((Line::Err(l), t)) => {
                self.err.push(l.clone());
                Ok(Some((l, false, t)))
            }
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => bail!(
                "the tracer exited before it was attached: {}",
                self.err.join(" | ")
            ),
        }
    }

    /// Waits for the tracer's own "attached" signal.
    pub fn wait_attached(&mut self, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            let Some((l, stdout, t)) = self.take_line(Duration::from_millis(100))? else {
                continue;
            };
            let ready = match self.kind {
                Kind::CtdropJson | Kind::CtdropCount | Kind::CtdropCustom => {
                    !stdout && unlevelled(&l).starts_with("ctdrop: attached")
                }
                _ => stdout && l == "ready",
            };
            if ready {
                self.report.attach_ms = Some((t - self.started).as_secs_f64() * 1e3);
                self.report.own_attach_ms = number_before(&l, " ms").map(|n| n as f64);
                return Ok(());
            }
        }
        bail!(
            "the tracer did not attach within {} s: {}",
            limit.as_secs(),
            self.err.join(" | ")
        )
    }

    pub fn mark_flood_start(&mut self) {
        self.cpu_at_flood = cpu_seconds(self.child.id()).ok();
        self.bpf_at_flood = super::bpf_stats::of_process(self.child.id()).ok();
    }

    /// Right after the flood, before the tracer is stopped (its programs
    /// are gone once it exits).
    pub fn mark_flood_end(&mut self) {
        let now = super::bpf_stats::of_process(self.child.id()).ok();
        self.report.bpf = now.zip(self.bpf_at_flood.as_ref()).map(|(n, s)| {
            let mut d = n.since(s);
            d.name_programs();
            d
        });
    }

    /// SIGINT, wait for exit, collect what it printed and its rusage.
    pub fn stop(mut self) -> Result<Report> {
        let pid = self.child.id() as i32;
        let mut peak = vm_hwm_kb(pid);
        unsafe { libc::kill(pid, libc::SIGINT) };
        // bpftrace 0.17 now and then ignores the SIGINT (4 of 9 runs of a
        // 7-round bench waited the full minute, then failed the bench); it
        // takes a repeated one. ctdrop gets one: it has nothing to lose by
        // waiting, and a second signal is not asked of it.
        let again = matches!(self.kind, Kind::BpftraceCount | Kind::BpftracePrintf);
        let (status, ru) = wait_with_timeout(pid, Duration::from_secs(60), again, &mut peak)?;
        let total = tv(ru.ru_utime) + tv(ru.ru_stime);
        self.report.cpu_s = self.cpu_at_flood.map(|c| (total - c).max(0.0));
        self.report.peak_rss_kb = peak;
        let mut counted = 0;
        for h in self.readers.drain(..) {
            counted += h.join().unwrap_or(0);
        }
        while let Ok((l, _)) = self.lines.try_recv() {
            match l {
                Line::Out(l) => self.out.push(l),
                Line::Err(l) => self.err.push(l),
            }
        }
        let ok = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
        // bpftrace exits non-zero after SIGINT on some versions; judge it by its output.
        if !ok
            && matches!(
                self.kind,
                Kind::CtdropJson | Kind::CtdropCount | Kind::CtdropCustom
            )
        {
            bail!(
                "ctdrop failed (status {status:#x}): {}",
                self.err.join(" | ")
            );
        }
        match self.kind {
            Kind::CtdropJson | Kind::CtdropCount | Kind::CtdropCustom => self.parse_ctdrop()?,
            Kind::BpftraceCount => {
                self.report.delivered = Some(self.bpftrace_map_value()?);
                self.report.lost = Some(0);
            }
            Kind::BpftracePrintf => {
                self.report.delivered = Some(counted);
                let lost = self
                    .out
                    .iter()
                    .chain(self.err.iter())
                    .filter_map(|l| lost_events(l))
                    .sum();
                self.report.lost = Some(lost);
            }
            Kind::None => {}
        }
        Ok(std::mem::take(&mut self.report))
    }

    fn parse_ctdrop(&mut self) -> Result<()> {
        let line = self
            .err
            .iter()
            .find(|l| unlevelled(l).starts_with("ctdrop: stopped"))
            .ok_or_else(|| {
                anyhow!(
                    "ctdrop printed no `ctdrop: stopped` line: {}",
                    self.err.join(" | ")
                )
            })?
            .clone();
        self.report.delivered = number_before(&line, " drops");
        self.report.lost = Some(number_before(&line, " events lost").unwrap_or(0));
        for (key, label) in [
            ("flows_tracked", " flows tracked"),
            (
                "drops_beyond_max_flows",
                " drops in flows beyond --max-flows",
            ),
            (
                "flows_beyond_kernel_map",
                " drops in flows beyond the kernel flow map",
            ),
        ] {
            if let Some(n) = number_before(&line, label) {
                self.report.notes.push((key.to_string(), n));
            }
        }
        Ok(())
    }

    fn bpftrace_map_value(&self) -> Result<u64> {
        // Only the BEGIN line and the map are on stdout: `@[12]: 1234`.
        let want = format!("@[{}]:", self.netfilter_drop);
        Ok(self
            .out
            .iter()
            .find_map(|l| l.strip_prefix(&want).and_then(|v| v.trim().parse().ok()))
            .unwrap_or(0))
    }
}

fn lost_events(l: &str) -> Option<u64> {
    let i = l.find("Lost ")?;
    l[i + 5..].split_whitespace().next()?.parse().ok()
}

/// The integer just before `suffix` in `line` (`"... 123 drops ..."`).
pub fn number_before(line: &str, suffix: &str) -> Option<u64> {
    let end = line.find(suffix)?;
    let head = &line[..end];
    let start = head
        .rfind(|c: char| !c.is_ascii_digit())
        .map(|i| i + 1)
        .unwrap_or(0);
    head[start..].parse().ok()
}

fn tv(t: libc::timeval) -> f64 {
    t.tv_sec as f64 + t.tv_usec as f64 / 1e6
}

/// utime + stime of a running process, from /proc/<pid>/stat.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let s =
        std::fs::read_to_string(format!("/proc/{pid}/stat")).context("reading /proc/<pid>/stat")?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = &s[s
        .rfind(')')
        .ok_or_else(|| anyhow!("odd /proc/<pid>/stat"))?
        + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of the file are the 12th and 13th after the name.
    let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks as f64 / hz)
}

/// VmHWM of a live process. Not rusage's ru_maxrss: that also counts the
/// forked copy of this process before exec.
fn vm_hwm_kb(pid: i32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// Waits for exit, sampling VmHWM meanwhile (it is gone once the process is).
fn wait_with_timeout(
    pid: i32,
    limit: Duration,
    sigint_again: bool,
    peak: &mut Option<u64>,
) -> Result<(i32, libc::rusage)> {
    let start = Instant::now();
    let deadline = start + limit;
    let mut next_sigint = start + Duration::from_secs(3);
    loop {
        if let Some(kb) = vm_hwm_kb(pid) {
            *peak = Some(peak.unwrap_or(0).max(kb));
        }
        let mut status = 0;
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        let rc = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut ru) };
        if rc == pid {
            return Ok((status, ru));
        }
        if rc < 0 {
            bail!("wait4: {}", std::io::Error::last_os_error());
        }
        if sigint_again && Instant::now() > next_sigint {
            unsafe { libc::kill(pid, libc::SIGINT) };
            next_sigint += Duration::from_secs(3);
        }
        if Instant::now() > deadline {
            unsafe { libc::kill(pid, libc::SIGKILL) };
            bail!(
                "the tracer did not exit within {} s of SIGINT (killed)",
                limit.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // Still running only when the bench bailed out mid-round.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `ctdrop: info: x` (`watch` logs with a level) read as `ctdrop: x`.
fn unlevelled(l: &str) -> std::borrow::Cow<'_, str> {
    match l.strip_prefix("ctdrop: info: ") {
        Some(rest) => format!("ctdrop: {rest}").into(),
        None => l.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_in_ctdrop_lines() {
        let l = "ctdrop: stopped after 3.1 s: 912345 drops recorded, 0 events lost, 65536 flows tracked";
        assert_eq!(number_before(l, " drops"), Some(912345));
        assert_eq!(number_before(l, " events lost"), Some(0));
        assert_eq!(number_before(l, " flows tracked"), Some(65536));
        assert_eq!(number_before(l, " nothing"), None);
        assert_eq!(number_before("attached in 41 ms", " ms"), Some(41));
        assert_eq!(lost_events("Lost 1234 events"), Some(1234));
    }
}
