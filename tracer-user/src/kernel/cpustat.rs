//! Conntrack's own per-CPU counters as the witness of which netfilter drop
//! conntrack made (tracer-ebpf/src/witness.rs): what the kernel program
//! needs to find them, the seeds it starts from, and which of its first
//! decisions userspace must not trust.
//!
//! Cost: nothing per packet that lives; per netfilter drop, one array
//! lookup and one 32-byte read (plus two reads the first time a namespace
//! drops on a CPU). The netfilter hook marks it replaces by default ran
//! four programs on every packet of every namespace.

use std::{
    collections::{HashMap, HashSet},
    fs::File,
    io::Read,
    path::PathBuf,
};

use anyhow::{anyhow, bail, Context, Result};
use aya::maps::{MapData, PerCpuArray, PerCpuValues};
use tracer_common::{
    cpu_stat_set, cpu_stat_way, CpuStatSet, CpuStatWay, Offsets, CPU_STAT_SETS, OFFSET_ABSENT,
};

/// `drop`, `insert_failed`, `invalid` of one CPU.
pub type CpuCounters = [u32; 3];

/// One namespace at one moment: its cookie and each possible CPU's
/// counters, in CPU order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NsCounters {
    pub cookie: u64,
    pub per_cpu: Vec<CpuCounters>,
}

/// Per namespace inode.
pub type Snapshot = HashMap<u32, NsCounters>;

/// Whether the kernel program can find the counters on this kernel; why
/// not when it cannot.
pub fn config(offsets: &Offsets) -> Result<()> {
    if std::env::var_os("CTDROP_CPU_STAT").is_some_and(|v| v == "off") {
        bail!("switched off by CTDROP_CPU_STAT=off");
    }
    for (name, off) in [
        ("net.ct.stat", offsets.net_ct_stat),
        ("ip_conntrack_stat.drop", offsets.stat_drop),
        (
            "ip_conntrack_stat.insert_failed",
            offsets.stat_insert_failed,
        ),
        ("ip_conntrack_stat.invalid", offsets.stat_invalid),
        ("bpf_array.pptrs", offsets.array_pptrs),
    ] {
        if off == OFFSET_ABSENT {
            bail!("kernel BTF lacks {name}");
        }
    }
    // The kernel program reads the struct's first 32 bytes in one go.
    if [
        offsets.stat_drop,
        offsets.stat_insert_failed,
        offsets.stat_invalid,
    ]
    .iter()
    .any(|o| *o > 28 || o % 4 != 0)
    {
        bail!("struct ip_conntrack_stat has an unexpected layout");
    }
    Ok(())
}

/// One namespace's `/proc/net/stat/nf_conntrack`, per CPU line.
pub fn parse_per_cpu(text: &str) -> Result<Vec<CpuCounters>> {
    let (header, rows) = crate::conntrack::stats::per_cpu_rows(text)?;
    let col = |n: &str| {
        header
            .iter()
            .position(|h| *h == n)
            .ok_or_else(|| anyhow!("conntrack stat file has no {n} column"))
    };
    let cols = [col("drop")?, col("insert_failed")?, col("invalid")?];
    // The counters are u32 in the kernel (printed as %08x).
    Ok(rows.iter().map(|r| cols.map(|i| r[i] as u32)).collect())
}

/// The counters of every namespace in `namespaces` (inode -> a path that
/// opens it) that has conntrack, read by one worker thread that enters
/// each in turn (the cookie needs a socket made inside it).
pub fn snapshot(namespaces: &HashMap<u32, PathBuf>) -> Snapshot {
    let list: Vec<(u32, PathBuf)> = namespaces.iter().map(|(n, p)| (*n, p.clone())).collect();
    std::thread::spawn(move || {
        let mut out = Snapshot::new();
        for (ns, path) in list {
            let Ok(f) = File::open(&path) else { continue };
            if crate::conntrack::netns::enter_file(&f).is_err() {
                continue;
            }
            let mut s = String::new();
            let read = File::open("/proc/thread-self/net/stat/nf_conntrack")
                .and_then(|mut f| f.read_to_string(&mut s));
            if let (Ok(_), Some(cookie)) = (read, own_netns_cookie()) {
                if let Ok(per_cpu) = parse_per_cpu(&s) {
                    out.insert(ns, NsCounters { cookie, per_cpu });
                }
            }
        }
        out
    })
    .join()
    .unwrap_or_default()
}

/// The calling thread's network namespace cookie (SO_NETNS_COOKIE, 5.14+).
fn own_netns_cookie() -> Option<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    // SAFETY: a datagram socket closed below; getsockopt writes at most
    // `len` bytes into `cookie`.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return None;
        }
        let mut cookie: u64 = 0;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        let r = libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            &mut cookie as *mut u64 as *mut libc::c_void,
            &mut len,
        );
        libc::close(fd);
        (r == 0 && cookie != 0).then_some(cookie)
    }
}

