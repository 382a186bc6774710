//! The one guard around the global `net.netfilter.nf_conntrack_max`, shared
//! by `ctdrop demo`, the test harness and `cargo xtask bench`, so all follow
//! one lock and one wait policy and none breaks the host it runs on.
//!
//! The kernel holds each network namespace's own entry count against the
//! one global limit (`__nf_conntrack_alloc`: `cnet->count` against
//! `nf_conntrack_max`). Lowering the limit therefore lowers it for every
//! namespace: the host's, each container's. [`MaxGuard::set`] refuses to
//! lower it while any namespace other than the caller's own holds entries.

use std::{
    fs::File,
    io::{Read, Seek, SeekFrom, Write},
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    time::Duration,
};

use anyhow::{bail, Context, Result};

use crate::{ns::enter_file, stats::parse_entries};

/// Whoever changes `nf_conntrack_max` holds this lock, and writes the value
/// to restore in it, so that a killed holder is repaired by the next one.
pub const LOCK_PATH: &str = "/run/ctdrop-tests.lock";
pub const MAX_SYSCTL: &str = "/proc/sys/net/netfilter/nf_conntrack_max";

pub fn read_max() -> Result<u64> {
    let s = std::fs::read_to_string(MAX_SYSCTL).context("reading nf_conntrack_max")?;
    s.trim()
        .parse()
        .with_context(|| format!("parsing nf_conntrack_max {s:?}"))
}

pub fn write_max(v: u64) -> Result<()> {
    std::fs::write(MAX_SYSCTL, format!("{v}\n"))
        .with_context(|| format!("setting nf_conntrack_max to {v}"))
}

/// A network namespace and the conntrack entries it holds now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NsEntries {
    pub inode: u64,
    /// `ip netns` name, if it has one.
    pub name: Option<String>,
    /// How to name it to an operator: its `ip netns` name, "the host", or
    /// a process in it.
    pub label: String,
    pub entries: u64,
}

/// The table count of the namespace open as `ns`, read from inside it.
fn entries_via_setns(ns: File) -> Option<u64> {
    std::thread::spawn(move || {
        enter_file(&ns).ok()?;
        parse_entries(&std::fs::read_to_string("/proc/thread-self/net/stat/nf_conntrack").ok()?)
    })
    .join()
    .ok()
    .flatten()
}

fn comm(pid: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Every network namespace this host has that holds conntrack entries:
/// those named by `ip netns` (`/run/netns`) and those of every process
/// (`/proc/*/ns/net`: the host's, containers', pods'), each once.
pub fn namespaces_with_entries() -> Vec<NsEntries> {
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    let host = std::fs::metadata("/proc/1/ns/net").map(|m| m.ino()).ok();
    if let Ok(dir) = std::fs::read_dir("/run/netns") {
        for e in dir.flatten() {
            let Ok(f) = File::open(e.path()) else {
                continue;
            };
            let Ok(ino) = f.metadata().map(|m| m.ino()) else {
                continue;
            };
            if !seen.insert(ino) {
                continue;
            }
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(n) = entries_via_setns(f).filter(|n| *n > 0) {
                out.push(NsEntries {
                    inode: ino,
                    label: format!("namespace {name}"),
                    name: Some(name),
                    entries: n,
                });
            }
        }
    }
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let pid = e.file_name().to_string_lossy().into_owned();
            if !pid.bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            let Ok(ino) = std::fs::metadata(e.path().join("ns/net")).map(|m| m.ino()) else {
                continue;
            };
            if !seen.insert(ino) {
                continue;
            }
            // A process's own view of the stat file is its namespace's.
            let stat = std::fs::read_to_string(e.path().join("net/stat/nf_conntrack")).ok();
            let Some(n) = stat.as_deref().and_then(parse_entries).filter(|n| *n > 0) else {
                continue;
            };
            let label = if Some(ino) == host {
                "the host's namespace".to_string()
            } else {
                format!("the namespace of pid {pid} ({})", comm(&pid))
            };
            out.push(NsEntries {
                inode: ino,
                name: None,
                label,
                entries: n,
            });
        }
    }
    out.sort_by_key(|n| std::cmp::Reverse(n.entries));
    out
}

/// Holds the lock on [`LOCK_PATH`]; once [`MaxGuard::set`], puts
/// `nf_conntrack_max` back on drop (also when the holder panics).
pub struct MaxGuard {
    lock: File,
    previous: u64,
    lowered: bool,
}

impl MaxGuard {
    /// Takes the lock. The one wait policy: wait as long as another holder
    /// keeps it, saying so once on stderr, and give up only when `stop`
    /// says so. A value left in the lock file by a killed holder is put
    /// back first.
    pub fn lock(stop: &dyn Fn() -> bool) -> Result<MaxGuard> {
        let mut lock = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(LOCK_PATH)
            .with_context(|| format!("opening {LOCK_PATH}"))?;
        let mut said = false;
        // SAFETY: flock on a file we hold open.
        while unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
                bail!("flock {LOCK_PATH}: {err}");
            }
            if !said {
                eprintln!(
                    "waiting for {LOCK_PATH}: a ctdrop test or demo is using nf_conntrack_max"
                );
                said = true;
            }
            if stop() {
                bail!("interrupted while waiting for {LOCK_PATH}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let mut pending = String::new();
        lock.read_to_string(&mut pending)?;
        if let Ok(v) = pending.trim().parse::<u64>() {
            eprintln!("restoring nf_conntrack_max={v} left over by a killed run");
            write_max(v)?;
            lock.set_len(0)?;
        }
        let previous = read_max()?;
        Ok(MaxGuard {
            lock,
            previous,
            lowered: false,
        })
    }

    /// The limit when the lock was taken (what is put back).
    pub fn previous(&self) -> u64 {
        self.previous
    }

    /// Sets `nf_conntrack_max` to `value` until drop. Lowering is refused
    /// while a namespace that is not the caller's own (`own`) holds
    /// entries: it would start dropping packets once its count passed the
    /// new limit. The refusal names the fullest such namespace and its
    /// count.
    pub fn set(&mut self, value: u64, own: &dyn Fn(&NsEntries) -> bool) -> Result<()> {
        if value == self.previous {
            return Ok(());
        }
        let busy: Vec<NsEntries> = if value < self.previous {
            namespaces_with_entries()
                .into_iter()
                .filter(|n| !own(n))
                .collect()
        } else {
            Vec::new()
        };
        if !busy.is_empty() {
            // The fullest three by name, so the operator knows where to look.
            let mut named: Vec<String> = busy
                .iter()
                .take(3)
                .map(|b| format!("{} holds {} conntrack entries", b.label, b.entries))
                .collect();
            if busy.len() > 3 {
                named.push(format!("{} more namespaces hold some", busy.len() - 3));
            }
            bail!(
                "not lowering nf_conntrack_max to {value}: {}, and every namespace's entries are held against that one global limit",
                named.join("; ")
            );
        }
        self.lock.set_len(0)?;
        self.lock.seek(SeekFrom::Start(0))?;
        write!(self.lock, "{}", self.previous)?;
        self.lock.sync_all()?;
        self.lowered = true;
        write_max(value)
    }
}

impl Drop for MaxGuard {
    fn drop(&mut self) {
        if !self.lowered {
            return;
        }
        match write_max(self.previous) {
            // Only forget the value once it is back; the lock goes with the file.
            Ok(()) => {
                let _ = self.lock.set_len(0);
            }
            Err(e) => eprintln!("cannot restore nf_conntrack_max={}: {e:#}", self.previous),
        }
    }
}
