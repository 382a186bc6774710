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
pub mod flood;
pub mod mixed;

use std::{
    collections::BTreeMap,
    fs::File,
    io::{BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, UdpSocket},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::fs::MetadataExt,
    },
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        atomic::{AtomicU32, Ordering},
        mpsc, Arc, Mutex,
    },
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

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A number unique within this process (namespace names, subnets, ids).
pub fn next_id() -> u32 {
    COUNTER.fetch_add(1, Ordering::Relaxed)
}

/// Runs `cmd` and returns its stdout; an error (with stderr) unless it exits 0.
pub fn run(cmd: &[&str]) -> Result<String> {
    let out = Command::new(cmd[0])
        .args(&cmd[1..])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `f` on a fresh thread that has entered the network namespace at
/// `ns_path` (the calling thread stays where it is).
pub fn in_netns<T: Send + 'static>(
    ns_path: &Path,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let ns = File::open(ns_path).with_context(|| format!("opening {}", ns_path.display()))?;
    std::thread::spawn(move || {
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns: {}", std::io::Error::last_os_error());
        }
        f()
    })
    .join()
    .map_err(|_| anyhow!("namespace worker panicked"))?
}

// ---------------------------------------------------------------- namespaces

/// A named network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// Creates `ctdt-<pid>-<n>` with loopback up and IPv6 off (no router
    /// solicitations or DAD packets to muddy the counts).
    pub fn new() -> Result<Netns> {
        Netns::with_prefix("ctdt")
    }

    /// `<prefix>-<pid>-<n>`: a suite's own prefix, so a leftover says whose it is.
    pub fn with_prefix(prefix: &str) -> Result<Netns> {
        let name = format!("{prefix}-{}-{}", std::process::id(), next_id());
        run(&["ip", "netns", "add", &name])?;
        let ns = Netns { name };
        ns.exec(&[
            "sysctl",
            "-qw",
            "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.default.disable_ipv6=1",
        ])?;
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// The namespace's inode: what ctdrop reports as `netns`.
    pub fn inode(&self) -> Result<u32> {
        Ok(std::fs::metadata(self.path())?.ino() as u32)
    }

    /// `ip netns exec NAME cmd...`; stdout, or an error with stderr.
    pub fn exec(&self, cmd: &[&str]) -> Result<String> {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(cmd);
        run(&full)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = run(&["ip", "netns", "del", &self.name]) {
            eprintln!("ctdrop-tests: cleanup: {e:#}");
        }
    }
}

/// The two ends of a veth pair, each created directly in its namespace
/// (never in the initial one, so names cannot collide); they go away with
/// the namespaces.
pub struct VethPair {
    pub sender_if: String,
    pub receiver_if: String,
}

impl VethPair {
    pub fn create(sender: &Netns, receiver: &Netns) -> Result<VethPair> {
        let (s, r) = ("ctdt-tx".to_string(), "ctdt-rx".to_string());
        run(&[
            "ip",
            "link",
            "add",
            &s,
            "netns",
            &sender.name,
            "type",
            "veth",
            "peer",
            "name",
            &r,
            "netns",
            &receiver.name,
        ])?;
        Ok(VethPair {
            sender_if: s,
            receiver_if: r,
        })
    }
}

/// Sender and receiver namespaces on one /24 of 198.18.0.0/15.
pub struct Topology {
    pub veth: VethPair,
    pub sender_addr: Ipv4Addr,
    pub receiver_addr: Ipv4Addr,
    // Declared last: dropped after everything that refers to them.
    pub sender: Netns,
    pub receiver: Netns,
}

impl Topology {
    /// `sender` 198.18.<n>.1/24 -- veth -- `receiver` 198.18.<n>.2/24, both up.
    pub fn pair() -> Result<Topology> {
        Topology::pair_with_prefix("ctdt")
    }

