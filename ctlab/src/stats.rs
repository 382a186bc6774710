//! `/proc/net/stat/nf_conntrack`: the kernel's own per-namespace counters,
//! what every scene checks itself against.

use std::{
    collections::BTreeMap,
    fs::File,
    io::{Read, Seek, SeekFrom},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};

use crate::ns::{in_netns, Netns};

/// The stat file as seen from the calling thread's namespace.
const THREAD_STAT: &str = "/proc/thread-self/net/stat/nf_conntrack";

/// Column name -> value: every column summed over CPUs, except `entries`
/// (the namespace's table count, the same on every CPU's line).
pub type CtStats = BTreeMap<String, u64>;

/// Parses the stat file's text by its header's column names.
pub fn parse_ct_stats(text: &str) -> Result<CtStats> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header: Vec<&str> = lines
        .next()
        .ok_or_else(|| anyhow!("empty stat file"))?
        .split_whitespace()
        .collect();
    let mut out: CtStats = header.iter().map(|h| (h.to_string(), 0)).collect();
    for (i, line) in lines.enumerate() {
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.len() != header.len() {
            bail!(
                "stat line {line:?} has {} columns, header {}",
                cols.len(),
                header.len()
            );
        }
        for (name, v) in header.iter().zip(cols) {
            let v = u64::from_str_radix(v, 16).with_context(|| format!("hex {v:?}"))?;
            if *name == "entries" {
                if i == 0 {
                    out.insert(name.to_string(), v);
                }
            } else {
                *out.get_mut(*name).unwrap() += v;
            }
        }
    }
    Ok(out)
}

/// The `entries` column of a stat file's text, if it has one.
pub fn parse_entries(text: &str) -> Option<u64> {
    parse_ct_stats(text).ok()?.get("entries").copied()
}

/// The counters of the namespace at `path`, read from inside it.
pub fn ct_stats_at(path: &Path) -> Result<CtStats> {
    in_netns(path, || {
        parse_ct_stats(&std::fs::read_to_string(THREAD_STAT).context("reading conntrack stats")?)
    })
}

/// The counters of `ns`.
pub fn ct_stats(ns: &Netns) -> Result<CtStats> {
    ct_stats_at(&ns.path())
}

/// `ns`'s counters once column `col` stops moving (packets on a veth are
/// delivered asynchronously): read every 100 ms, at most 5 s.
pub fn settled_ct_stats(ns: &Netns, col: &str) -> Result<CtStats> {
    settled_ct_stats_within(ns, col, Duration::from_secs(5))
}

/// [`settled_ct_stats`] waiting at most `limit`.
pub fn settled_ct_stats_within(ns: &Netns, col: &str, limit: Duration) -> Result<CtStats> {
    let mut last = ct_stats(ns)?;
    let deadline = Instant::now() + limit;
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let now = ct_stats(ns)?;
        if now.get(col) == last.get(col) || Instant::now() > deadline {
            return Ok(now);
        }
        last = now;
    }
}

/// A namespace's stat file opened once from inside it (the file keeps
/// showing the namespace it was opened in), for reading in a loop without
/// a thread per read.
pub struct StatFile {
    file: File,
}

impl StatFile {
    pub fn open(path: &Path) -> Result<StatFile> {
        let file = in_netns(path, || {
            File::open(THREAD_STAT).context("opening conntrack stats")
        })?;
        Ok(StatFile { file })
    }

    pub fn read(&mut self) -> Result<CtStats> {
        let mut s = String::new();
        self.file.seek(SeekFrom::Start(0))?;
        self.file
            .read_to_string(&mut s)
            .context("reading conntrack stats")?;
        parse_ct_stats(&s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_sum_cpus_but_not_entries() {
        let t = "entries  clashres drop early_drop\n00000040  00000001 0000000a 00000000\n00000040  00000002 00000005 00000001\n";
        let s = parse_ct_stats(t).unwrap();
        assert_eq!(s["entries"], 64);
        assert_eq!(s["clashres"], 3);
        assert_eq!(s["drop"], 15);
        assert_eq!(s["early_drop"], 1);
    }

    #[test]
    fn entries_come_from_the_entries_column() {
        let t = "entries  clashres found new\n0000012c 00000001 00000000 00000000\n0000012c 00000000 00000000 00000000\n";
        assert_eq!(parse_entries(t), Some(300));
        assert_eq!(parse_entries("found new\n1 2\n"), None);
        assert_eq!(parse_entries(""), None);
        assert!(parse_ct_stats("entries found\n1 2 3\n").is_err());
    }
}
