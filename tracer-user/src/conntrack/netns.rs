//! Network namespaces by inode: their names, and handles opened inside them.
//!
//! Per-namespace files (`/proc/net/stat/nf_conntrack`) show the namespace of
//! the task that opens them, and keep it once open. So each namespace gets a
//! short-lived thread that enters it, opens what we need, and leaves; the
//! open file is then re-read from anywhere.

use std::{
    collections::HashMap,
    fs::File,
    io::{Read, Seek, SeekFrom},
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};

use super::stats::CtCounters;

/// Inode of this process's own network namespace.
pub fn own_netns() -> Result<u32> {
    Ok(std::fs::metadata("/proc/self/ns/net")
        .context("reading /proc/self/ns/net")?
        .ino() as u32)
}

/// Inode of the calling thread's network namespace (after a setns).
pub fn thread_netns() -> Result<u32> {
    Ok(std::fs::metadata("/proc/thread-self/ns/net")
        .context("reading /proc/thread-self/ns/net")?
        .ino() as u32)
}

/// Named namespaces (`ip netns add`), by inode.
pub fn named_namespaces() -> HashMap<u32, (String, PathBuf)> {
    let mut out = HashMap::new();
    if let Ok(dir) = std::fs::read_dir("/run/netns") {
        for e in dir.flatten() {
            let p = e.path();
            if let Ok(m) = std::fs::metadata(&p) {
                out.insert(
                    m.ino() as u32,
                    (e.file_name().to_string_lossy().into_owned(), p),
                );
            }
        }
    }
    out
}

/// `--netns NAME|INODE` to an inode (see [`resolve_netns`]).
pub fn resolve_netns_arg(arg: &str) -> Result<u32> {
    Ok(resolve_netns(arg)?.0)
}

/// PIDs are at most this (`PID_MAX_LIMIT`); namespace inodes are far above.
const PID_MAX_LIMIT: u64 = 1 << 22;

/// `--netns` to (inode, a path that opens it): a name from `ip netns list`,
/// a path to a namespace file (`/proc/PID/ns/net`, `/run/netns/X`), a PID,
/// or an inode that some process or name holds. Anything else is an error:
/// tracing a namespace that is not there would trace nothing, silently.
pub fn resolve_netns(arg: &str) -> Result<(u32, PathBuf)> {
    if arg.is_empty() {
        bail!("--netns needs a name, a path, a PID or an inode");
    }
    if arg.contains('/') {
        let p = PathBuf::from(arg);
        return Ok((net_ns_file_inode(&p)?, p));
    }
    if let Ok(n) = arg.parse::<u64>() {
        if n <= PID_MAX_LIMIT {
            let p = PathBuf::from(format!("/proc/{n}/ns/net"));
            if !Path::new(&format!("/proc/{n}")).exists() {
                bail!("no process {n} (a number below {PID_MAX_LIMIT} is taken as a PID; namespace inodes are larger)");
            }
            return Ok((net_ns_file_inode(&p)?, p));
        }
        let inum = u32::try_from(n).map_err(|_| anyhow!("no network namespace with inode {n}"))?;
        let (_, p) = find_namespace(inum).ok_or_else(|| {
            anyhow!("no network namespace with inode {n} (none held by a process or an `ip netns` name; give its path instead)")
        })?;
        return Ok((inum, p));
    }
    let p = Path::new("/run/netns").join(arg);
    if !p.exists() {
        bail!("no network namespace named {arg:?} (see `ip netns list`)");
    }
    Ok((net_ns_file_inode(&p)?, p))
}

/// The inode of a network namespace file; an error for anything else.
fn net_ns_file_inode(p: &Path) -> Result<u32> {
    let f =
        File::open(p).map_err(|e| anyhow!("cannot open network namespace {}: {e}", p.display()))?;
    // NS_GET_NSTYPE (_IO(0xb7, 0x3)): which kind of namespace an nsfs file is.
    // SAFETY: an ioctl without arguments on a file descriptor we own.
    let ty = unsafe { libc::ioctl(f.as_raw_fd(), 0xb703) };
    if ty != libc::CLONE_NEWNET {
        bail!("{} is not a network namespace", p.display());
    }
    Ok(f.metadata()
        .with_context(|| format!("reading {}", p.display()))?
        .ino() as u32)
}

