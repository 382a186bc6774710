//! The session's capture output: every drop and probe verdict into the
//! file, a checkpoint and a flush each second, the trailer at the end, and
//! a progress line when stderr is a terminal.

use std::{collections::BTreeMap, io::Write, time::Duration};

use super::{
    meta::{host_name, kernel_release, CaptureFilter, CounterDelta, Header, NsCounters, Trailer},
    record::Checkpoint,
    writer::CaptureWriter,
    FORMAT_VERSION,
};
use crate::{
    cause::Cause,
    model::ProbeVerdict,
    output::{ProbeShown, Progress, Shown, Sink},
    session::SessionInfo,
    summary::Summary,
};

/// How often pending records are written when the session flushes after
/// a batch; the once-a-second tick writes whatever is left regardless.
const FLUSH_AGE: Duration = Duration::from_millis(250);

/// What the capture command knows that the session does not.
pub struct CaptureMeta {
    pub command: Vec<String>,
    pub probes: Vec<String>,
    pub duration: Option<Duration>,
    pub headers: bool,
    pub max_flows: usize,
}

pub struct CaptureSink {
    w: CaptureWriter,
    meta: CaptureMeta,
    boot_offset: u64,
    start: BTreeMap<u32, NsCounters>,
    /// Counters as read at the last tick.
    latest: BTreeMap<u32, NsCounters>,
    /// Draw the progress line (stderr is a terminal).
    progress: bool,
    drew: bool,
}

impl CaptureSink {
    pub fn new(w: CaptureWriter, meta: CaptureMeta, progress: bool) -> Self {
        CaptureSink {
            w,
            meta,
            boot_offset: 0,
            start: BTreeMap::new(),
            latest: BTreeMap::new(),
            progress,
            drew: false,
        }
    }

    fn draw(&mut self, p: &Progress) {
        // Ticks land just after whole seconds: round, or 0.999 s reads as 0.
        let secs = (p.elapsed.as_millis() as u64 + 500) / 1000;
        let mut line = format!("capture {secs}s");
        if let Some(d) = p.duration {
            let total = (d.as_millis() as u64 + 500) / 1000;
            line += &format!(" of {total}s ({}s left)", total.saturating_sub(secs));
        }
        line += &format!("  {} drops", p.tally.total);
        let parts: Vec<String> = Cause::ALL
            .iter()
            .filter(|c| p.tally.count(**c) > 0)
            .map(|c| format!("{} {}", p.tally.count(*c), c))
            .collect();
        if !parts.is_empty() {
            line += &format!(" ({})", parts.join(", "));
        }
        line += &format!(
            "  {} events lost  {} {}",
            p.stats.lost,
            self.w.path().display(),
            human_bytes(self.w.bytes_written())
        );
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r\x1b[K{line}");
        let _ = err.flush();
        self.drew = true;
    }
}

pub fn human_bytes(n: u64) -> String {
    match n {
        n if n >= 10 << 20 => format!("{} MiB", n >> 20),
        n if n >= 10 << 10 => format!("{} KiB", n >> 10),
        n => format!("{n} B"),
    }
}

/// The header of a capture taken by this session, starting at `mono`
/// (CLOCK_MONOTONIC) with these counters.
pub fn header(
    info: &SessionInfo,
    meta: &CaptureMeta,
    mono: u64,
    counters_at_start: Vec<NsCounters>,
) -> Header {
    Header {
        format_version: FORMAT_VERSION,
        ctdrop_version: env!("CARGO_PKG_VERSION").to_string(),
        host: host_name(),
        kernel_release: kernel_release(),
        started_wall_ns: mono + info.boot_offset_ns,
        started_mono_ns: mono,
        boot_offset_ns: info.boot_offset_ns,
        mechanisms: info
            .mechanisms
            .iter()
            .map(|m| {
                (
                    m.signal.to_string(),
                    m.chosen
                        .clone()
                        .unwrap_or_else(|| format!("none ({})", m.note)),
                )
            })
            .collect(),
        drop_reasons: info
            .reasons
            .pairs()
            .map(|(v, n)| (v, n.to_string()))
            .collect(),
        conntrack_max: info.limits.map(|l| l.max),
        conntrack_buckets: info.limits.map(|l| l.buckets),
        counters_at_start,
        filter: CaptureFilter::from_config(info.filter),
        headers: meta.headers,
        duration_s: meta.duration.map(|d| d.as_secs_f64()),
        probes: meta.probes.clone(),
        command: meta.command.clone(),
        max_flows: Some(meta.max_flows),
    }
}

impl Sink for CaptureSink {
    fn start(&mut self, info: &SessionInfo) -> std::io::Result<()> {
        self.boot_offset = info.boot_offset_ns;
        self.start = info
            .counters_at_start
            .iter()
            .map(|(ns, c)| {
                (
                    *ns,
                    NsCounters {
                        netns: *ns,
                        netns_name: info.namespaces.display_name(*ns),
                        counters: c.columns.clone(),
                    },
                )
            })
            .collect();
        let h = header(
            info,
            &self.meta,
            crate::probe::mono_ns(),
            self.start.values().cloned().collect(),
        );
        self.w.write_header(&h)
    }

