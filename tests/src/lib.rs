//! Harness for ctdrop's integration tests (root only).
//!
//! Everything a test builds is torn down by a guard's `Drop`, also when the
//! test panics:
//! - [`Netns`]: a named network namespace `ctdt-<pid>-<n>` (`ip netns del`).
//! - [`Topology::pair`]: sender and receiver namespaces joined by a veth
//!   pair, addressed from 198.18.0.0/15, IPv6 off so nothing else talks.
//! - [`ConntrackMaxGuard`]: sets the global `net.netfilter.nf_conntrack_max`
//!   under an exclusive `flock` on [`LOCK_PATH`] and restores it.
//! - [`Ctdrop`]: a running `ctdrop` (SIGKILLed if the test never stops it).
//!
//! Traffic is generated in-process from a thread that has entered the
//! namespace ([`in_netns`]): [`send_udp_flows`] (one new flow per datagram)
//! and [`ping`] (ICMP echo with chosen ids, so every lost probe is known).

pub mod bpf;
pub mod clash;
pub mod mixed;
pub mod nfqueue;

use std::{
    io::{BufRead, BufReader, Read, Write},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{mpsc, Arc, Mutex},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

/// Lock file serializing every test that changes `nf_conntrack_max`, across
/// processes. While held it also stores the value to restore, so a run that
/// was killed mid-test is repaired by the next one.
pub const LOCK_PATH: &str = ctlab::LOCK_PATH;
pub const CONNTRACK_MAX: &str = ctlab::MAX_SYSCTL;

/// The ctdrop binary: `$CTDROP_BIN`, else `<workspace>/target/release/ctdrop`.
pub fn ctdrop_bin() -> PathBuf {
    match std::env::var_os("CTDROP_BIN") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/ctdrop"),
    }
}

// ------------------------------------------------------------------ scenes

// Namespaces, veths, the conntrack counters, traffic and floods come from
// ctlab, shared with `xtask bench` and `ctdrop demo`.
pub use ctlab::{
    ct_stats, flood, in_netns, next_id, parse_ct_stats, ping, read_max as read_conntrack_max, run,
    send_arp_requests, send_udp, send_udp_flows, set_icmp_checksum, settled_ct_stats,
    settled_ct_stats_within, write_max as write_conntrack_max, EchoProbe, Netns, Topology, UdpSink,
    VethPair,
};

/// Holds the lock on [`LOCK_PATH`] and the global `nf_conntrack_max`
/// (through `ctlab`, the same guard `ctdrop demo` uses: one lock, one wait
/// policy); puts the previous value back on drop (also when the test
/// panics), then releases the lock.
pub struct ConntrackMaxGuard {
    inner: ctlab::MaxGuard,
}

impl ConntrackMaxGuard {
    /// Waits for the lock, then sets `nf_conntrack_max` to `value`. Lowering
    /// is refused, with the namespace and its count, while a namespace
    /// other than this test process's own (`*-<pid>-*`) holds conntrack
    /// entries: on a developer's busy laptop the host and its containers
    /// would start dropping packets.
    pub fn set(value: u64) -> Result<ConntrackMaxGuard> {
        let mut inner = ctlab::MaxGuard::lock(&|| false)?;
        inner
            .set(value, &|n| n.name.as_deref().is_some_and(Netns::is_ours))
            .map_err(|e| anyhow!("ctdrop-tests: {e:#}"))?;
        Ok(ConntrackMaxGuard { inner })
    }

    /// The value that will be restored.
    pub fn previous(&self) -> u64 {
        self.inner.previous()
    }
}

/// `conntrack_table_full` drop from now on, for the 30 s the fill lives.
pub fn full_pair_with_prefix(prefix: &str, max: u64) -> Result<(Topology, ConntrackMaxGuard)> {
    let topo = Topology::pair_with_prefix(prefix)?;
    topo.track_receiver()?;
    let guard = ConntrackMaxGuard::set(max)?;
    send_udp_flows(&topo.sender, topo.receiver_addr, 10_000, max as u16 + 16)?;
    let s = settled_ct_stats(&topo.receiver, "drop")?;
    if s["entries"] != max {
        bail!("table not full after the fill: {s:?}");
    }
    Ok((topo, guard))
}

