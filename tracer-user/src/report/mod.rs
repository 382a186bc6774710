//! Reports from capture files: one pass over the records builds a
//! [`Report`]; `text` renders it for people (table, markdown), `json` for
//! tools; `compare` puts two side by side; `export` writes pcap-ng.
mod command;
pub mod compare;
pub mod export;
pub mod html;
pub mod json;
#[cfg(test)]
mod tests;
pub mod text;
pub mod timeline;

use std::{
    collections::BTreeMap,
    io::Read,
    path::{Path, PathBuf},
};

use anyhow::Result;

use crate::{
    capture::{meta::Header, record::Checkpoint, CaptureReader, End, Item},
    cause::Cause,
    conntrack::stats::{CounterCheck, CtCounters},
    flows::{Tally, DEFAULT_MAX_FLOWS},
    kernel::btf::DropReasons,
    model::{ProbeCounts, ProbeStatus, ProbeVerdict},
    output::{metrics::Metrics, Shown},
};

/// `ctdrop report`: in a child of its own, so that the renderers below,
/// which read [`Report`], are not imported back by the module defining it.
pub use command::run;

/// Longest drops-per-second series kept (a day); later drops count in the last second.
const MAX_SECONDS: usize = 86_400;

/// One host's probe verdicts, rebuilt from the recorded verdicts: the
/// counts the live run kept (reads as its [`ProbeCounts`]) and each lost
/// probe's verdict (seq, time, verdict, the drop).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProbeTally {
    pub counts: ProbeCounts,
    pub lost_probes: Vec<ProbeVerdict>,
}

impl std::ops::Deref for ProbeTally {
    type Target = ProbeCounts;
    fn deref(&self) -> &ProbeCounts {
        &self.counts
    }
}

impl ProbeTally {
    fn add(&mut self, p: ProbeVerdict) {
        let c = &mut self.counts;
        match p.status {
            ProbeStatus::Ok => {
                c.sent += 1;
                c.answered += 1;
            }
            ProbeStatus::Lost => {
                c.sent += 1;
                c.count_lost(p.cause);
                self.lost_probes.push(p);
            }
            ProbeStatus::Late => c.late += 1,
        }
    }
}

pub struct Report {
    pub path: PathBuf,
    pub header: Header,
    pub end: End,
    pub tally: Tally,
    pub netns_names: BTreeMap<u32, String>,
    pub ifnames: BTreeMap<(Option<u32>, u32), String>,
    /// Drops in each second since the capture started.
    pub per_second: Vec<u64>,
    pub probes: BTreeMap<String, ProbeTally>,
    pub last_checkpoint: Option<Checkpoint>,
    pub last_drop_ts: Option<u64>,
    pub drops_with_headers: u64,
    /// Drops per (namespace, cause, L4 protocol): the metrics' labels.
    pub by_ns_cause_proto: BTreeMap<(Option<u32>, Cause, Option<u8>), u64>,
    /// Table snapshots stored in the capture (format 2 on): who held the table.
    pub occupancy: Vec<crate::conntrack::occupancy::Occupancy>,
    /// Drops per second by cause, fill, lost probes (the HTML plot's data).
    pub timeline: timeline::Timeline,
}

