//! The bench's world: two namespaces joined by a veth pair, the receiver's
//! conntrack switched on, and the global `nf_conntrack_max` shrunk so its
//! table is full. Each piece is a guard that undoes itself on drop, also
//! when the bench fails or is interrupted.

use std::{
    fs::File,
    io::{Read, Seek, SeekFrom, Write},
    net::Ipv4Addr,
    os::fd::AsRawFd,
    path::PathBuf,
    process::Command,
};

use anyhow::{anyhow, bail, Context as _, Result};

use crate::proc;

/// The lock every user of `nf_conntrack_max` takes (the integration tests
/// too). While held, the file stores the value to restore, so a holder
/// that was killed is repaired by the next one.
pub const LOCK_PATH: &str = "/run/ctdrop-tests.lock";
const CONNTRACK_MAX: &str = "/proc/sys/net/netfilter/nf_conntrack_max";

pub const SENDER: &str = "ctdb-tx";
pub const RECEIVER: &str = "ctdb-rx";
pub const SENDER_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 60, 1);
pub const RECEIVER_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 60, 2);

fn read_max() -> Result<u64> {
    let s = std::fs::read_to_string(CONNTRACK_MAX)
        .with_context(|| format!("reading {CONNTRACK_MAX} (is nf_conntrack loaded?)"))?;
    s.trim()
        .parse()
        .with_context(|| format!("parsing {CONNTRACK_MAX}"))
}

fn write_max(v: u64) -> Result<()> {
    std::fs::write(CONNTRACK_MAX, format!("{v}\n"))
        .with_context(|| format!("setting nf_conntrack_max to {v}"))
}

/// Exclusive hold on the lock and on `nf_conntrack_max`.
pub struct ConntrackMax {
    lock: File,
    previous: u64,
}

impl ConntrackMax {
    pub fn set(value: u64) -> Result<ConntrackMax> {
        let mut lock = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(LOCK_PATH)
            .with_context(|| format!("opening {LOCK_PATH}"))?;
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            println!("bench: waiting for {LOCK_PATH} (tests are changing nf_conntrack_max)");
            if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
                bail!("flock {LOCK_PATH}: {}", std::io::Error::last_os_error());
            }
        }
        let mut pending = String::new();
        lock.read_to_string(&mut pending)
            .context("reading the lock file")?;
        if let Ok(v) = pending.trim().parse::<u64>() {
            println!("bench: restoring nf_conntrack_max={v} left over by a killed run");
            write_max(v)?;
        }
        let previous = read_max()?;
        lock.set_len(0)?;
        lock.seek(SeekFrom::Start(0))?;
        write!(lock, "{previous}")?;
        lock.sync_all()?;
        let guard = ConntrackMax { lock, previous };
        write_max(value)?;
        Ok(guard)
    }

    pub fn previous(&self) -> u64 {
        self.previous
    }
}

impl Drop for ConntrackMax {
    fn drop(&mut self) {
        match write_max(self.previous) {
            Ok(()) => {
                let _ = self.lock.set_len(0);
            }
            Err(e) => eprintln!(
                "bench: cannot restore nf_conntrack_max={}: {e:#}",
                self.previous
            ),
        }
    }
}

fn ip(args: &[&str]) -> Result<()> {
    proc::check_quiet(Command::new("ip").args(args))
}

fn in_ns(ns: &str, args: &[&str]) -> Result<()> {
    proc::check_quiet(Command::new("ip").args(["netns", "exec", ns]).args(args))
}

/// Sender and receiver namespaces; deleted on drop.
pub struct Topology {
    made: Vec<&'static str>,
}