    /// [`Topology::pair`] with namespaces named `<prefix>-...`.
    pub fn pair_with_prefix(prefix: &str) -> Result<Topology> {
        let sender = Netns::with_prefix(prefix)?;
        let receiver = Netns::with_prefix(prefix)?;
        let veth = VethPair::create(&sender, &receiver)?;
        let n = (next_id() % 256) as u8;
        let sender_addr = Ipv4Addr::new(198, 18, n, 1);
        let receiver_addr = Ipv4Addr::new(198, 18, n, 2);
        for (ns, dev, addr) in [
            (&sender, &veth.sender_if, sender_addr),
            (&receiver, &veth.receiver_if, receiver_addr),
        ] {
            ns.exec(&["ip", "addr", "add", &format!("{addr}/24"), "dev", dev])?;
            ns.exec(&["ip", "link", "set", dev, "up"])?;
        }
        Ok(Topology {
            veth,
            sender_addr,
            receiver_addr,
            sender,
            receiver,
        })
    }

    /// `iptables -A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT`
    /// in the receiver: this is what turns conntrack on there.
    pub fn track_receiver(&self) -> Result<()> {
        self.receiver.exec(&[
            "iptables",
            "-A",
            "INPUT",
            "-m",
            "conntrack",
            "--ctstate",
            "ESTABLISHED,RELATED",
            "-j",
            "ACCEPT",
        ])?;
        Ok(())
    }
}

// ------------------------------------------------------------------ sysctl

pub fn read_conntrack_max() -> Result<u64> {
    let s = std::fs::read_to_string(CONNTRACK_MAX).context("reading nf_conntrack_max")?;
    s.trim()
        .parse()
        .with_context(|| format!("parsing nf_conntrack_max {s:?}"))
}

pub fn write_conntrack_max(v: u64) -> Result<()> {
    std::fs::write(CONNTRACK_MAX, format!("{v}\n"))
        .with_context(|| format!("setting nf_conntrack_max to {v}"))
}

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
        let mine = format!("-{}-", std::process::id());
        inner
            .set(value, &|n| {
                n.name.as_deref().is_some_and(|name| name.contains(&mine))
            })
            .map_err(|e| anyhow!("ctdrop-tests: {e:#}"))?;
        Ok(ConntrackMaxGuard { inner })
    }

    /// The value that will be restored.
    pub fn previous(&self) -> u64 {
        self.inner.previous()
    }
}

// ------------------------------------------------------------ ct counters

/// `/proc/net/stat/nf_conntrack` inside `ns`, by the header's column names:
/// every column summed over CPUs, except `entries` (the table count, the
/// same on every line).
pub fn ct_stats(ns: &Netns) -> Result<BTreeMap<String, u64>> {
    parse_ct_stats(&ns.exec(&["cat", "/proc/net/stat/nf_conntrack"])?)
}

pub fn parse_ct_stats(text: &str) -> Result<BTreeMap<String, u64>> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header: Vec<&str> = lines
        .next()
        .ok_or_else(|| anyhow!("empty stat file"))?
        .split_whitespace()
        .collect();
    let mut out: BTreeMap<String, u64> = header.iter().map(|h| (h.to_string(), 0)).collect();
    for (i, line) in lines.enumerate() {
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.len() != header.len() {
            bail!(
                "stat line {line:?} has {} columns, header {}",
                cols.len(),
                header.len()
            );
        }
        for (name, v) in header.iter().zip(cols) {
            let v = u64::from_str_radix(v, 16).with_context(|| format!("hex {v:?}"))?;
            if *name == "entries" {
                if i == 0 {
                    out.insert(name.to_string(), v);
                }
            } else {
                *out.get_mut(*name).unwrap() += v;
            }
        }
    }
    Ok(out)
}

/// A `<prefix>-…` pair whose receiver's table is full at `max` entries
/// (the global limit lowered under the guard): every new flow into it is a
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

/// `ns`'s counters once column `col` stops moving (packets on a veth are
/// delivered asynchronously): read every 100 ms, at most 5 s.
pub fn settled_ct_stats(ns: &Netns, col: &str) -> Result<BTreeMap<String, u64>> {
    let mut last = ct_stats(ns)?;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let now = ct_stats(ns)?;
        if now[col] == last[col] || Instant::now() > deadline {
            return Ok(now);
        }
        last = now;
    }
}