impl Report {
    /// Reads every record; `each` sees every drop as the live outputs did.
    pub fn build<R: Read>(
        path: &Path,
        mut reader: CaptureReader<R>,
        mut each: impl FnMut(&Shown),
    ) -> Report {
        let header = reader.header.clone();
        let reasons =
            DropReasons::from_pairs(header.drop_reasons.iter().map(|(v, n)| (n.clone(), *v)));
        let mut r = Report {
            path: path.to_path_buf(),
            tally: Tally::new(header.max_flows.unwrap_or(DEFAULT_MAX_FLOWS)),
            header,
            end: End::NoTrailer { at: 0 },
            netns_names: BTreeMap::new(),
            ifnames: BTreeMap::new(),
            per_second: Vec::new(),
            probes: BTreeMap::new(),
            last_checkpoint: None,
            last_drop_ts: None,
            drops_with_headers: 0,
            by_ns_cause_proto: BTreeMap::new(),
            occupancy: Vec::new(),
            timeline: timeline::Timeline::new(),
        };
        for p in &r.header.probes {
            r.probes.entry(p.clone()).or_default();
        }
        while let Some(item) = reader.next_item() {
            match item {
                Item::Drop(d) => {
                    let ev = &d.ev;
                    r.tally.record(ev, d.cause);
                    *r.by_ns_cause_proto
                        .entry((ev.netns, d.cause, ev.flow.as_ref().map(|f| f.proto)))
                        .or_default() += 1;
                    let sec = (ev.ts_ns.saturating_sub(r.header.started_mono_ns) / 1_000_000_000)
                        as usize;
                    let sec = sec.min(MAX_SECONDS - 1);
                    if r.per_second.len() <= sec {
                        r.per_second.resize(sec + 1, 0);
                    }
                    r.per_second[sec] += 1;
                    r.timeline
                        .drop(sec, d.cause, ev.netns, ev.ct_fill.map(|f| (f.count, f.max)));
                    r.last_drop_ts = Some(r.last_drop_ts.unwrap_or(0).max(ev.ts_ns));
                    r.drops_with_headers += ev.header.is_some() as u64;
                    let netns_name = d.netns_name.map(|id| reader.string(id));
                    let ifname = d.ifname.map(|id| reader.string(id));
                    if let (Some(ns), Some(n)) = (ev.netns, netns_name) {
                        r.netns_names.entry(ns).or_insert_with(|| n.to_string());
                    }
                    if let (Some(i), Some(n)) = (ev.ifindex, ifname) {
                        r.ifnames
                            .entry((ev.netns, i))
                            .or_insert_with(|| n.to_string());
                    }
                    let reason = reasons.name(ev.reason);
                    let shown = Shown {
                        ev,
                        cause: d.cause,
                        wall_ns: ev.ts_ns + r.header.boot_offset_ns,
                        reason: &reason,
                        netns_name,
                        ifname,
                        location: reader.string(d.location),
                    };
                    each(&shown);
                }
                Item::Probe(p) => r.probes.entry(p.host.clone()).or_default().add(p),
                Item::Checkpoint(c) => r.last_checkpoint = Some(c),
            }
        }
        r.end = reader.end().cloned().unwrap_or(End::NoTrailer { at: 0 });
        r.occupancy = std::mem::take(&mut reader.occupancy);
        for c in r.header.counters_at_start.iter().chain(
            r.end
                .trailer()
                .map(|t| &t.counters_at_end[..])
                .unwrap_or(&[]),
        ) {
            if let Some(n) = &c.netns_name {
                r.netns_names.entry(c.netns).or_insert_with(|| n.clone());
            }
        }
        // The series covers the whole capture, quiet seconds at its end included.
        let secs = (r.duration_s().ceil() as usize).clamp(r.per_second.len(), MAX_SECONDS);
        r.per_second.resize(secs, 0);
        r.timeline.grow(secs);
        r.timeline.lost_probes = lost_probes(&r.probes, r.header.started_wall_ns);
        r
    }

    /// Advice from what the capture recorded. Without a stored table
    /// snapshot (captures before format 2, or no table-full drop) there is
    /// no NOTRACK advice: `ctdrop check --occupancy` on the host names the
    /// flows to untrack. The module's kind and entry size are the capturing
    /// host's, unknown here.
    pub fn advice(&self) -> Vec<crate::advice::Advice> {
        let limits = self
            .header
            .conntrack_max
            .map(|max| crate::conntrack::stats::CtLimits {
                max,
                buckets: self.header.conntrack_buckets.unwrap_or(0),
            });
        let host = crate::advice::Host {
            module: crate::advice::ModuleKind::Unknown,
            entry_bytes: None,
        };
        // Per namespace, the fullest snapshot (as the live run keeps them).
        let mut snaps = BTreeMap::new();
        for o in &self.occupancy {
            let Some(ns) = o.netns else { continue };
            if snaps
                .get(&ns)
                .is_none_or(|old: &crate::conntrack::occupancy::Occupancy| o.entries >= old.entries)
            {
                snaps.insert(ns, o.clone());
            }
        }
        crate::advice::from_run(&self.tally, &snaps, limits, &host, |ns| {
            self.netns_names.get(&ns).cloned()
        })
    }

    pub fn trailer(&self) -> Option<&crate::capture::meta::Trailer> {
        self.end.trailer()
    }

    pub fn complete(&self) -> bool {
        self.trailer().is_some()
    }

    /// Capture length: the trailer's, else up to the last thing recorded.
    pub fn duration_s(&self) -> f64 {
        if let Some(t) = self.trailer() {
            return t.duration_s;
        }
        let last = self
            .last_checkpoint
            .map(|c| c.mono_ns)
            .unwrap_or(0)
            .max(self.last_drop_ts.unwrap_or(0));
        last.saturating_sub(self.header.started_mono_ns) as f64 / 1e9
    }