// ------------------------------------------------------------------ ctdrop

/// A running `ctdrop`, killed on drop unless [`Ctdrop::stop`]ped.
pub struct Ctdrop {
    child: Child,
    own_stdout: Option<std::process::ChildStdout>,
    stdout: Option<JoinHandle<String>>,
    /// [`Stdout::All`]: a regular file, read once ctdrop has exited. A
    /// pipe would need this process to keep up with ctdrop's output while
    /// the test's flood takes both CPUs; when it did not, ctdrop's
    /// slow-reader policy dropped lines (said on stderr) and per-record
    /// checks failed for the harness's sake.
    stdout_file: Option<std::fs::File>,
    stderr: Option<JoinHandle<()>>,
    stderr_text: Arc<Mutex<String>>,
}

/// Where a spawned ctdrop's stdout goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stdout {
    /// Collected whole.
    All,
    /// Only the last n lines kept.
    Tail(usize),
    /// Handed to the test.
    Caller,
}

/// What a finished ctdrop printed.
#[derive(Debug)]
pub struct CtdropOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    /// stdout's JSON lines (empty without --json).
    pub records: Vec<Value>,
}

impl Ctdrop {
    /// Starts `ctdrop <args>` and waits (20 s at most) for its
    /// `ctdrop: attached` line on stderr.
    pub fn spawn(args: &[&str]) -> Result<Ctdrop> {
        Ctdrop::spawn_env(args, &[])
    }

    /// [`Ctdrop::spawn`] with extra environment variables (test hooks).
    pub fn spawn_env(args: &[&str], env: &[(&str, &str)]) -> Result<Ctdrop> {
        Ctdrop::spawn_opts(args, env, Stdout::All, None)
    }

    /// [`Ctdrop::spawn_env`] with RLIMIT_NOFILE set to `(soft, hard)` in the
    /// child before it runs ctdrop, as `ulimit -n` would.
    pub fn spawn_nofile(args: &[&str], env: &[(&str, &str)], nofile: (u64, u64)) -> Result<Ctdrop> {
        Ctdrop::spawn_opts(args, env, Stdout::All, Some(nofile))
    }

    /// [`Ctdrop::spawn`] keeping only the last `lines` lines of stdout: for
    /// floods, whose millions of drop lines nobody reads (the summary is
    /// the last line).
    pub fn spawn_tail(args: &[&str], lines: usize) -> Result<Ctdrop> {
        Ctdrop::spawn_opts(args, &[], Stdout::Tail(lines), None)
    }

    /// [`Ctdrop::spawn`] leaving stdout to the test ([`Ctdrop::take_stdout`]),
    /// e.g. to close it like `ctdrop live | head -1` does.
    pub fn spawn_own_stdout(args: &[&str]) -> Result<Ctdrop> {
        Ctdrop::spawn_opts(args, &[], Stdout::Caller, None)
    }

    /// The pipe ctdrop writes to, with [`Ctdrop::spawn_own_stdout`].
    pub fn take_stdout(&mut self) -> Option<std::process::ChildStdout> {
        self.own_stdout.take()
    }

