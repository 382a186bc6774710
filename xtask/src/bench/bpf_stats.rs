//! Kernel-side cost of a tracer: the run time the kernel accounts to each
//! BPF program while run-time statistics are on (`run_time_ns`, `run_cnt`
//! in the program's fdinfo), summed over the programs a tracer process
//! holds.

use std::{
    collections::HashSet,
    os::fd::{FromRawFd, OwnedFd},
};

use anyhow::{bail, Result};

const SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";
/// `BPF_ENABLE_STATS` of `enum bpf_cmd`.
const BPF_ENABLE_STATS: libc::c_long = 32;
/// `BPF_STATS_RUN_TIME` of `enum bpf_stats_type`.
const BPF_STATS_RUN_TIME: u32 = 0;

/// Run-time statistics switched on for as long as this value lives.
///
/// Taken with `BPF_ENABLE_STATS` rather than by writing
/// `kernel.bpf_stats_enabled`: both raise the same kernel switch (a
/// reference-counted static key), but the descriptor's reference is dropped
/// by the kernel when it is closed, so the statistics go off again on every
/// exit path, SIGKILL and panics included. The sysctl itself is never
/// written (it keeps reading what its last writer set, usually 0), so a
/// value someone else set is left as it was.
pub struct StatsOn {
    _fd: OwnedFd,
}

impl StatsOn {
    pub fn enable() -> Result<StatsOn> {
        let mut attr = [0u8; 8];
        attr[..4].copy_from_slice(&BPF_STATS_RUN_TIME.to_ne_bytes());
        // SAFETY: bpf(2) reads `attr.len()` bytes from a buffer we own and
        // returns a new descriptor or -1.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_ENABLE_STATS,
                attr.as_mut_ptr(),
                attr.len(),
            )
        };
        if fd < 0 {
            bail!(
                "bpf(BPF_ENABLE_STATS) failed: {} (needs root, Linux 5.8+)",
                std::io::Error::last_os_error()
            );
        }
        // SAFETY: the kernel just returned this descriptor; we are its only owner.
        Ok(StatsOn {
            _fd: unsafe { OwnedFd::from_raw_fd(fd as i32) },
        })
    }
}

/// Current `kernel.bpf_stats_enabled`, for the printed header.
pub fn sysctl_value() -> Option<String> {
    std::fs::read_to_string(SYSCTL)
        .ok()
        .map(|s| s.trim().to_string())
}

/// Run time and run count summed over the BPF programs process `pid`
/// holds descriptors to (each program once, however many descriptors),
/// and per program: ctdrop's tracepoint tier also runs netfilter hook
/// programs on every packet, so the sum is more than kfree_skb's cost and
/// the breakdown says by how much.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProgStats {
    pub run_time_ns: u64,
    pub run_cnt: u64,
    pub programs: u32,
    /// Per program, by id (names are filled in by [`ProgStats::name_programs`]).
    pub by_prog: Vec<ProgRun>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProgRun {
    pub id: u64,
    pub name: String,
    pub run_time_ns: u64,
    pub run_cnt: u64,
}

impl ProgStats {
    pub fn since(&self, earlier: &ProgStats) -> ProgStats {
        let by_prog = self
            .by_prog
            .iter()
            .map(|p| {
                let before = earlier.by_prog.iter().find(|e| e.id == p.id);
                ProgRun {
                    id: p.id,
                    name: p.name.clone(),
                    run_time_ns: p
                        .run_time_ns
                        .saturating_sub(before.map_or(0, |b| b.run_time_ns)),
                    run_cnt: p.run_cnt.saturating_sub(before.map_or(0, |b| b.run_cnt)),
                }
            })
            .collect();
        ProgStats {
            run_time_ns: self.run_time_ns.saturating_sub(earlier.run_time_ns),
            run_cnt: self.run_cnt.saturating_sub(earlier.run_cnt),
            programs: self.programs,
            by_prog,
        }
    }

    /// Program names from `bpftool prog show id N` (fdinfo has none); read
    /// after the flood, so the lookups cost the measurement nothing.
    pub fn name_programs(&mut self) {
        for p in &mut self.by_prog {
            let id = p.id.to_string();
            let out = crate::proc::probe(
                std::process::Command::new("bpftool").args(["prog", "show", "id", &id, "--json"]),
            );
            p.name = out
                .and_then(|o| serde_json::from_str::<serde_json::Value>(&o).ok())
                .and_then(|v| v.get("name")?.as_str().map(String::from))
                .unwrap_or_else(|| format!("id{id}"));
        }
    }

    /// `name ns/run x runs, ...`, costliest first.
    pub fn breakdown(&self) -> String {
        let mut v: Vec<&ProgRun> = self.by_prog.iter().filter(|p| p.run_cnt > 0).collect();
        v.sort_by_key(|p| std::cmp::Reverse(p.run_time_ns));
        v.iter()
            .map(|p| {
                format!(
                    "{} {:.0}ns x {}",
                    p.name,
                    p.run_time_ns as f64 / p.run_cnt as f64,
                    p.run_cnt
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

pub fn of_process(pid: u32) -> Result<ProgStats> {
    let mut seen = HashSet::new();
    let mut total = ProgStats::default();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let entry = entry?;
        // A descriptor closed between readdir and here is simply skipped.
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        if target.as_os_str() != "anon_inode:bpf-prog" {
            continue;
        }
        let Ok(info) = std::fs::read_to_string(format!(
            "/proc/{pid}/fdinfo/{}",
            entry.file_name().to_string_lossy()
        )) else {
            continue;
        };
        let Some(p) = parse_fdinfo(&info) else {
            continue;
        };
        if seen.insert(p.0) {
            total.run_time_ns += p.1;
            total.run_cnt += p.2;
            total.programs += 1;
            total.by_prog.push(ProgRun {
                id: p.0,
                name: String::new(),
                run_time_ns: p.1,
                run_cnt: p.2,
            });
        }
    }
    Ok(total)
}

/// (prog_id, run_time_ns, run_cnt) of a BPF program descriptor's fdinfo.
fn parse_fdinfo(text: &str) -> Option<(u64, u64, u64)> {
    let field = |name: &str| -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.trim().parse().ok())
    };
    Some((field("prog_id")?, field("run_time_ns")?, field("run_cnt")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fdinfo_of_a_program() {
        let t = "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t1057\nprog_type:\t26\nprog_jited:\t1\nprog_tag:\t3b185187f1855c4c\nmemlock:\t4096\nprog_id:\t1386\nrun_time_ns:\t7418250\nrun_cnt:\t41234\nrecursion_misses:\t0\nverified_insns:\t381\n";
        assert_eq!(parse_fdinfo(t), Some((1386, 7_418_250, 41_234)));
        assert_eq!(parse_fdinfo("pos:\t0\nmap_type:\t27\n"), None);
    }

    #[test]
    fn stats_of_this_process_without_programs() {
        let s = of_process(std::process::id()).unwrap();
        assert_eq!(s, ProgStats::default());
    }
}