/// Runs `f` on a thread that has entered the namespace at `ns_path`.
pub fn in_netns<T: Send + 'static>(
    ns_path: &Path,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let ns = File::open(ns_path).with_context(|| format!("opening {}", ns_path.display()))?;
    in_netns_file(ns, f)
}

/// Runs `f` on a thread that has entered the namespace `ns` (an open
/// namespace file).
fn in_netns_file<T: Send + 'static>(
    ns: File,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    std::thread::spawn(move || {
        enter_file(&ns)?;
        f()
    })
    .join()
    .map_err(|_| anyhow!("namespace worker panicked"))?
}

/// Moves the calling thread (only it) into the namespace open as `ns`:
/// the tracer's one `setns`.
pub fn enter_file(ns: &File) -> Result<()> {
    // SAFETY: setns on an open namespace file; it changes only the calling
    // thread's network namespace.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!(
            "entering network namespace: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// What we know of one namespace. Its counter file is opened lazily and
/// may be closed again by the registry (see [`NsRegistry`]); interface
/// names are looked up once each through a socket opened for the lookup.
pub struct NsHandle {
    pub inum: u32,
    pub name: Option<String>,
    path: PathBuf,
    stat: Option<File>,
    /// Opening failed (conntrack not loaded, namespace gone): not retried
    /// on every drop.
    stat_failed: Option<Instant>,
    open: Arc<AtomicUsize>,
    ifnames: HashMap<u32, Option<String>>,
}

impl NsHandle {
    fn new(inum: u32, name: Option<String>, path: PathBuf, open: Arc<AtomicUsize>) -> NsHandle {
        NsHandle {
            inum,
            name,
            path,
            stat: None,
            stat_failed: None,
            open,
            ifnames: HashMap::new(),
        }
    }

    /// Runs `f` inside this namespace, after checking that `path` still
    /// names it (a `/proc/PID/ns/net` path outlives its process's
    /// namespace; a name can be reused for a new one).
    fn enter<T: Send + 'static>(
        &mut self,
        f: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let ns = match open_checked(&self.path, self.inum) {
            Some(f) => f,
            None => {
                let (name, path) = find_namespace(self.inum)
                    .ok_or_else(|| anyhow!("network namespace {} is gone", self.inum))?;
                let f = open_checked(&path, self.inum)
                    .ok_or_else(|| anyhow!("network namespace {} is gone", self.inum))?;
                if name.is_some() {
                    self.name = name;
                }
                self.path = path;
                f
            }
        };
        in_netns_file(ns, f)
    }

    fn is_open(&self) -> bool {
        self.stat.is_some()
    }

    fn close(&mut self) {
        if self.stat.take().is_some() {
            self.open.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// None when conntrack is not loaded (or the namespace is gone).
    pub fn counters(&mut self) -> Option<CtCounters> {
        if self.stat.is_none() {
            if self
                .stat_failed
                .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
            {
                return None;
            }
            match self.enter(|| {
                File::open("/proc/thread-self/net/stat/nf_conntrack")
                    .context("opening conntrack stats")
            }) {
                Ok(f) => {
                    self.stat = Some(f);
                    self.stat_failed = None;
                    self.open.fetch_add(1, Ordering::Relaxed);
                }
                Err(_) => {
                    self.stat_failed = Some(Instant::now());
                    return None;
                }
            }
        }
        let f = self.stat.as_mut()?;
        let mut s = String::new();
        f.seek(SeekFrom::Start(0)).ok()?;
        f.read_to_string(&mut s).ok()?;
        CtCounters::parse(&s).ok()
    }

    pub fn ifname(&mut self, ifindex: u32) -> Option<String> {
        if let Some(n) = self.ifnames.get(&ifindex) {
            return n.clone();
        }
        // A socket created inside the namespace answers SIOCGIFNAME for it;
        // it is closed right after, so names cost no descriptor while held.
        let name = self
            .enter(move || {
                // SAFETY: plain socket(2); the result is checked and owned below.
                let fd = unsafe {
                    libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0)
                };
                if fd < 0 {
                    return Ok(None);
                }
                // SAFETY: `fd` was just returned by socket(2) and nothing else owns it.
                let sock =
                    unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
                Ok(ifname_via(sock.as_raw_fd(), ifindex))
            })
            .ok()
            .flatten();
        self.ifnames.insert(ifindex, name.clone());
        name
    }
}

impl Drop for NsHandle {
    fn drop(&mut self) {
        self.close();
    }
}

/// `path` opened, if it is the namespace with inode `inum`.
fn open_checked(path: &Path, inum: u32) -> Option<File> {
    let f = File::open(path).ok()?;
    (f.metadata().ok()?.ino() as u32 == inum).then_some(f)
}

fn ifname_via(sock: i32, ifindex: u32) -> Option<String> {
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    req.ifr_ifru.ifru_ifindex = ifindex as i32;
    // SAFETY: SIOCGIFNAME reads ifr_ifindex and writes ifr_name inside `req`.
    if unsafe { libc::ioctl(sock, libc::SIOCGIFNAME as _, &mut req) } != 0 {
        return None;
    }
    let bytes: Vec<u8> = req
        .ifr_name
        .iter()
        .take_while(|c| **c != 0)
        .map(|c| *c as u8)
        .collect();
    String::from_utf8(bytes).ok()
}

/// Descriptors kept free for everything else ctdrop opens (maps, programs,
/// links, the ring, probe sockets, snapshot and metrics sockets, capture
/// files), out of the soft RLIMIT_NOFILE.
const FD_RESERVE: u64 = 256;

/// Raises the soft RLIMIT_NOFILE to the hard limit (as Go programs do at
/// start): the soft 1024 of most shells is a relic of select(2), which
/// ctdrop does not use. Returns the soft limit in force afterwards.
pub fn raise_fd_limit() -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write `r`.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return 1024;
        }
        if r.rlim_cur < r.rlim_max {
            let want = libc::rlimit {
                rlim_cur: r.rlim_max,
                rlim_max: r.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                r.rlim_cur = r.rlim_max;
            }
        }
    }
    r.rlim_cur
}