    fn spawn_opts(
        args: &[&str],
        env: &[(&str, &str)],
        mode: Stdout,
        nofile: Option<(u64, u64)>,
    ) -> Result<Ctdrop> {
        let mut cmd = Command::new(ctdrop_bin());
        if let Some((soft, hard)) = nofile {
            use std::os::unix::process::CommandExt;
            let lim = libc::rlimit {
                rlim_cur: soft,
                rlim_max: hard,
            };
            // SAFETY: setrlimit is async-signal-safe and touches only the child.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                })
            };
        }
        cmd.args(args).envs(env.iter().copied());
        Ctdrop::spawn_command(cmd, mode)
    }

    /// [`Ctdrop::spawn`] of a command line of the test's own making: another
    /// ctdrop binary, or one run through a wrapper (`chroot ROOT /ctdrop`).
    pub fn spawn_argv(argv: &[&str]) -> Result<Ctdrop> {
        let (first, rest) = argv
            .split_first()
            .ok_or_else(|| anyhow!("empty command line"))?;
        let mut cmd = Command::new(first);
        cmd.args(rest);
        Ctdrop::spawn_command(cmd, Stdout::All)
    }

    fn spawn_command(mut cmd: Command, mode: Stdout) -> Result<Ctdrop> {
        let stdout_file = if mode == Stdout::All {
            Some(unlinked_temp_file().context("a file for ctdrop's stdout")?)
        } else {
            None
        };
        let to = match &stdout_file {
            Some(f) => Stdio::from(f.try_clone()?),
            None => Stdio::piped(),
        };
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(to)
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", cmd.get_program().to_string_lossy()))?;
        let out = child.stdout.take();
        let (out, own_stdout) = match mode {
            Stdout::Caller => (None, out),
            _ => (out, None),
        };
        let stdout = std::thread::spawn(move || match (mode, out) {
            (_, None) => String::new(),
            (Stdout::Tail(n), Some(out)) => {
                let mut last = std::collections::VecDeque::with_capacity(n + 1);
                for line in BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    last.push_back(line);
                    if last.len() > n {
                        last.pop_front();
                    }
                }
                last.into_iter().map(|l| l + "\n").collect()
            }
            (_, Some(mut out)) => {
                let mut s = String::new();
                let _ = out.read_to_string(&mut s);
                s
            }
        });
        let (tx, rx) = mpsc::channel::<String>();
        let stderr_text = Arc::new(Mutex::new(String::new()));
        let err = child.stderr.take().unwrap();
        let text = stderr_text.clone();
        let stderr = std::thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                let mut t = text.lock().unwrap();
                t.push_str(&line);
                t.push('\n');
                drop(t);
                let _ = tx.send(line);
            }
        });
        let mut me = Ctdrop {
            child,
            own_stdout,
            stdout: Some(stdout),
            stdout_file,
            stderr: Some(stderr),
            stderr_text,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                // `watch` logs as a service: `ctdrop: info: attached ...`.
                Ok(line)
                    if line.starts_with("ctdrop: attached")
                        || line.starts_with("ctdrop: info: attached") =>
                {
                    return Ok(me)
                }
                Ok(_) => {}
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    bail!(
                        "ctdrop did not attach within 20 s; stderr: {}",
                        me.stderr_text.lock().unwrap()
                    )
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = me.child.wait()?;
                    bail!(
                        "ctdrop exited ({status}) before attaching; stderr: {}",
                        me.stderr_text.lock().unwrap()
                    )
                }
            }
        }
    }

    /// Gives the last events 300 ms to come through the ring, stops
    /// ([`Ctdrop::stop`]) and asserts ctdrop exited 0.
    #[track_caller]
    pub fn stop_drained(self) -> CtdropOutput {
        std::thread::sleep(Duration::from_millis(300));
        let out = self.stop().unwrap();
        out.assert_success();
        out
    }

    /// SIGINT, then waits (20 s at most) for the summary and the exit.
    pub fn stop(self) -> Result<CtdropOutput> {
        self.stop_with(libc::SIGINT)
    }

    /// Sends `sig`, then waits (20 s at most) for the exit.
    pub fn stop_with(mut self, sig: i32) -> Result<CtdropOutput> {
        self.signal(sig);
        self.finish(Duration::from_secs(20))
    }

    /// Waits (at most `timeout`) for an exit ctdrop comes to by itself
    /// (`--duration`, a crash).
    pub fn wait(mut self, timeout: Duration) -> Result<CtdropOutput> {
        self.finish(timeout)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, sig: i32) {
        unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
    }

    /// ctdrop's resident set size now, in KiB (`VmRSS`).
    pub fn rss_kib(&self) -> Result<u64> {
        rss_kib(self.pid())
    }

    /// The stderr lines printed so far.
    pub fn stderr_so_far(&self) -> String {
        self.stderr_text.lock().unwrap().clone()
    }

    fn finish(&mut self, timeout: Duration) -> Result<CtdropOutput> {
        let status = wait_timeout(&mut self.child, timeout)?;
        let mut stdout = self
            .stdout
            .take()
            .unwrap()
            .join()
            .map_err(|_| anyhow!("stdout reader panicked"))?;
        if let Some(mut f) = self.stdout_file.take() {
            use std::io::Seek;
            f.rewind().context("rewinding ctdrop's stdout file")?;
            f.read_to_string(&mut stdout)
                .context("reading ctdrop's stdout file")?;
        }
        self.stderr
            .take()
            .unwrap()
            .join()
            .map_err(|_| anyhow!("stderr reader panicked"))?;
        let stderr = self.stderr_text.lock().unwrap().clone();
        // Human output has no records; JSON output must be JSON throughout.
        let json = stdout
            .lines()
            .find(|l| !l.trim().is_empty())
            .is_some_and(|l| l.starts_with('{'));
        let records = if json {
            parse_json_lines(&stdout)?
        } else {
            Vec::new()
        };
        Ok(CtdropOutput {
            status,
            stdout,
            stderr,
            records,
        })
    }
}

