//! The demo's throwaway world: two namespaces joined by a veth, a lowered
//! `nf_conntrack_max` held under the tests' lock, a quiet UDP service and a
//! flood. Everything is undone by `Drop`, on every exit path that unwinds.

use std::{
    fs::File,
    io::{Read, Seek, SeekFrom, Write},
    net::{Ipv4Addr, UdpSocket},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{anyhow, bail, Context, Result};

/// Shared with the integration tests: whoever changes the global
/// `nf_conntrack_max` holds this lock, and writes the value to restore in
/// it so that a killed holder is repaired by the next one.
pub const LOCK_PATH: &str = "/run/ctdrop-tests.lock";
const MAX_SYSCTL: &str = "/proc/sys/net/netfilter/nf_conntrack_max";

pub const CLIENTS: &str = "ctdemo-net";
pub const SERVER: &str = "ctdemo-srv";
pub const CLIENT_IF: &str = "ctdemo-c";
pub const SERVER_IF: &str = "ctdemo-s";
pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 200, 1);
pub const SERVER_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 200, 2);
/// The stateless service the flood hits (a game or DNS-like UDP port).
pub const SERVICE_PORT: u16 = 5353;

fn run(args: &[&str]) -> Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", args[0]))?;
    if !out.status.success() {
        bail!("`{}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn in_ns(ns: &str, args: &[&str]) -> Result<String> {
    let mut full = vec!["ip", "netns", "exec", ns];
    full.extend_from_slice(args);
    run(&full)
}

pub fn ns_path(ns: &str) -> PathBuf {
    Path::new("/run/netns").join(ns)
}

/// The global sysctl, lowered under the lock and put back on drop.
struct MaxGuard {
    lock: File,
    previous: u64,
}

fn read_max() -> Result<u64> {
    let s = std::fs::read_to_string(MAX_SYSCTL).context("reading nf_conntrack_max")?;
    s.trim().parse().context("parsing nf_conntrack_max")
}

fn write_max(v: u64) -> Result<()> {
    std::fs::write(MAX_SYSCTL, format!("{v}\n")).with_context(|| format!("setting nf_conntrack_max to {v}"))
}

impl MaxGuard {
    fn set(value: u64, stop: &AtomicBool) -> Result<MaxGuard> {
        let mut lock = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(LOCK_PATH)
            .with_context(|| format!("opening {LOCK_PATH}"))?;
        let mut said = false;
        while unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            if !said {
                println!("waiting for {LOCK_PATH}: a test is using nf_conntrack_max");
                said = true;
            }
            if stop.load(Ordering::Relaxed) {
                bail!("interrupted while waiting for {LOCK_PATH}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let mut pending = String::new();
        lock.read_to_string(&mut pending)?;
        if let Ok(v) = pending.trim().parse::<u64>() {
            println!("restoring nf_conntrack_max={v} left over by a killed run");
            write_max(v)?;
        }
        let previous = read_max()?;
        lock.set_len(0)?;
        lock.seek(SeekFrom::Start(0))?;
        write!(lock, "{previous}")?;
        lock.sync_all()?;
        let guard = MaxGuard { lock, previous };
        write_max(value)?;
        Ok(guard)
    }
}

impl Drop for MaxGuard {
    fn drop(&mut self) {
        match write_max(self.previous) {
            Ok(()) => {
                let _ = self.lock.set_len(0);
            }
            Err(e) => eprintln!("ctdrop: demo: cannot restore nf_conntrack_max={}: {e:#}", self.previous),
        }
    }
}

/// Namespaces that exist until drop.
struct Namespaces(Vec<&'static str>);

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in self.0.iter().rev() {
            if let Err(e) = run(&["ip", "netns", "del", ns]) {
                eprintln!("ctdrop: demo: cleanup: {e:#}");
            }
        }
    }
}

/// A thread that stops when asked and is joined on drop.
struct Worker {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Deletes namespaces a killed demo left behind.
pub fn remove_leftovers() -> Result<Vec<String>> {
    let mut gone = Vec::new();
    for ns in [SERVER, CLIENTS] {
        if ns_path(ns).exists() {
            run(&["ip", "netns", "del", ns])?;
            gone.push(ns.to_string());
        }
    }
    Ok(gone)
}

pub struct Stage {
    // Field order is drop order: threads first (their sockets keep the
    // namespaces alive), then the namespaces, then the sysctl and lock.
    flood: Option<Worker>,
    _service: Worker,
    _namespaces: Namespaces,
    _max: MaxGuard,
    pub flood_sent: Arc<AtomicU64>,
    /// The flood's last source port: a restarted flood goes on from there.
    flood_port: Arc<AtomicU64>,
    pub service_received: Arc<AtomicU64>,
    pub previous_max: u64,
}

impl Stage {
    pub fn build(max: u32, stop: &AtomicBool) -> Result<Stage> {
        let max_guard = MaxGuard::set(max as u64, stop)?;
        let previous_max = max_guard.previous;
        let mut namespaces = Namespaces(Vec::new());
        for ns in [CLIENTS, SERVER] {
            run(&["ip", "netns", "add", ns])?;
            namespaces.0.push(ns);
            // Only our packets: no IPv6 router solicitations or DAD.
            in_ns(ns, &["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"])?;
            in_ns(ns, &["ip", "link", "set", "lo", "up"])?;
        }
        run(&["ip", "link", "add", CLIENT_IF, "netns", CLIENTS, "type", "veth", "peer", "name", SERVER_IF, "netns", SERVER])?;
        for (ns, dev, addr) in [(CLIENTS, CLIENT_IF, CLIENT_ADDR), (SERVER, SERVER_IF, SERVER_ADDR)] {
            in_ns(ns, &["ip", "addr", "add", &format!("{addr}/24"), "dev", dev])?;
            in_ns(ns, &["ip", "link", "set", dev, "up"])?;
        }
        // A state rule, as on the incident's host: it is what makes the
        // server track every connection.
        in_ns(SERVER, &["iptables", "-A", "INPUT", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"])?;
        let service_received = Arc::new(AtomicU64::new(0));
        let service = service(service_received.clone())?;
        Ok(Stage {
            flood: None,
            _service: service,
            _namespaces: namespaces,
            _max: max_guard,
            flood_sent: Arc::new(AtomicU64::new(0)),
            flood_port: Arc::new(AtomicU64::new(20000)),
            service_received,
            previous_max,
        })
    }

    /// New UDP flows to the service from ever new source ports, `rate` a
    /// second, until [`Stage::stop_flood`] or drop.
    pub fn start_flood(&mut self, rate: u32) -> Result<()> {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = self.flood_sent.clone();
        let last_port = self.flood_port.clone();
        let s = stop.clone();
        let ns = File::open(ns_path(CLIENTS)).context("opening the clients' namespace")?;
        let handle = std::thread::Builder::new()
            .name("ctdemo-flood".into())
            .spawn(move || {
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    eprintln!("ctdrop: demo: flood cannot enter {CLIENTS}: {}", std::io::Error::last_os_error());
                    return;
                }
                let gap = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
                let mut port = last_port.load(Ordering::Relaxed) as u16;
                while !s.load(Ordering::Relaxed) {
                    port = if port >= 60000 { 20000 } else { port + 1 };
                    last_port.store(port as u64, Ordering::Relaxed);
                    if let Ok(sock) = UdpSocket::bind((CLIENT_ADDR, port)) {
                        if sock.send_to(b"ctdemo flood", (SERVER_ADDR, SERVICE_PORT)).is_ok() {
                            sent.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    std::thread::sleep(gap);
                }
            })
            .context("starting the flood")?;
        self.flood = Some(Worker { stop, handle: Some(handle) });
        Ok(())
    }

    pub fn stop_flood(&mut self) {
        self.flood = None;
    }
}

/// The service: reads and never answers, like a busy UDP server whose
/// clients come and go (each flow stays UNREPLIED in the table).
fn service(received: Arc<AtomicU64>) -> Result<Worker> {
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
    let ns = File::open(ns_path(SERVER)).context("opening the server's namespace")?;
    let handle = std::thread::Builder::new()
        .name("ctdemo-service".into())
        .spawn(move || {
            let setup = (|| -> Result<UdpSocket> {
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    bail!("entering {SERVER}: {}", std::io::Error::last_os_error());
                }
                let sock = UdpSocket::bind((SERVER_ADDR, SERVICE_PORT)).context("binding the demo service")?;
                sock.set_read_timeout(Some(Duration::from_millis(100)))?;
                Ok(sock)
            })();
            let sock = match setup {
                Ok(s) => {
                    let _ = ready_tx.send(Ok(()));
                    s
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let mut buf = [0u8; 2048];
            while !s.load(Ordering::Relaxed) {
                if sock.recv_from(&mut buf).is_ok() {
                    received.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
        .context("starting the demo service")?;
    let worker = Worker { stop, handle: Some(handle) };
    ready_rx.recv().map_err(|_| anyhow!("demo service thread died"))??;
    Ok(worker)
}