impl Topology {
    pub fn create() -> Result<Topology> {
        // A previous bench that was SIGKILLed may have left these behind.
        for ns in [SENDER, RECEIVER] {
            let _ = proc::check_quiet(Command::new("ip").args(["netns", "delete", ns]));
        }
        let mut t = Topology { made: Vec::new() };
        for ns in [SENDER, RECEIVER] {
            ip(&["netns", "add", ns])?;
            t.made.push(ns);
        }
        let (a, b) = ("ctdb-a", "ctdb-b");
        ip(&[
            "link", "add", a, "netns", SENDER, "type", "veth", "peer", "name", b, "netns", RECEIVER,
        ])?;
        for (ns, dev, addr) in [(SENDER, a, SENDER_ADDR), (RECEIVER, b, RECEIVER_ADDR)] {
            in_ns(ns, &["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"])?;
            in_ns(
                ns,
                &["ip", "addr", "add", &format!("{addr}/24"), "dev", dev],
            )?;
            in_ns(ns, &["ip", "link", "set", dev, "up"])?;
            in_ns(ns, &["ip", "link", "set", "lo", "up"])?;
        }
        // A static neighbour entry: no ARP exchange in the middle of a flood.
        let mac = mac_in(RECEIVER, b)?;
        in_ns(
            SENDER,
            &[
                "ip",
                "neigh",
                "replace",
                &RECEIVER_ADDR.to_string(),
                "lladdr",
                mac.trim(),
                "dev",
                a,
                "nud",
                "permanent",
            ],
        )?;
        // Any conntrack match turns conntrack on in the receiver; only new
        // flows then need an entry, and a full table drops them.
        in_ns(
            RECEIVER,
            &[
                "iptables",
                "-w",
                "-A",
                "INPUT",
                "-m",
                "conntrack",
                "--ctstate",
                "ESTABLISHED,RELATED",
                "-j",
                "ACCEPT",
            ],
        )?;
        Ok(t)
    }

    pub fn netns_path(name: &str) -> PathBuf {
        PathBuf::from("/run/netns").join(name)
    }
}

fn mac_in(ns: &str, dev: &str) -> Result<String> {
    let out = proc::probe(Command::new("ip").args([
        "netns",
        "exec",
        ns,
        "cat",
        &format!("/sys/class/net/{dev}/address"),
    ]))
    .ok_or_else(|| anyhow!("cannot read the MAC address of {dev} in {ns}"))?;
    Ok(out.trim().to_string())
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in self.made.drain(..).rev() {
            if let Err(e) = ip(&["netns", "delete", ns]) {
                eprintln!("bench: cannot delete netns {ns}: {e:#}");
            }
        }
    }
}

/// The receiver's `/proc/net/stat/nf_conntrack`, opened once from inside
/// it (the file keeps showing the namespace it was opened in).
pub struct DropCounter {
    file: File,
}

impl DropCounter {
    pub fn open(ns: &str) -> Result<DropCounter> {
        let ns_file =
            File::open(Topology::netns_path(ns)).with_context(|| format!("opening netns {ns}"))?;
        let file = std::thread::spawn(move || -> Result<File> {
            if unsafe { libc::setns(ns_file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!("entering netns: {}", std::io::Error::last_os_error());
            }
            File::open("/proc/thread-self/net/stat/nf_conntrack")
                .context("opening /proc/net/stat/nf_conntrack in the receiver")
        })
        .join()
        .map_err(|_| anyhow!("netns thread panicked"))??;
        Ok(DropCounter { file })
    }

    /// (`drop` summed over CPUs, `entries`).
    pub fn read(&mut self) -> Result<(u64, u64)> {
        let mut s = String::new();
        self.file.seek(SeekFrom::Start(0))?;
        self.file
            .read_to_string(&mut s)
            .context("reading the receiver's conntrack stats")?;
        parse_drop(&s)
    }
}

/// The `drop` column summed over the per-CPU lines, and `entries`.
pub fn parse_drop(text: &str) -> Result<(u64, u64)> {
    let mut lines = text.lines();
    let header: Vec<&str> = lines
        .next()
        .ok_or_else(|| anyhow!("empty conntrack stat file"))?
        .split_whitespace()
        .collect();
    let col = |name: &str| {
        header
            .iter()
            .position(|h| *h == name)
            .ok_or_else(|| anyhow!("no {name:?} column in conntrack stats"))
    };
    let (di, ei) = (col("drop")?, col("entries")?);
    let (mut drop, mut entries) = (0u64, 0u64);
    for line in lines {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() != header.len() {
            continue;
        }
        drop += u64::from_str_radix(f[di], 16).context("bad hex in conntrack stats")?;
        entries = u64::from_str_radix(f[ei], 16).context("bad hex in conntrack stats")?;
    }
    Ok((drop, entries))
}

#[cfg(test)]
mod tests {
    use super::parse_drop;

    #[test]
    fn drop_column_is_summed_over_cpus() {
        let text = "entries clashres found new invalid ignore delete chainlength insert insert_failed drop early_drop\n\
                    00000040 0 0 0 0 0 0 0 0 0 0000000a 00000001\n\
                    00000040 0 0 0 0 0 0 0 0 0 00000014 00000000\n";
        assert_eq!(parse_drop(text).unwrap(), (30, 64));
        assert!(parse_drop("entries found\n1 2\n").is_err());
    }
}