/// A new file in the temp directory, already unlinked: gone with its
/// last descriptor, whatever way the test ends.
fn unlinked_temp_file() -> Result<std::fs::File> {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let path = std::env::temp_dir().join(format!(
        "ctdrop-tests-stdout-{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let f = std::fs::File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    std::fs::remove_file(&path).with_context(|| format!("unlinking {}", path.display()))?;
    Ok(f)
}

impl Drop for Ctdrop {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `VmRSS` of process `pid`, in KiB.
pub fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .ok_or_else(|| anyhow!("no VmRSS for pid {pid}"))?;
    let kib = line
        .split_whitespace()
        .nth(1)
        .ok_or_else(|| anyhow!("bad line {line:?}"))?;
    kib.parse().with_context(|| format!("bad line {line:?}"))
}

/// Waits for `child`; SIGKILLs it and errs after `timeout`.
fn wait_timeout(child: &mut Child, timeout: Duration) -> Result<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = child.try_wait()? {
            return Ok(st);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("ctdrop still running after {timeout:?}: killed");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `ctdrop <args>` to the end (killed and an error after `timeout`),
/// e.g. for argument errors. `prefix` goes in front of the binary (`setpriv ...`).
pub fn run_ctdrop(prefix: &[&str], args: &[&str], timeout: Duration) -> Result<CtdropOutput> {
    let bin = ctdrop_bin();
    let mut cmd = match prefix.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(&bin);
            c
        }
        None => Command::new(&bin),
    };
    let child = cmd
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let mut c = Ctdrop {
        child,
        own_stdout: None,
        stdout: None,
        stdout_file: None,
        stderr: None,
        stderr_text: Arc::new(Mutex::new(String::new())),
    };
    let mut out = c.child.stdout.take().unwrap();
    c.stdout = Some(std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    }));
    let mut err = c.child.stderr.take().unwrap();
    let text = c.stderr_text.clone();
    c.stderr = Some(std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        *text.lock().unwrap() = s;
    }));
    c.finish(timeout)
}

/// Runs an outside tool (promtool, tshark, systemd-analyze, ...) with
/// `stdin` fed to it: (exit 0?, stdout, stderr). A missing tool panics with
/// the hint that `cargo xtask setup` installs it.
pub fn tool(cmd: &str, args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    let mut child = Command::new(cmd)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd}: {e} (cargo xtask setup installs it)"));
    let mut i = child.stdin.take().unwrap();
    if let Some(s) = stdin {
        i.write_all(s.as_bytes()).unwrap();
    }
    drop(i);
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Every non-empty line must be one JSON object.
pub fn parse_json_lines(stdout: &str) -> Result<Vec<Value>> {
    stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).with_context(|| format!("stdout line is not JSON: {l:?}")))
        .collect()
}

impl CtdropOutput {
    /// An error as a user should see it: no panic or backtrace on stderr,
    /// nothing on stdout.
    #[track_caller]
    pub fn assert_clean_error(&self) {
        let out = self;
        for bad in ["panicked", "backtrace", "RUST_BACKTRACE"] {
            assert!(
                !out.stderr.contains(bad),
                "stderr mentions {bad:?}: {}",
                out.stderr
            );
        }
        assert!(
            out.stdout.trim().is_empty(),
            "stdout on error: {}",
            out.stdout
        );
    }