/// The soft and hard RLIMIT_NOFILE now.
pub fn fd_limits() -> (u64, u64) {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes `r`.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) };
    (r.rlim_cur, r.rlim_max)
}

/// Counter files held open at once: what the descriptor limit leaves after
/// [`FD_RESERVE`]. `CTDROP_TEST_MAX_NS_HANDLES` lowers it (a test hook, so
/// the closing and reopening is exercised without thousands of namespaces).
fn handle_budget() -> usize {
    let budget = fd_limits().0.saturating_sub(FD_RESERVE).clamp(16, 1 << 20) as usize;
    match std::env::var("CTDROP_TEST_MAX_NS_HANDLES")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    {
        Some(n) if n > 0 => n.min(budget),
        _ => budget,
    }
}

/// Finds namespaces by inode and keeps what we know of each. Every
/// namespace found stays known (name, path, interface names); at most
/// `budget` of them hold their counter file open, the least recently used
/// is closed first and reopened when needed. A busy node has a namespace
/// per pod, and the descriptor limit must not decide whether ctdrop starts.
pub struct NsRegistry {
    handles: HashMap<u32, NsHandle>,
    unknown: HashMap<u32, Instant>,
    /// Who owns each namespace: what [`NsRegistry::display_name`] says.
    owners: std::cell::RefCell<super::owner::Owners>,
    /// Last use of each namespace, for closing the least recently used.
    used: HashMap<u32, u64>,
    clock: u64,
    open: Arc<AtomicUsize>,
    budget: usize,
}

/// How every output shows a namespace: its [`NsRegistry::display_name`]
/// when it has one, else its inode.
pub fn label(inode: Option<u32>, name: Option<&str>) -> String {
    match (name, inode) {
        (Some(n), _) => n.to_string(),
        (None, Some(i)) => i.to_string(),
        (None, None) => "unknown".into(),
    }
}