// ----------------------------------------------------------------- traffic

/// Sends one 16-byte datagram to each of `dst:first_port .. first_port+n`
/// from inside `ns`: `n` new conntrack flows.
pub fn send_udp_flows(ns: &Netns, dst: Ipv4Addr, first_port: u16, n: u16) -> Result<Vec<u16>> {
    let last = first_port
        .checked_add(n)
        .ok_or_else(|| anyhow!("port overflow"))?;
    send_udp(ns, dst, (first_port..last).collect())
}

/// Sends one 16-byte datagram to each `dst:port` in `dports` from inside
/// `ns`, each from its own socket. The sockets stay open until all are
/// sent, so every datagram has a distinct source port (a new flow even
/// when ports repeat). Returns those source ports, in order.
pub fn send_udp(ns: &Netns, dst: Ipv4Addr, dports: Vec<u16>) -> Result<Vec<u16>> {
    in_netns(&ns.path(), move || {
        let mut socks = Vec::with_capacity(dports.len());
        for port in dports {
            let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
            sock.send_to(b"ctdrop-tests udp", (dst, port))
                .with_context(|| format!("sending to {dst}:{port}"))?;
            socks.push(sock);
        }
        socks.iter().map(|s| Ok(s.local_addr()?.port())).collect()
    })
}

/// UDP sockets bound inside a namespace, one per port, to tell which
/// datagrams arrived (and so were not dropped on the way in).
pub struct UdpSink {
    socks: Vec<(u16, UdpSocket)>,
}

impl UdpSink {
    /// Binds `addr:port` for each port, inside `ns`.
    pub fn bind(ns: &Netns, addr: Ipv4Addr, ports: Vec<u16>) -> Result<UdpSink> {
        let socks = in_netns(&ns.path(), move || {
            ports
                .into_iter()
                .map(|p| {
                    let s = UdpSocket::bind((addr, p))
                        .with_context(|| format!("binding {addr}:{p}"))?;
                    s.set_nonblocking(true)?;
                    Ok((p, s))
                })
                .collect::<Result<Vec<_>>>()
        })?;
        Ok(UdpSink { socks })
    }

    /// Ports that received at least one datagram since the last call.
    pub fn received(&self) -> Vec<u16> {
        let mut buf = [0u8; 2048];
        let mut ports = Vec::new();
        for (port, sock) in &self.socks {
            let mut got = false;
            while sock.recv_from(&mut buf).is_ok() {
                got = true;
            }
            if got {
                ports.push(*port);
            }
        }
        ports
    }
}

/// One ICMP echo request and whether its reply came back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EchoProbe {
    pub id: u16,
    pub seq: u16,
    pub replied: bool,
}

