//! `/proc/net/stat/nf_conntrack`: the kernel's own per-namespace counters.

use std::collections::BTreeMap;

use anyhow::{anyhow, bail, Result};

/// Counters summed over CPUs, keyed by the kernel's column name; `entries`
/// is the namespace's table count and is not summed (every line repeats it).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CtCounters {
    pub columns: BTreeMap<String, u64>,
}

/// The file's column names and each CPU line's values (one line per
/// possible CPU, in CPU order; the kernel prints them in hex).
pub fn per_cpu_rows(text: &str) -> Result<(Vec<&str>, Vec<Vec<u64>>)> {
    let mut lines = text.lines();
    let header: Vec<&str> = lines
        .next()
        .ok_or_else(|| anyhow!("empty conntrack stat file"))?
        .split_whitespace()
        .collect();
    if header.is_empty() {
        bail!("conntrack stat file has no header");
    }
    let mut rows = Vec::new();
    for line in lines {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.is_empty() {
            continue;
        }
        if fields.len() != header.len() {
            bail!(
                "conntrack stat line has {} columns, header has {}",
                fields.len(),
                header.len()
            );
        }
        let row = fields
            .iter()
            .map(|f| {
                u64::from_str_radix(f, 16)
                    .map_err(|_| anyhow!("bad hex value {f:?} in conntrack stats"))
            })
            .collect::<Result<Vec<u64>>>()?;
        rows.push(row);
    }
    Ok((header, rows))
}

impl CtCounters {
    pub fn parse(text: &str) -> Result<Self> {
        let (header, rows) = per_cpu_rows(text)?;
        let mut columns: BTreeMap<String, u64> =
            header.iter().map(|h| (h.to_string(), 0)).collect();
        for row in rows {
            for (name, v) in header.iter().zip(row) {
                let slot = columns.get_mut(*name).unwrap();
                if *name == "entries" {
                    *slot = v;
                } else {
                    *slot += v;
                }
            }
        }
        Ok(CtCounters { columns })
    }

    pub fn get(&self, name: &str) -> u64 {
        self.columns.get(name).copied().unwrap_or(0)
    }

    pub fn entries(&self) -> u64 {
        self.get("entries")
    }

    /// Increase of every counter since `before` (entries: the new value).
    pub fn delta(&self, before: &CtCounters) -> CtCounters {
        let columns = self
            .columns
            .iter()
            .map(|(k, v)| {
                let d = if k == "entries" {
                    *v
                } else {
                    v.saturating_sub(before.get(k))
                };
                (k.clone(), d)
            })
            .collect();
        CtCounters { columns }
    }
}

/// The kernel's conntrack counter increase in one namespace next to the
/// drops ctdrop recorded there (live summary and capture report alike).
#[derive(Clone, Debug)]
pub struct CounterCheck {
    pub netns: u32,
    pub netns_name: Option<String>,
    pub delta: CtCounters,
    pub table_full: u64,
    pub insert_failed: u64,
}

impl CounterCheck {
    /// The kernel's `drop` column counts table-full and insert-failed
    /// drops: every one of them got exactly one record.
    pub fn agrees(&self) -> bool {
        self.delta.get("drop") == self.table_full + self.insert_failed
    }

    /// Conntrack drops the kernel counted that have no record (lost events).
    pub fn unrecorded(&self) -> u64 {
        self.delta
            .get("drop")
            .saturating_sub(self.table_full + self.insert_failed)
    }
}

/// Global limits (the sysctls are global; only `entries` is per namespace).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtLimits {
    pub max: u64,
    pub buckets: u64,
}

impl CtLimits {
    pub fn read() -> Option<CtLimits> {
        let rd = |p: &str| std::fs::read_to_string(p).ok()?.trim().parse::<u64>().ok();
        Some(CtLimits {
            max: rd("/proc/sys/net/netfilter/nf_conntrack_max")?,
            buckets: rd("/proc/sys/net/netfilter/nf_conntrack_buckets").unwrap_or(0),
        })
    }
}

/// Two CPUs' lines as a 6.18 kernel prints them (tests here and in
/// kernel/cpustat.rs).
#[cfg(test)]
pub(crate) const TWO_CPUS: &str = "entries  clashres found new invalid ignore delete chainlength insert insert_failed drop early_drop icmp_error  expect_new expect_create expect_delete search_restart\n\
0000003f  00000000 00000000 00000000 00000002 00000000 00000000 00000000 00000000 00000001 0000000a 00000000 00000000  00000000 00000000 00000000 00000000\n\
0000003f  00000001 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000014 00000000 00000000  00000000 00000000 00000000 00000000\n";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_cpus_but_not_entries() {
        let c = CtCounters::parse(TWO_CPUS).unwrap();
        assert_eq!(c.entries(), 63);
        assert_eq!(c.get("drop"), 30);
        assert_eq!(c.get("insert_failed"), 1);
        assert_eq!(c.get("clashres"), 1);
        assert_eq!(c.get("invalid"), 2);
    }

    #[test]
    fn delta_is_increase() {
        let a = CtCounters::parse(TWO_CPUS).unwrap();
        let mut b = a.clone();
        *b.columns.get_mut("drop").unwrap() += 7;
        assert_eq!(b.delta(&a).get("drop"), 7);
        assert_eq!(b.delta(&a).entries(), 63);
    }

    #[test]
    fn rejects_ragged_lines_and_bad_hex() {
        assert!(CtCounters::parse("entries drop\n1\n").is_err());
        assert!(CtCounters::parse("entries drop\n1 zz\n").is_err());
        assert!(CtCounters::parse("").is_err());
    }
}