    pub fn ended_wall_ns(&self) -> u64 {
        match self.trailer() {
            Some(t) => t.ended_wall_ns,
            None => self.header.started_wall_ns + (self.duration_s() * 1e9) as u64,
        }
    }

    /// Drops per second over the whole capture.
    pub fn rate(&self, n: u64) -> f64 {
        let d = self.duration_s();
        if d > 0.0 {
            n as f64 / d
        } else {
            0.0
        }
    }

    /// Events lost: exact from the trailer, else as of the last checkpoint.
    pub fn events_lost(&self) -> Option<u64> {
        self.trailer()
            .map(|t| t.events_lost)
            .or(self.last_checkpoint.map(|c| c.events_lost))
    }

    /// None without a trailer: the counters at the end were never read.
    pub fn counter_checks(&self) -> Option<Vec<CounterCheck>> {
        let t = self.trailer()?;
        Some(
            t.kernel_counters
                .iter()
                .map(|k| CounterCheck {
                    netns: k.netns,
                    netns_name: k
                        .netns_name
                        .clone()
                        .or_else(|| self.netns_names.get(&k.netns).cloned()),
                    delta: CtCounters {
                        columns: k.delta.clone(),
                    },
                    table_full: self.tally.count_in(k.netns, Cause::ConntrackTableFull),
                    insert_failed: self.tally.count_in(k.netns, Cause::ConntrackInsertFailed),
                })
                .collect(),
        )
    }

    /// `name (inode)`, or the inode alone.
    pub fn netns_label(&self, ns: Option<u32>) -> String {
        match ns {
            Some(i) => match self.netns_names.get(&i) {
                Some(n) => format!("{n} ({i})"),
                None => i.to_string(),
            },
            None => "unknown".into(),
        }
    }

    pub fn ifname(&self, ns: Option<u32>, ifindex: u32) -> String {
        self.ifnames
            .get(&(ns, ifindex))
            .cloned()
            .unwrap_or_else(|| format!("#{ifindex}"))
    }

    /// The same families `live --metrics` serves, from this capture.
    pub fn metrics(&self) -> Metrics {
        let m = Metrics::new();
        for (&(ns, cause, proto), &n) in &self.by_ns_cause_proto {
            m.add_drops(
                cause,
                crate::output::metrics::netns_label(
                    ns,
                    ns.and_then(|i| self.netns_names.get(&i))
                        .map(String::as_str),
                ),
                proto,
                n,
            );
        }
        if let Some(l) = self.events_lost() {
            m.set_events_lost(l);
        }
        for (host, p) in &self.probes {
            m.probe_sent(host, p.sent);
            for (c, n) in &p.lost_by_cause {
                m.probe_lost(host, Some(c), *n);
            }
            if p.lost_unexplained > 0 {
                m.probe_lost(host, None, p.lost_unexplained);
            }
        }
        let end = self
            .trailer()
            .map(|t| &t.counters_at_end[..])
            .unwrap_or(&self.header.counters_at_start[..]);
        for c in end {
            let name = c
                .netns_name
                .clone()
                .or_else(|| self.netns_names.get(&c.netns).cloned());
            m.set_conntrack(
                &crate::output::metrics::netns_label(Some(c.netns), name.as_deref()),
                &c.ct(),
                self.header.conntrack_max,
            );
        }
        m
    }
}

pub fn load(path: &Path, each: impl FnMut(&Shown)) -> Result<Report> {
    let reader = CaptureReader::open(path)?;
    Ok(Report::build(path, reader, each))
}

/// Every lost probe of every host, in time order, from the recorded probe
/// lines (their `ts_ns` is the wall-clock send time).
fn lost_probes(
    probes: &BTreeMap<String, ProbeTally>,
    started_wall_ns: u64,
) -> Vec<timeline::LostProbe> {
    let mut out: Vec<timeline::LostProbe> = probes
        .iter()
        .flat_map(|(host, p)| {
            p.lost_probes.iter().map(move |l| timeline::LostProbe {
                at_s: l.ts_ns.saturating_sub(started_wall_ns) as f64 / 1e9,
                host: host.clone(),
                seq: l.seq,
                cause: l.cause.map(|c| c.as_str().to_string()),
            })
        })
        .collect();
    out.sort_by(|a, b| a.at_s.total_cmp(&b.at_s));
    out
}
