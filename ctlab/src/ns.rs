//! Network namespaces: the one place a scene enters one (`setns`), and the
//! named namespaces a scene is built from.

use std::{
    fs::File,
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread::JoinHandle,
};

use anyhow::{anyhow, bail, Context, Result};

/// Where `ip netns` keeps its named namespaces.
pub const NETNS_DIR: &str = "/run/netns";

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

/// Moves the calling thread into the network namespace open as `ns`. Only
/// this thread moves: callers run it on a thread of their own.
pub fn enter_file(ns: &File) -> Result<()> {
    // SAFETY: setns on a namespace file we hold open; it changes only the
    // calling thread's network namespace.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Moves the calling thread into the network namespace at `path`.
pub fn enter(path: &Path) -> Result<()> {
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    enter_file(&f).with_context(|| format!("entering {}", path.display()))
}

/// Starts `f` on a named thread inside the namespace at `path` (opened
/// before the thread starts, so a missing namespace is an error here). A
/// thread that cannot enter returns that error from its join.
pub fn spawn_in<T: Send + 'static>(
    path: &Path,
    name: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<JoinHandle<Result<T>>> {
    let ns = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let shown = path.display().to_string();
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            enter_file(&ns).with_context(|| format!("entering {shown}"))?;
            f()
        })
        .with_context(|| format!("starting thread {name}"))
}

/// Runs `f` on a fresh thread inside the namespace at `path` and waits for
/// it (the calling thread stays where it is; `f` may borrow from it).
pub fn in_netns<T: Send>(path: &Path, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    let ns = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    std::thread::scope(|s| {
        s.spawn(|| {
            enter_file(&ns).with_context(|| format!("entering {}", path.display()))?;
            f()
        })
        .join()
        .map_err(|_| anyhow!("namespace worker panicked"))?
    })
}

/// The path of the `ip netns` namespace `name`.
pub fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// Deletes the namespace `name` if a killed run left it behind; whether
/// there was one.
pub fn remove_leftover(name: &str) -> Result<bool> {
    if !netns_path(name).exists() {
        return Ok(false);
    }
    run(&["ip", "netns", "del", name])?;
    Ok(true)
}

/// `TOOL -w -A CHAIN -m conntrack --ctstate STATES -j ACCEPT` (`iptables`
/// or `ip6tables`): any conntrack match turns conntrack on in the
/// namespace it is added in.
pub fn accept_ct_rule<'a>(tool: &'a str, chain: &'a str, states: &'a str) -> [&'a str; 10] {
    [
        tool,
        "-w",
        "-A",
        chain,
        "-m",
        "conntrack",
        "--ctstate",
        states,
        "-j",
        "ACCEPT",
    ]
}

/// A named network namespace with loopback up and IPv6 off (no router
/// solicitations or DAD packets to muddy the counts), deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// `ctdt-<pid>-<n>`: the tests' namespaces.
    pub fn new() -> Result<Netns> {
        Netns::with_prefix("ctdt")
    }

    /// `<prefix>-<pid>-<n>`: a suite's own prefix, so a leftover says
    /// whose it is, and the pid says which run (see [`Netns::is_ours`]).
    pub fn with_prefix(prefix: &str) -> Result<Netns> {
        Netns::create(&format!("{prefix}-{}-{}", std::process::id(), next_id()))
    }

    /// Exactly `name` (fails if it exists).
    pub fn create(name: &str) -> Result<Netns> {
        run(&["ip", "netns", "add", name])?;
        // From here on drop deletes it, also when the setup below fails.
        let ns = Netns {
            name: name.to_string(),
        };
        ns.exec(&[
            "sysctl",
            "-qw",
            "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.default.disable_ipv6=1",
        ])?;
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Whether a namespace name is one [`Netns::with_prefix`] made in this
    /// process (`*-<pid>-*`).
    pub fn is_ours(name: &str) -> bool {
        name.contains(&format!("-{}-", std::process::id()))
    }

    pub fn path(&self) -> PathBuf {
        netns_path(&self.name)
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

    /// Adds [`accept_ct_rule`] here.
    pub fn accept_ct(&self, tool: &str, chain: &str, states: &str) -> Result<()> {
        self.exec(&accept_ct_rule(tool, chain, states))?;
        Ok(())
    }

    /// [`in_netns`] for this namespace.
    pub fn run_in<T: Send>(&self, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
        in_netns(&self.path(), f)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = run(&["ip", "netns", "del", &self.name]) {
            eprintln!("ctlab: cleanup: {e:#}");
        }
    }
}