/// Sends `count` ICMP echo requests from inside `ns` on a raw socket, with
/// ids `first_id + i` (so each is a new conntrack flow) and seq `i + 1`,
/// then waits up to `wait` for the replies.
pub fn ping(
    ns: &Netns,
    dst: Ipv4Addr,
    first_id: u16,
    count: u16,
    wait: Duration,
) -> Result<Vec<EchoProbe>> {
    in_netns(&ns.path(), move || {
        let fd = unsafe {
            libc::socket(
                libc::AF_INET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::IPPROTO_ICMP,
            )
        };
        if fd < 0 {
            bail!("raw ICMP socket: {}", std::io::Error::last_os_error());
        }
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 50_000,
        };
        let tv_len = std::mem::size_of::<libc::timeval>() as libc::socklen_t;
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const _ as *const libc::c_void,
                tv_len,
            )
        };
        let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        addr.sin_family = libc::AF_INET as libc::sa_family_t;
        addr.sin_addr.s_addr = u32::from_ne_bytes(dst.octets());
        let mut probes = Vec::new();
        for i in 0..count {
            let (id, seq) = (first_id.wrapping_add(i), i + 1);
            let pkt = echo_request(id, seq);
            let sent = unsafe {
                libc::sendto(
                    sock.as_raw_fd(),
                    pkt.as_ptr() as *const libc::c_void,
                    pkt.len(),
                    0,
                    &addr as *const _ as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                )
            };
            if sent != pkt.len() as isize {
                bail!("sending echo request: {}", std::io::Error::last_os_error());
            }
            probes.push(EchoProbe {
                id,
                seq,
                replied: false,
            });
        }
        let deadline = Instant::now() + wait;
        let mut buf = [0u8; 1500];
        while Instant::now() < deadline && probes.iter().any(|p| !p.replied) {
            let n = unsafe {
                libc::recv(
                    sock.as_raw_fd(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                    0,
                )
            };
            if n <= 0 {
                continue; // timeout tick
            }
            let pkt = &buf[..n as usize];
            let ihl = ((pkt[0] & 0x0f) as usize) * 4;
            if pkt.len() < ihl + 8 || pkt[12..16] != dst.octets() || pkt[ihl] != 0 {
                continue; // not an echo reply from dst
            }
            let id = u16::from_be_bytes([pkt[ihl + 4], pkt[ihl + 5]]);
            let seq = u16::from_be_bytes([pkt[ihl + 6], pkt[ihl + 7]]);
            if let Some(p) = probes.iter_mut().find(|p| p.id == id && p.seq == seq) {
                p.replied = true;
            }
        }
        Ok(probes)
    })
}

pub(crate) fn echo_request(id: u16, seq: u16) -> Vec<u8> {
    let mut p = vec![8u8, 0, 0, 0];
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(b"ctdrop-tests pin");
    set_icmp_checksum(&mut p);
    p
}

/// Fills in the checksum (bytes 2-3, zero before) of the ICMP message `p`.
pub fn set_icmp_checksum(p: &mut [u8]) {
    let mut sum = 0u32;
    for c in p.chunks(2) {
        sum += u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    p[2..4].copy_from_slice(&(!(sum as u16)).to_be_bytes());
}

// ------------------------------------------------------------------ ctdrop

/// A running `ctdrop`, killed on drop unless [`Ctdrop::stop`]ped.
pub struct Ctdrop {
    child: Child,
    own_stdout: Option<std::process::ChildStdout>,
    stdout: Option<JoinHandle<String>>,
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
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", cmd.get_program().to_string_lossy()))?;
        let out = child.stdout.take().unwrap();
        let (out, own_stdout) = match mode {
            Stdout::Caller => (None, Some(out)),
            _ => (Some(out), None),
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
        let stdout = self
            .stdout
            .take()
            .unwrap()
            .join()
            .map_err(|_| anyhow!("stdout reader panicked"))?;
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
    let topo = Topology::pair().unwrap();
    topo.track_receiver().unwrap();
    let guard = ConntrackMaxGuard::set(max).unwrap();
    send_udp_flows(&topo.sender, topo.receiver_addr, 10_000, max as u16 + 16).unwrap();
    let s = settled_ct_stats(&topo.receiver, "drop").unwrap();
    assert_eq!(s["entries"], max, "table not full after the fill: {s:?}");
    (topo, guard)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_sum_cpus_but_not_entries() {
        let t = "entries  clashres drop early_drop\n00000040  00000001 0000000a 00000000\n00000040  00000002 00000005 00000001\n";
        let s = parse_ct_stats(t).unwrap();
        assert_eq!(s["entries"], 64);
        assert_eq!(s["clashres"], 3);
        assert_eq!(s["drop"], 15);
        assert_eq!(s["early_drop"], 1);
    }

    #[test]
    fn echo_checksum_verifies() {
        let p = echo_request(0x1234, 7);
        let mut sum = 0u32;
        for c in p.chunks(2) {
            sum += u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32;
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        assert_eq!(sum, 0xffff);
    }
}