    /// Asserts ctdrop exited 0, with its stderr when it did not.
    #[track_caller]
    pub fn assert_success(&self) {
        assert!(
            self.status.success(),
            "ctdrop failed: {:?}\n{}",
            self.status,
            self.stderr
        );
    }

    /// The `kind: drop` records.
    pub fn drops(&self) -> Vec<&Value> {
        self.records
            .iter()
            .filter(|r| r["kind"] == "drop")
            .collect()
    }

    /// Drop records in the namespace with inode `netns`.
    pub fn drops_in(&self, netns: u32) -> Vec<&Value> {
        self.drops()
            .into_iter()
            .filter(|r| r["netns"].as_u64() == Some(netns as u64))
            .collect()
    }

    /// The one `kind: summary` record, which must be the last line.
    pub fn summary(&self) -> Result<&Value> {
        let sums: Vec<&Value> = self
            .records
            .iter()
            .filter(|r| r["kind"] == "summary")
            .collect();
        if sums.len() != 1 {
            bail!(
                "expected one summary line, got {}; stderr: {}",
                sums.len(),
                self.stderr
            );
        }
        if self
            .records
            .last()
            .map(|r| r["kind"] != "summary")
            .unwrap_or(true)
        {
            bail!("the summary is not the last line");
        }
        Ok(sums[0])
    }

    /// The summary's `kernel_counters` entry for `netns`, if any.
    pub fn kernel_counters(&self, netns: u32) -> Result<Option<&Value>> {
        let s = self.summary()?;
        let list = s["kernel_counters"]
            .as_array()
            .ok_or_else(|| anyhow!("summary without kernel_counters: {s}"))?;
        Ok(list
            .iter()
            .find(|c| c["netns"].as_u64() == Some(netns as u64)))
    }

    pub fn stderr_lines(&self) -> Vec<&str> {
        self.stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect()
    }
}

/// A scratch directory under the temp dir, removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new() -> Scratch {
        let p =
            std::env::temp_dir().join(format!("ctdt-scratch-{}-{}", std::process::id(), next_id()));
        std::fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }

    pub fn file(&self, name: &str) -> String {
        self.0.join(name).display().to_string()
    }
}

impl Default for Scratch {
    fn default() -> Self {
        Scratch::new()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A pair whose receiver's table is full (`max` entries, held by the
/// returned guard): every new flow into it is a `conntrack_table_full` drop.
pub fn full_table_pair(max: u64) -> (Topology, ConntrackMaxGuard) {
    full_pair_with_prefix("ctdt", max).unwrap()
}

/// Most of `sent` new flows into `rx`'s full table were dropped (at least
/// 90%; the kernel's `drop_delta`), and [`assert_table_full_exact`].
pub fn assert_flows_dropped_exact(out: &CtdropOutput, rx: u32, drop_delta: u64, sent: u16) {
    assert!(
        drop_delta >= sent as u64 * 9 / 10,
        "only {drop_delta} of {sent} dropped"
    );
    assert_table_full_exact(out, rx, drop_delta);
}

/// One `conntrack_table_full` record in namespace `rx` per drop the kernel
/// counted there (`drop_delta`), nothing else, nothing lost, and the
/// summary's kernel counters agreeing.
pub fn assert_table_full_exact(out: &CtdropOutput, rx: u32, drop_delta: u64) {
    let mine = out.drops_in(rx);
    let full = mine
        .iter()
        .filter(|r| r["cause"] == "conntrack_table_full")
        .count() as u64;
    assert_eq!(
        full, drop_delta,
        "table-full records vs the kernel's drop counter; stderr:\n{}",
        out.stderr
    );
    assert_eq!(mine.len() as u64, full, "records other than table-full");
    let s = out.summary().unwrap();
    assert_eq!(s["events_lost"], 0, "summary {s}");
    let kc = out
        .kernel_counters(rx)
        .unwrap()
        .unwrap_or_else(|| panic!("no kernel_counters for {rx}: {s}"));
    assert_eq!(kc["agree"], true, "kernel counters {kc}");
}