/// Writes `seeds` into the ledger. Only before `kfree_skb` is attached:
/// sets are rewritten whole, which would race with the program.
pub fn seed(
    ledger: &mut PerCpuArray<&mut MapData, CpuStatSet>,
    seeds: &Snapshot,
) -> Result<HashSet<u32>> {
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| anyhow!("counting CPUs: {e}"))?;
    let mut sets: HashMap<u32, Vec<CpuStatSet>> = HashMap::new();
    let mut seeded = HashSet::new();
    for (ns, c) in seeds {
        // Lines are per possible CPU; the map has a value per possible CPU.
        if c.per_cpu.len() != cpus {
            continue;
        }
        let set = sets
            .entry(cpu_stat_set(*ns))
            .or_insert_with(|| vec![CpuStatSet::default(); cpus]);
        // Two namespaces per set: a third is met unseeded (the totals
        // decide its first drop on each CPU).
        let Some(way) = (0..2).find(|w| set[0].ways[*w].inum == 0) else {
            continue;
        };
        for (cpu, v) in c.per_cpu.iter().enumerate() {
            set[cpu].ways[way] = CpuStatWay {
                cookie: c.cookie,
                stat: 0,
                inum: *ns,
                drop: v[0],
                insert_failed: v[1],
                invalid: v[2],
                state: cpu_stat_way::SEEDED,
                _pad: 0,
            };
        }
        seeded.insert(*ns);
    }
    for (index, values) in sets {
        debug_assert!(index < CPU_STAT_SETS);
        let values = PerCpuValues::try_from(values).context("per-CPU ledger values")?;
        ledger
            .set(index, values, 0)
            .context("seeding the conntrack counter ledger")?;
    }
    Ok(seeded)
}

/// The (namespace, CPU) pairs where a first decision against a baseline
/// (`flags::CT_STAT_BASELINE`) may rest on a drop the program never saw,
/// so the totals decide it instead: where the counters moved between the
/// seed's read and the attach, and in namespaces that existed at the start
/// but got no seed (their zero baseline is not known to hold). A namespace
/// born after the start has every drop seen: its zero baseline holds.
#[derive(Clone, Debug, Default)]
pub struct Unsure {
    pairs: HashSet<(u32, u32)>,
    /// Unsure on every CPU.
    namespaces: HashSet<u32>,
}

impl Unsure {
    pub fn between(
        before: &Snapshot,
        after: &Snapshot,
        seeded: &HashSet<u32>,
        present: impl IntoIterator<Item = u32>,
    ) -> Unsure {
        let mut u = Unsure::default();
        for ns in present {
            if !seeded.contains(&ns) {
                u.namespaces.insert(ns);
            }
        }
        for (ns, b) in before {
            match after.get(ns) {
                Some(a) if a.cookie == b.cookie => {
                    for (cpu, (x, y)) in b.per_cpu.iter().zip(&a.per_cpu).enumerate() {
                        if x != y {
                            u.pairs.insert((*ns, cpu as u32));
                        }
                    }
                }
                // Gone, or unreadable: trust none of its seeds.
                _ => {
                    u.namespaces.insert(*ns);
                }
            }
        }
        u
    }

    pub fn contains(&self, ns: u32, cpu: u32) -> bool {
        self.namespaces.contains(&ns) || self.pairs.contains(&(ns, cpu))
    }

    /// Namespaces unsure on every CPU, and further (namespace, CPU) pairs.
    pub fn counts(&self) -> (usize, usize) {
        (self.namespaces.len(), self.pairs.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_cpu_lines_give_drop_insert_failed_invalid_by_header_name() {
        let c = parse_per_cpu(crate::conntrack::stats::TWO_CPUS).unwrap();
        assert_eq!(c, vec![[0x0a, 1, 2], [0x14, 0, 0]]);
        assert!(parse_per_cpu("entries found\n1 2\n").is_err());
    }

    fn ns(cookie: u64, per_cpu: Vec<CpuCounters>) -> NsCounters {
        NsCounters { cookie, per_cpu }
    }

    #[test]
    fn a_seed_that_moved_before_the_attach_is_unsure_on_that_cpu_only() {
        let before: Snapshot = [
            (7, ns(70, vec![[1, 0, 0], [5, 0, 0]])),
            (8, ns(80, vec![[0, 0, 0]; 2])),
            (9, ns(90, vec![[0, 0, 0]; 2])),
        ]
        .into();
        // 8 is gone; 9 is a new namespace that took a freed inode.
        let after: Snapshot = [
            (7, ns(70, vec![[1, 0, 0], [6, 0, 0]])),
            (9, ns(91, vec![[0, 0, 0]; 2])),
        ]
        .into();
        let seeded: HashSet<u32> = [7, 8, 9].into();
        // 10 was there but got no seed (its set was full).
        let u = Unsure::between(&before, &after, &seeded, [7, 8, 9, 10]);
        assert!(!u.contains(7, 0));
        assert!(u.contains(7, 1));
        for n in [8, 9, 10] {
            assert!(u.contains(n, 0) && u.contains(n, 1), "{n}");
        }
        // Born after the start: its zero baseline holds.
        assert!(!u.contains(11, 0));
        assert_eq!(u.counts(), (3, 1));
    }
}