    fn drop_event(&mut self, s: &Shown) -> std::io::Result<()> {
        self.w
            .drop_event(s.ev, s.cause, s.location, s.netns_name, s.ifname)
    }

    fn probe(&mut self, p: &ProbeShown) -> std::io::Result<()> {
        self.w.probe(&ProbeVerdict::from_shown(p))
    }

    fn occupancy(&mut self, o: &crate::conntrack::occupancy::Occupancy) -> std::io::Result<()> {
        self.w.occupancy(o)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.w.flush_if_older(FLUSH_AGE)
    }

    fn wants_counters(&self) -> bool {
        true
    }

    fn tick(&mut self, p: &Progress) -> std::io::Result<()> {
        for (ns, (name, c)) in p.counters {
            self.latest.insert(
                *ns,
                NsCounters {
                    netns: *ns,
                    netns_name: name.clone(),
                    counters: c.columns.clone(),
                },
            );
        }
        let r = self
            .w
            .checkpoint(&Checkpoint {
                mono_ns: p.mono_ns,
                events_sent: p.stats.sent,
                events_lost: p.stats.lost,
                drops_seen: p.tally.total,
            })
            .and_then(|()| self.w.flush());
        if self.progress {
            self.draw(p);
        }
        r
    }

    fn summary(&mut self, s: &Summary) -> std::io::Result<()> {
        if self.drew {
            // The summary and the closing line take over the terminal.
            eprint!("\r\x1b[K");
            self.drew = false;
        }
        let mono = crate::probe::mono_ns();
        let mut at_end = self.start.clone();
        at_end.extend(self.latest.iter().map(|(k, v)| (*k, v.clone())));
        let mut kernel_counters = Vec::new();
        for c in s.checks {
            let start = self.start.get(&c.netns).map(|n| n.ct()).unwrap_or_default();
            let end = c
                .delta
                .columns
                .iter()
                .map(|(k, d)| {
                    (
                        k.clone(),
                        if k == "entries" { *d } else { start.get(k) + d },
                    )
                })
                .collect();
            at_end.insert(
                c.netns,
                NsCounters {
                    netns: c.netns,
                    netns_name: c.netns_name.clone(),
                    counters: end,
                },
            );
            kernel_counters.push(CounterDelta {
                netns: c.netns,
                netns_name: c.netns_name.clone(),
                delta: c.delta.columns.clone(),
            });
        }
        let t = Trailer {
            ended_wall_ns: mono + self.boot_offset,
            ended_mono_ns: mono,
            duration_s: s.elapsed.as_secs_f64(),
            events_sent: s.stats.sent,
            events_lost: s.stats.lost,
            decode_errors: s.decode_errors,
            drops_written: self.w.drops,
            probes_written: self.w.probes,
            kernel_counters,
            counters_at_end: at_end.into_values().collect(),
            watch: None,
        };
        self.w.finish(&t)
    }
}
