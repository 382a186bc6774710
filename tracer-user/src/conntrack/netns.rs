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
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};

use super::stats::CtCounters;

/// Inode of this process's own network namespace.
pub fn own_netns() -> Result<u32> {
    Ok(std::fs::metadata("/proc/self/ns/net").context("reading /proc/self/ns/net")?.ino() as u32)
}

/// Named namespaces (`ip netns add`), by inode.
pub fn named_namespaces() -> HashMap<u32, (String, PathBuf)> {
    let mut out = HashMap::new();
    if let Ok(dir) = std::fs::read_dir("/run/netns") {
        for e in dir.flatten() {
            let p = e.path();
            if let Ok(m) = std::fs::metadata(&p) {
                out.insert(m.ino() as u32, (e.file_name().to_string_lossy().into_owned(), p));
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
    let f = File::open(p).map_err(|e| anyhow!("cannot open network namespace {}: {e}", p.display()))?;
    // NS_GET_NSTYPE (_IO(0xb7, 0x3)): which kind of namespace an nsfs file is.
    // SAFETY: an ioctl without arguments on a file descriptor we own.
    let ty = unsafe { libc::ioctl(f.as_raw_fd(), 0xb703) };
    if ty != libc::CLONE_NEWNET {
        bail!("{} is not a network namespace", p.display());
    }
    Ok(f.metadata().with_context(|| format!("reading {}", p.display()))?.ino() as u32)
}

/// Runs `f` on a thread that has entered the namespace at `ns_path`.
pub fn in_netns<T: Send + 'static>(ns_path: &Path, f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    let ns = File::open(ns_path).with_context(|| format!("opening {}", ns_path.display()))?;
    std::thread::spawn(move || {
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("entering network namespace: {}", std::io::Error::last_os_error());
        }
        f()
    })
    .join()
    .map_err(|_| anyhow!("namespace worker panicked"))?
}

/// What we keep open inside one namespace.
pub struct NsHandle {
    pub inum: u32,
    pub name: Option<String>,
    stat: Option<File>,
    /// A socket created inside the namespace answers SIOCGIFNAME for it.
    ifsock: Option<std::os::fd::OwnedFd>,
    ifnames: HashMap<u32, Option<String>>,
}

impl NsHandle {
    fn open(inum: u32, name: Option<String>, path: &Path) -> Result<NsHandle> {
        let (stat, ifsock) = in_netns(path, || {
            let stat = File::open("/proc/thread-self/net/stat/nf_conntrack").ok();
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
            let sock = (fd >= 0).then(|| unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) });
            Ok((stat, sock))
        })?;
        Ok(NsHandle { inum, name, stat, ifsock, ifnames: HashMap::new() })
    }

    /// None when conntrack is not loaded.
    pub fn counters(&mut self) -> Option<CtCounters> {
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
        let name = self.ifsock.as_ref().and_then(|s| ifname_via(s.as_raw_fd(), ifindex));
        self.ifnames.insert(ifindex, name.clone());
        name
    }
}

fn ifname_via(sock: i32, ifindex: u32) -> Option<String> {
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    req.ifr_ifru.ifru_ifindex = ifindex as i32;
    if unsafe { libc::ioctl(sock, libc::SIOCGIFNAME, &mut req) } != 0 {
        return None;
    }
    let bytes: Vec<u8> = req.ifr_name.iter().take_while(|c| **c != 0).map(|c| *c as u8).collect();
    String::from_utf8(bytes).ok()
}

/// Finds and caches namespace handles by inode.
pub struct NsRegistry {
    handles: HashMap<u32, NsHandle>,
    unknown: HashMap<u32, Instant>,
    /// What [`NsRegistry::display_name`] found, per inode (None: no name).
    names: std::cell::RefCell<HashMap<u32, Option<String>>>,
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
        NsRegistry { handles: HashMap::new(), unknown: HashMap::new(), names: Default::default() }
    }

    /// The one name of a namespace in every output (drop lines, JSON,
    /// summary, captures and reports, metrics, advice): today its `ip netns`
    /// name; None when it has none (outputs then show the inode, see
    /// [`label`]). Looked up once per inode.
    pub fn display_name(&self, inum: u32) -> Option<String> {
        if let Some(n) = self.names.borrow().get(&inum) {
            return n.clone();
        }
        let name = named_namespaces().remove(&inum).map(|(n, _)| n);
        self.names.borrow_mut().insert(inum, name.clone());
        name
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
            match find_namespace(inum).and_then(|(name, path)| NsHandle::open(inum, name, &path).ok()) {
                Some(h) => {
                    self.unknown.remove(&inum);
                    self.handles.insert(inum, h);
                }
                None => {
                    self.unknown.insert(inum, Instant::now());
                    return None;
                }
            }
        }
        self.handles.get_mut(&inum)
    }

    /// Every namespace we can find now, opened (for start-of-run baselines).
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

    pub fn inodes(&self) -> Vec<u32> {
        self.handles.keys().copied().collect()
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
        if std::fs::metadata(&p).map(|m| m.ino() as u32 == inum).unwrap_or(false) {
            return Some((None, p));
        }
    }
    None
}
