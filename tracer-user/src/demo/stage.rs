//! The demo's throwaway world, built with ctlab (the scenes the tests and
//! `xtask bench` use too): two namespaces joined by a veth, the lock on
//! `nf_conntrack_max` (lowered only on request, and only when no other
//! namespace holds entries), a quiet UDP service, the streams that fill its
//! table and a flood. Everything is undone by `Drop`, on every exit path
//! that unwinds.

use std::{
    net::{Ipv4Addr, UdpSocket},
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{anyhow, bail, Context, Result};

pub const CLIENTS: &str = "ctdemo-net";
pub const SERVER: &str = "ctdemo-srv";
pub const CLIENT_IF: &str = "ctdemo-c";
pub const SERVER_IF: &str = "ctdemo-s";
pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 200, 1);
pub const SERVER_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 200, 2);
/// The stateless service the flood hits (a game or DNS-like UDP port).
pub const SERVICE_PORT: u16 = 5353;

pub fn in_ns(ns: &str, args: &[&str]) -> Result<String> {
    let mut full = vec!["ip", "netns", "exec", ns];
    full.extend_from_slice(args);
    ctlab::run(&full)
}

pub fn ns_path(ns: &str) -> PathBuf {
    ctlab::netns_path(ns)
}

/// A thread that stops when asked and is joined on drop.
struct Worker {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Result<()>>>,
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(Ok(Err(e))) = self.handle.take().map(|h| h.join()) {
            eprintln!("ctdrop: demo: {e:#}");
        }
    }
}

/// Deletes namespaces a killed demo left behind.
pub fn remove_leftovers() -> Result<Vec<String>> {
    let mut gone = Vec::new();
    for ns in [SERVER, CLIENTS] {
        if ctlab::remove_leftover(ns)? {
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
    _namespaces: ctlab::Topology,
    /// The lock on nf_conntrack_max, held for the whole demo (a test must
    /// not lower the limit under it), and the limit put back if lowered.
    _max: ctlab::MaxGuard,
    pub flood_sent: Arc<AtomicU64>,
    /// The flood's last source port: a restarted flood goes on from there.
    flood_port: Arc<AtomicU64>,
    pub service_received: Arc<AtomicU64>,
    pub previous_max: u64,
    /// The server's table holds this many entries once full.
    pub limit: u64,
    /// true when the demo lowered nf_conntrack_max to `limit`.
    pub lowered: bool,
}

/// Below this the demo's own pings would not fit before the fill.
pub const MIN_MAX: u64 = 32;

/// Why a `--max` cannot be used, if it cannot.
pub fn check_max(max: u64, current: u64) -> Result<()> {
    if max < MIN_MAX {
        bail!("--max {max} is too small: the demo needs at least {MIN_MAX} entries");
    }
    if max >= current {
        bail!("--max {max} is not below the current nf_conntrack_max ({current}); without --max the demo fills its own namespace to {current}");
    }
    Ok(())
}

impl Stage {
    /// `lower_to`: lower nf_conntrack_max to it for the demo (refused while
    /// another namespace holds entries); None: keep the limit and fill the
    /// server's table to it.
    pub fn build(lower_to: Option<u64>, stop: &AtomicBool) -> Result<Stage> {
        let mut max_guard = ctlab::MaxGuard::lock(&|| stop.load(Ordering::Relaxed))?;
        let previous_max = max_guard.previous();
        if let Some(v) = lower_to {
            check_max(v, previous_max)?;
            // Our own namespaces cannot exist yet (leftovers were removed).
            max_guard.set(v, &|n| {
                n.name.as_deref().is_some_and(|n| n.starts_with("ctdemo-"))
            })?;
        }
        let limit = lower_to.unwrap_or(previous_max);
        let namespaces = ctlab::Topology::build(&ctlab::PairSpec {
            sender: CLIENTS,
            receiver: SERVER,
            sender_if: CLIENT_IF,
            receiver_if: SERVER_IF,
            sender_addr: CLIENT_ADDR,
            receiver_addr: SERVER_ADDR,
        })?;
        // The fill's clients live behind the client namespace.
        let (net, bits) = super::fill::CLIENT_NET;
        in_ns(
            SERVER,
            &[
                "ip",
                "route",
                "add",
                &format!("{net}/{bits}"),
                "via",
                &CLIENT_ADDR.to_string(),
            ],
        )?;
        // A state rule, as on the incident's host: it is what makes the
        // server track every connection.
        namespaces.track_receiver()?;
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
            limit,
            lowered: lower_to.is_some(),
        })
    }

    /// Fills the server's table to the limit with two-way UDP streams to
    /// the service; returns what it did and the table's count after.
    pub fn fill(&self, stop: &AtomicBool) -> Result<(super::fill::Filled, u64)> {
        let f = super::fill::fill(
            self.limit,
            &ns_path(CLIENTS),
            &ns_path(SERVER),
            (SERVER_ADDR, SERVICE_PORT),
            &|| stop.load(Ordering::Relaxed),
        )?;
        // The fill's datagrams are not the flood's.
        self.service_received.store(0, Ordering::Relaxed);
        let entries = ctlab::ct_stats_at(&ns_path(SERVER))?
            .get("entries")
            .copied()
            .ok_or_else(|| anyhow!("no entries column in the server's conntrack stats"))?;
        Ok((f, entries))
    }

    /// New UDP flows to the service from ever new source ports, `rate` a
    /// second, until [`Stage::stop_flood`] or drop.
    pub fn start_flood(&mut self, rate: u32) -> Result<()> {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = self.flood_sent.clone();
        let last_port = self.flood_port.clone();
        let s = stop.clone();
        let handle = ctlab::spawn_in(&ns_path(CLIENTS), "ctdemo-flood", move || {
            let gap = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
            let mut port = last_port.load(Ordering::Relaxed) as u16;
            while !s.load(Ordering::Relaxed) {
                port = if port >= 60000 { 20000 } else { port + 1 };
                last_port.store(port as u64, Ordering::Relaxed);
                if let Ok(sock) = UdpSocket::bind((CLIENT_ADDR, port)) {
                    if sock
                        .send_to(b"ctdemo flood", (SERVER_ADDR, SERVICE_PORT))
                        .is_ok()
                    {
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                }
                std::thread::sleep(gap);
            }
            Ok(())
        })?;
        self.flood = Some(Worker {
            stop,
            handle: Some(handle),
        });
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
    let handle = ctlab::spawn_in(&ns_path(SERVER), "ctdemo-service", move || {
        let setup = (|| -> Result<UdpSocket> {
            let sock =
                UdpSocket::bind((SERVER_ADDR, SERVICE_PORT)).context("binding the demo service")?;
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
                return Ok(());
            }
        };
        let mut buf = [0u8; 2048];
        while !s.load(Ordering::Relaxed) {
            if sock.recv_from(&mut buf).is_ok() {
                received.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    })?;
    let worker = Worker {
        stop,
        handle: Some(handle),
    };
    ready_rx
        .recv()
        .map_err(|_| anyhow!("demo service thread died"))??;
    Ok(worker)
}
