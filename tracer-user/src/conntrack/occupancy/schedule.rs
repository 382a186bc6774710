//! When and where snapshots are taken: inside the namespace (ctnetlink
//! answers for the socket's namespace), at most one per namespace per gap,
//! on threads of their own so the tracing loop keeps draining.

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

use super::{
    dump::{dump, thread_cpu_ns},
    model::{Occupancy, OccupancyBuilder, TOP_N},
    nat::nat_rules_here,
};

fn wall_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Dumps and summarizes the table of the calling thread's namespace.
pub fn snapshot_here(top: usize) -> Result<Occupancy> {
    let taken_ns = wall_ns();
    let t = Instant::now();
    let cpu = thread_cpu_ns();
    let mut b = OccupancyBuilder::default();
    let (unreadable, parser_cpu) = dump(|e| b.add(&e))?;
    let mut o = b.finish(top);
    o.unreadable = unreadable;
    o.taken_ns = taken_ns;
    o.elapsed_ms = t.elapsed().as_secs_f64() * 1e3;
    o.cpu_ms = (thread_cpu_ns().saturating_sub(cpu) + parser_cpu) as f64 / 1e6;
    o.max = crate::conntrack::stats::CtLimits::read().map(|l| l.max);
    Ok(o)
}

/// Dumps and summarizes the table of the namespace at `ns_path`.
pub fn snapshot(ns_path: &Path, netns: Option<u32>, name: Option<String>) -> Result<Occupancy> {
    let mut o = crate::conntrack::netns::in_netns(ns_path, move || {
        let mut o = snapshot_here(TOP_N)?;
        o.nat_rules = nat_rules_here();
        Ok(o)
    })
    .with_context(|| {
        format!(
            "snapshot of the conntrack table in {}",
            name.clone()
                .unwrap_or_else(|| ns_path.display().to_string())
        )
    })?;
    o.netns = netns;
    o.netns_name = name;
    Ok(o)
}

/// At most one snapshot per namespace per `min_gap`: a full table keeps
/// dropping packets, and each drop must not cost a dump.
pub struct SnapshotLimiter {
    min_gap: Duration,
    last: HashMap<u32, Instant>,
}

impl SnapshotLimiter {
    pub fn new(min_gap: Duration) -> Self {
        SnapshotLimiter {
            min_gap,
            last: HashMap::new(),
        }
    }

    pub fn allow(&mut self, netns: u32, now: Instant) -> bool {
        match self.last.get(&netns) {
            Some(t) if now.saturating_duration_since(*t) < self.min_gap => false,
            _ => {
                self.last.insert(netns, now);
                true
            }
        }
    }
}

/// Default gap between two snapshots of one namespace.
pub const SNAPSHOT_GAP: Duration = Duration::from_secs(30);

/// Snapshots taken off the tracing loop: a dump of a full 262144-entry
/// table takes a noticeable fraction of a second, and the ring buffer must
/// keep draining meanwhile.
pub struct Snapshots {
    limiter: SnapshotLimiter,
    tx: mpsc::Sender<(u32, Result<Occupancy>)>,
    rx: mpsc::Receiver<(u32, Result<Occupancy>)>,
    in_flight: usize,
    /// Per namespace, the fullest snapshot seen (the moment that mattered).
    pub taken: BTreeMap<u32, Occupancy>,
    pub errors: Vec<String>,
}

impl Snapshots {
    pub fn new(min_gap: Duration) -> Self {
        let (tx, rx) = mpsc::channel();
        Snapshots {
            limiter: SnapshotLimiter::new(min_gap),
            tx,
            rx,
            in_flight: 0,
            taken: BTreeMap::new(),
            errors: Vec::new(),
        }
    }

    /// A table-full drop in `netns`: start a snapshot unless one was taken
    /// recently. Returns whether one was started.
    /// `locate` finds the namespace's name and path (a /proc scan: only
    /// done when a snapshot is due).
    pub fn table_full(
        &mut self,
        netns: u32,
        locate: impl FnOnce() -> Option<(Option<String>, PathBuf)>,
    ) -> bool {
        if !self.limiter.allow(netns, Instant::now()) {
            return false;
        }
        let Some((name, path)) = locate() else {
            return false;
        };
        let tx = self.tx.clone();
        let spawned = std::thread::Builder::new()
            .name("ctdrop-occupancy".into())
            .spawn(move || {
                let _ = tx.send((netns, snapshot(&path, Some(netns), name)));
            });
        match spawned {
            Ok(_) => {
                self.in_flight += 1;
                true
            }
            Err(e) => {
                self.errors
                    .push(format!("cannot start a snapshot thread: {e}"));
                false
            }
        }
    }

    /// Collects finished snapshots; returns the ones that just arrived.
    pub fn poll(&mut self) -> Vec<Occupancy> {
        let mut fresh = Vec::new();
        while let Ok(r) = self.rx.try_recv() {
            self.accept(r, &mut fresh);
        }
        fresh
    }

    /// Waits up to `limit` for snapshots still running (end of a run).
    pub fn finish(&mut self, limit: Duration) -> Vec<Occupancy> {
        let deadline = Instant::now() + limit;
        let mut fresh = self.poll();
        while self.in_flight > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(r) => self.accept(r, &mut fresh),
                Err(_) => {
                    self.errors.push(format!(
                        "{} snapshot(s) still running at exit, left out",
                        self.in_flight
                    ));
                    break;
                }
            }
        }
        fresh
    }

    fn accept(&mut self, (netns, r): (u32, Result<Occupancy>), fresh: &mut Vec<Occupancy>) {
        self.in_flight = self.in_flight.saturating_sub(1);
        match r {
            Ok(o) => {
                let keep = self
                    .taken
                    .get(&netns)
                    .map(|old| o.entries >= old.entries)
                    .unwrap_or(true);
                if keep {
                    self.taken.insert(netns, o.clone());
                }
                fresh.push(o);
            }
            Err(e) => self.errors.push(format!("{e:#}")),
        }
    }
}

/// Snapshot of the namespace named by `--netns` (name or inode), or of
/// ours when none is given.
pub fn snapshot_arg(netns: Option<&str>) -> Result<Occupancy> {
    match netns {
        None => {
            let own = crate::conntrack::netns::own_netns().ok();
            let name = own.and_then(|i| crate::conntrack::netns::NsRegistry::new().display_name(i));
            snapshot(Path::new("/proc/self/ns/net"), own, name)
        }
        Some(arg) => {
            let (inum, path) = crate::conntrack::netns::resolve_netns(arg)?;
            snapshot(
                &path,
                Some(inum),
                crate::conntrack::netns::NsRegistry::new().display_name(inum),
            )
        }
    }
}