impl Default for NsRegistry {
    fn default() -> Self {
        Self::new()
    }
}

impl NsRegistry {
    pub fn new() -> Self {
        NsRegistry {
            handles: HashMap::new(),
            unknown: HashMap::new(),
            owners: Default::default(),
            used: HashMap::new(),
            clock: 0,
            open: Arc::new(AtomicUsize::new(0)),
            budget: handle_budget(),
        }
    }

    /// The one name of a namespace in every output (drop lines, JSON,
    /// summary, captures and reports, metrics, advice): `host`, its pod,
    /// its `ip netns` name or its container (see [`super::owner`]); None
    /// when nothing is known (outputs then show the inode, see [`label`]).
    /// Looked up once per inode.
    pub fn display_name(&self, inum: u32) -> Option<String> {
        let mut owners = self.owners.borrow_mut();
        if let Some(known) = owners.known(inum) {
            return known;
        }
        let netns_name = named_namespaces().remove(&inum).map(|(n, _)| n);
        owners.name(inum, netns_name.as_deref())
    }

    /// [`NsRegistry::display_name`] rendered: the name, else the inode.
    pub fn label(&self, inum: Option<u32>) -> String {
        label(inum, inum.and_then(|i| self.display_name(i)).as_deref())
    }

    /// The handle for `inum`, looking the namespace up at most once a second
    /// while it cannot be found (a namespace with no process and no name).
    pub fn get(&mut self, inum: u32) -> Option<&mut NsHandle> {
        if !self.handles.contains_key(&inum) {
            if let Some(t) = self.unknown.get(&inum) {
                if t.elapsed() < Duration::from_secs(1) {
                    return None;
                }
            }
            match find_namespace(inum) {
                Some((name, path)) => {
                    self.unknown.remove(&inum);
                    self.handles
                        .insert(inum, NsHandle::new(inum, name, path, self.open.clone()));
                }
                None => {
                    self.unknown.insert(inum, Instant::now());
                    return None;
                }
            }
        }
        self.clock += 1;
        self.used.insert(inum, self.clock);
        // Room for this one to open its file, should it need to.
        if self.open.load(Ordering::Relaxed) >= self.budget && !self.handles[&inum].is_open() {
            self.close_least_recent(inum);
        }
        self.handles.get_mut(&inum)
    }

    fn close_least_recent(&mut self, keep: u32) {
        let victim = self
            .handles
            .values()
            .filter(|h| h.inum != keep && h.is_open())
            .min_by_key(|h| self.used.get(&h.inum).copied().unwrap_or(0))
            .map(|h| h.inum);
        if let Some(v) = victim {
            if let Some(h) = self.handles.get_mut(&v) {
                h.close();
            }
        }
    }

    /// Every namespace we can find now (for start-of-run baselines).
    pub fn discover_all(&mut self) {
        let mut seen = Vec::new();
        for (inum, _) in named_namespaces() {
            seen.push(inum);
        }
        if let Ok(own) = own_netns() {
            seen.push(own);
        }
        for inum in seen {
            let _ = self.get(inum);
        }
    }

    /// Every namespace known, whether its file is open or not.
    pub fn inodes(&self) -> Vec<u32> {
        self.handles.keys().copied().collect()
    }

    /// Counter files open now, and the most allowed at once.
    pub fn open_files(&self) -> (usize, usize) {
        (self.open.load(Ordering::Relaxed), self.budget)
    }
}

/// Name (if any) and an openable path for the namespace with inode `inum`.
pub fn find_namespace(inum: u32) -> Option<(Option<String>, PathBuf)> {
    if let Some((name, path)) = named_namespaces().remove(&inum) {
        return Some((Some(name), path));
    }
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let fname = e.file_name();
        if !fname.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let p = e.path().join("ns/net");
        if std::fs::metadata(&p)
            .map(|m| m.ino() as u32 == inum)
            .unwrap_or(false)
        {
            return Some((None, p));
        }
    }
    None
}
