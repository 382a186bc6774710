//! The flight recorder: a session sink that keeps the last `--pre` of drops
//! (and probe verdicts) in memory, opens an incident on a trigger, and when
//! the incident is over (`--post` after its last conntrack drop) writes one
//! capture file holding the whole window, the table snapshot taken at the
//! trigger, and the kernel's counters at both ends of the window.
//!
//! Window edges fall on the session's once-a-second counter readings: the
//! file holds exactly the drops between two readings, so its records and
//! the kernel's `drop` increase cover the same span. Both edges are quiet
//! for the incident's namespace (its first conntrack drop opens the
//! incident; it closes after `--post` without one), which is what makes the
//! two counts equal.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    path::PathBuf,
    rc::Rc,
    sync::Arc,
    time::Duration,
};

use super::files;
use crate::{
    capture::{
        meta::{CounterDelta, Header, NsCounters, Trailer, WatchTrailer},
        sink::{header, CaptureMeta},
        CaptureWriter,
    },
    cause::Cause,
    conntrack::{
        netns::find_namespace,
        occupancy::{Occupancy, Snapshots},
        stats::CtCounters,
    },
    events::DropEvent,
    model::ProbeVerdict,
    output::{metrics::Metrics, ProbeShown, Progress, Shown, Sink},
    session::SessionInfo,
    summary::Summary,
};

pub struct Config {
    pub dir: PathBuf,
    pub pre: Duration,
    pub post: Duration,
    pub trigger_rate: Option<u64>,
    pub trigger_fill: Option<u8>,
    pub max_files: u64,
    pub max_bytes: u64,
    pub buffer_records: usize,
    pub meta: CaptureMeta,
}

/// A drop held in memory, with the names resolved when it happened.
struct Kept {
    ev: DropEvent,
    cause: Cause,
    location: Rc<str>,
    netns_name: Option<Rc<str>>,
    ifname: Option<Rc<str>>,
}

/// One of the session's once-a-second counter readings: a possible window edge.
struct Reading {
    mono_ns: u64,
    sent: u64,
    lost: u64,
    counters: BTreeMap<u32, NsCounters>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Subject {
    Netns(u32),
    /// SIGUSR1, numbered: a recording of every namespace.
    Signal(u64),
}

/// An incident being recorded.
struct Incident {
    subject: Subject,
    trigger: &'static str,
    label: String,
    netns_name: Option<String>,
    entries: Option<u64>,
    max: Option<u64>,
    triggered_mono: u64,
    start: Rc<Reading>,
    /// Newest conntrack drop that belongs to it (or the trigger itself).
    last_activity: u64,
    /// Namespaces whose snapshot was asked for and has not arrived.
    awaiting: Vec<u32>,
    snapshots: Vec<Occupancy>,
}

/// How long a closing incident waits for a snapshot still being taken.
const SNAPSHOT_WAIT: Duration = Duration::from_secs(5);
/// Namespaces snapshotted on SIGUSR1: the fullest tables.
const SIGNAL_SNAPSHOTS: usize = 3;

pub struct Recorder {
    cfg: Config,
    metrics: Arc<Metrics>,
    template: Option<Header>,
    boot_offset: u64,
    baselines: BTreeMap<u32, CtCounters>,
    kept: VecDeque<Kept>,
    probes: VecDeque<(u64, ProbeVerdict)>,
    /// Drops not kept (buffer at its cap), per second of the monotonic clock.
    not_kept: VecDeque<(u64, u64)>,
    readings: VecDeque<Rc<Reading>>,
    /// Where each namespace's last incident ended: the next one starts no
    /// earlier, so two captures never hold the same drop of a namespace.
    ended_at: HashMap<u32, Rc<Reading>>,
    open: Vec<Incident>,
    /// Recent conntrack-drop times per namespace (`--trigger-rate`).
    recent: HashMap<u32, VecDeque<u64>>,
    /// Namespaces whose fill trigger fired and has not yet gone below it.
    fill_fired: HashMap<u32, bool>,
    snaps: Snapshots,
    snap_errors_seen: usize,
    names: HashMap<Box<str>, Rc<str>>,
    signals: u64,
    disk_full: bool,
}

impl Recorder {
    pub fn new(cfg: Config, metrics: Arc<Metrics>) -> Recorder {
        Recorder {
            cfg,
            metrics,
            template: None,
            boot_offset: 0,
            baselines: BTreeMap::new(),
            kept: VecDeque::new(),
            probes: VecDeque::new(),
            not_kept: VecDeque::new(),
            readings: VecDeque::new(),
            ended_at: HashMap::new(),
            open: Vec::new(),
            recent: HashMap::new(),
            fill_fired: HashMap::new(),
            snaps: Snapshots::new(Duration::ZERO),
            snap_errors_seen: 0,
            names: HashMap::new(),
            signals: 0,
            disk_full: false,
        }
    }

    fn name(&mut self, s: &str) -> Rc<str> {
        if let Some(r) = self.names.get(s) {
            return r.clone();
        }
        let r: Rc<str> = Rc::from(s);
        self.names.insert(s.into(), r.clone());
        r
    }

    fn not_kept_at(&mut self, ts: u64) {
        let sec = ts / 1_000_000_000;
        match self.not_kept.back_mut() {
            Some((s, n)) if *s == sec => *n += 1,
            _ => self.not_kept.push_back((sec, 1)),
        }
        self.metrics.watch.buffer_not_kept.inc();
    }

    /// Earliest time an open incident still needs.
    fn needed_from(&self) -> Option<u64> {
        self.open.iter().map(|i| i.start.mono_ns).min()
    }

    fn keep(&mut self, s: &Shown) {
        if self.kept.len() >= self.cfg.buffer_records {
            // Make room by forgetting the oldest record unless an incident
            // being recorded needs it; then the new record is the one lost.
            let front_free = self
                .kept
                .front()
                .is_some_and(|k| self.needed_from().is_none_or(|m| k.ev.ts_ns <= m));
            if front_free {
                let k = self.kept.pop_front().unwrap();
                self.not_kept_at(k.ev.ts_ns);
            } else {
                self.not_kept_at(s.ev.ts_ns);
                return;
            }
        }
        let location = self.name(s.location);
        let netns_name = s.netns_name.map(|n| self.name(n));
        let ifname = s.ifname.map(|n| self.name(n));
        self.kept.push_back(Kept {
            ev: s.ev.clone(),
            cause: s.cause,
            location,
            netns_name,
            ifname,
        });
    }

    fn label(ns: u32, name: Option<&str>) -> String {
        crate::output::metrics::netns_label(Some(ns), name)
    }

    /// The window's first edge: the last reading at or before `at`, but not
    /// before where `ns`'s previous incident ended.
    fn start_reading(&self, at: u64, ns: Option<u32>) -> Rc<Reading> {
        let mut r = self
            .readings
            .iter()
            .rev()
            .find(|r| r.mono_ns <= at)
            .or(self.readings.front())
            .cloned()
            .expect("a reading from the start");
        if let Some(prev) = ns.and_then(|n| self.ended_at.get(&n)) {
            if prev.mono_ns > r.mono_ns {
                r = prev.clone();
            }
        }
        r
    }

    fn open_incident(
        &mut self,
        subject: Subject,
        trigger: &'static str,
        name: Option<String>,
        fill: Option<(u64, u64)>,
        now: u64,
    ) {
        let pre = self.cfg.pre.as_nanos() as u64;
        let (label, ns, wanted) = match subject {
            Subject::Netns(ns) => (Self::label(ns, name.as_deref()), Some(ns), vec![ns]),
            Subject::Signal(n) => {
                // The fullest tables at the last reading.
                let mut by_fill: Vec<(u64, u32)> = self
                    .readings
                    .back()
                    .map(|r| {
                        r.counters
                            .values()
                            .map(|c| (c.ct().entries(), c.netns))
                            .filter(|(e, _)| *e > 0)
                            .collect()
                    })
                    .unwrap_or_default();
                by_fill.sort_unstable_by(|a, b| b.cmp(a));
                (
                    format!("signal{n}"),
                    None,
                    by_fill
                        .into_iter()
                        .take(SIGNAL_SNAPSHOTS)
                        .map(|(_, ns)| ns)
                        .collect(),
                )
            }
        };
        let start = self.start_reading(now.saturating_sub(pre), ns);
        let mut awaiting = Vec::new();
        for ns in wanted {
            if self.snaps.table_full(ns, || find_namespace(ns)) {
                awaiting.push(ns);
            }
        }
        let what = match (subject, fill) {
            (Subject::Signal(_), _) => format!(
                "every namespace, table snapshots of {} namespace(s)",
                awaiting.len()
            ),
            (_, Some((e, m))) if m > 0 => format!(
                "netns {label}, table {e}/{m} ({:.0}%)",
                e as f64 * 100.0 / m as f64
            ),
            _ => format!("netns {label}, table fill unknown"),
        };
        log::info!(
            "trigger {trigger}: {what}; recording from {:.1} s before, until {} s after the last conntrack drop",
            now.saturating_sub(start.mono_ns) as f64 / 1e9,
            self.cfg.post.as_secs_f64()
        );
        self.metrics.watch_trigger(trigger, &label);
        self.open.push(Incident {
            subject,
            trigger,
            label,
            netns_name: name,
            entries: fill.map(|f| f.0),
            max: fill.map(|f| f.1),
            triggered_mono: now,
            start,
            last_activity: now,
            awaiting,
            snapshots: Vec::new(),
        });
    }

    /// A conntrack_table_full / conntrack_insert_failed drop.
    fn conntrack_drop(&mut self, s: &Shown, ns: u32) {
        let ts = s.ev.ts_ns;
        let mut own = false;
        for i in self.open.iter_mut() {
            if matches!(i.subject, Subject::Signal(_)) || i.subject == Subject::Netns(ns) {
                i.last_activity = i.last_activity.max(ts);
                own |= i.subject == Subject::Netns(ns);
            }
        }
        if own {
            return;
        }
        let trigger = match self.cfg.trigger_rate {
            None => "first_drop",
            Some(n) => {
                let q = self.recent.entry(ns).or_default();
                q.push_back(ts);
                while q.front().is_some_and(|t| *t + 1_000_000_000 <= ts) || q.len() as u64 > n {
                    q.pop_front();
                }
                if (q.len() as u64) < n {
                    return;
                }
                q.clear();
                "drop_rate"
            }
        };
        // A table-full drop means the table was at its max when the kernel
        // refused the entry (a reading taken a moment before may be lower).
        let fill = match (s.cause, self.fill_of(ns)) {
            (Cause::ConntrackTableFull, Some((_, max))) => Some((max, max)),
            (_, f) => f,
        };
        self.open_incident(
            Subject::Netns(ns),
            trigger,
            s.netns_name.map(str::to_string),
            fill,
            ts,
        );
    }

    /// The namespace's table count at the last reading, and the limit now.
    fn fill_of(&self, ns: u32) -> Option<(u64, u64)> {
        let max = crate::conntrack::stats::CtLimits::read()?.max;
        let entries = self
            .readings
            .back()
            .and_then(|r| r.counters.get(&ns))
            .map(|c| c.ct().entries())
            .unwrap_or(0);
        Some((entries, max))
    }

    fn check_fill(&mut self, pct: u8, now: u64) {
        let Some(max) = crate::conntrack::stats::CtLimits::read()
            .map(|l| l.max)
            .filter(|m| *m > 0)
        else {
            return;
        };
        let Some(r) = self.readings.back().cloned() else {
            return;
        };
        for (ns, c) in &r.counters {
            let entries = c.ct().entries();
            let over = entries * 100 >= max * pct as u64;
            let fired = self.fill_fired.get(ns).copied().unwrap_or(false);
            if !over {
                self.fill_fired.insert(*ns, false);
                continue;
            }
            if fired {
                continue;
            }
            // Over: fire once, unless an incident already records this namespace.
            self.fill_fired.insert(*ns, true);
            if !self.open.iter().any(|i| i.subject == Subject::Netns(*ns)) {
                self.open_incident(
                    Subject::Netns(*ns),
                    "fill",
                    c.netns_name.clone(),
                    Some((entries, max)),
                    now,
                );
            }
        }
    }

    fn poll_snapshots(&mut self, fresh: Vec<Occupancy>) {
        for o in fresh {
            let Some(ns) = o.netns else { continue };
            if let Some(i) = self.open.iter_mut().find(|i| i.awaiting.contains(&ns)) {
                i.awaiting.retain(|n| *n != ns);
                i.snapshots.push(o);
            }
        }
        for e in &self.snaps.errors[self.snap_errors_seen..] {
            log::error!("table snapshot failed: {e}");
        }
        self.snap_errors_seen = self.snaps.errors.len();
    }

    /// Forgets what no window can need any more.
    fn prune(&mut self, now: u64) {
        let horizon = now.saturating_sub(self.cfg.pre.as_nanos() as u64 + 2_000_000_000);
        let cutoff = self.needed_from().map_or(horizon, |m| m.min(horizon));
        while self.kept.front().is_some_and(|k| k.ev.ts_ns < cutoff) {
            self.kept.pop_front();
        }
        while self.probes.front().is_some_and(|p| p.0 < cutoff) {
            self.probes.pop_front();
        }
        while self
            .not_kept
            .front()
            .is_some_and(|b| (b.0 + 1) * 1_000_000_000 < cutoff)
        {
            self.not_kept.pop_front();
        }
        // Keep the newest reading at or before the horizon: it is the next
        // window's first edge.
        while self.readings.len() >= 2 && self.readings[1].mono_ns <= horizon {
            self.readings.pop_front();
        }
        self.ended_at.retain(|_, r| r.mono_ns >= horizon);
        self.metrics
            .watch
            .buffered_records
            .set(self.kept.len() as i64);
    }

    /// Writes the incident's capture; every failure is logged, none stops
    /// the session (tracing and metrics go on).
    fn close(&mut self, inc: Incident, end: Rc<Reading>, cut_by_shutdown: bool) {
        if let Subject::Netns(ns) = inc.subject {
            self.ended_at.insert(ns, end.clone());
        }
        self.metrics.watch_recorded(&inc.label);
        let (from, to) = (inc.start.mono_ns, end.mono_ns);
        let in_window = |ts: u64| ts > from && ts <= to;
        let drops = self.kept.iter().filter(|k| in_window(k.ev.ts_ns)).count() as u64;
        let need = 4096 + drops * 48 + inc.snapshots.len() as u64 * 16384;
        if let Err(why) = files::room(&self.cfg.dir, need) {
            if !self.disk_full {
                self.metrics.watch.disk_full.set(1);
            }
            self.disk_full = true;
            self.metrics.watch_not_written("disk_full");
            log::error!(
                "capture of {} not written to {}: {why}; tracing and metrics go on",
                inc.label,
                self.cfg.dir.display()
            );
            return;
        }
        let wall = inc.triggered_mono + self.boot_offset;
        let path = files::free_path(
            &self.cfg.dir,
            &files::file_name(wall, &inc.label, inc.trigger),
        );
        match self.write(&inc, &end, &path, cut_by_shutdown) {
            Ok((drops, bytes, kernel)) => {
                self.disk_full = false;
                self.metrics.watch.disk_full.set(0);
                self.metrics.watch.captures_written.inc();
                self.metrics.watch.capture_bytes.inc_by(bytes);
                self.metrics
                    .watch
                    .last_capture_time
                    .set((crate::probe::mono_ns() + self.boot_offset) as i64 / 1_000_000_000);
                let kernel = kernel
                    .map(|k| format!(", kernel drop +{k} in {}", inc.label))
                    .unwrap_or_default();
                log::info!(
                    "capture written: {} ({drops} drops over {:.1} s{kernel}, {} table snapshot(s), {bytes} bytes)",
                    path.display(),
                    (to - from) as f64 / 1e9,
                    inc.snapshots.len()
                );
            }
            Err(e) => {
                let full = e.raw_os_error() == Some(libc::ENOSPC);
                if full {
                    self.disk_full = true;
                    self.metrics.watch.disk_full.set(1);
                }
                self.metrics
                    .watch_not_written(if full { "disk_full" } else { "write_error" });
                log::error!(
                    "capture of {} to {}: {e}; tracing and metrics go on",
                    inc.label,
                    path.display()
                );
            }
        }
        for (p, len, r) in
            files::rotate(&self.cfg.dir, self.cfg.max_files, self.cfg.max_bytes, &path)
        {
            match r {
                Ok(()) => {
                    self.metrics.watch.captures_deleted.inc();
                    log::info!(
                        "deleted old capture {} ({len} bytes): over --max-files {} or --max-bytes {}",
                        p.display(),
                        self.cfg.max_files,
                        self.cfg.max_bytes
                    );
                }
                Err(e) => log::error!("cannot delete old capture {}: {e}", p.display()),
            }
        }
    }

    /// The capture file itself: drops written, bytes, and the kernel's
    /// `drop` increase in the incident's namespace.
    fn write(
        &self,
        inc: &Incident,
        end: &Reading,
        path: &std::path::Path,
        cut: bool,
    ) -> std::io::Result<(u64, u64, Option<u64>)> {
        let (from, to) = (inc.start.mono_ns, end.mono_ns);
        let in_window = |ts: u64| ts > from && ts <= to;
        let mut w = CaptureWriter::create(path, false)
            .map_err(|e| std::io::Error::other(format!("{e:#}")))?;
        let mut h = self
            .template
            .clone()
            .ok_or_else(|| std::io::Error::other("no session header"))?;
        h.started_mono_ns = from;
        h.started_wall_ns = from + self.boot_offset;
        h.counters_at_start = inc.start.counters.values().cloned().collect();
        let r = (|| {
            w.write_header(&h)?;
            for o in &inc.snapshots {
                w.occupancy(o)?;
            }
            let mut conntrack: BTreeMap<u32, u64> = BTreeMap::new();
            for k in self.kept.iter().filter(|k| in_window(k.ev.ts_ns)) {
                w.drop_event(
                    &k.ev,
                    k.cause,
                    &k.location,
                    k.netns_name.as_deref(),
                    k.ifname.as_deref(),
                )?;
                if let (Some(ns), Cause::ConntrackTableFull | Cause::ConntrackInsertFailed) =
                    (k.ev.netns, k.cause)
                {
                    *conntrack.entry(ns).or_default() += 1;
                }
            }
            for (_, p) in self.probes.iter().filter(|p| in_window(p.0)) {
                w.probe(p)?;
            }
            let mut kernel_counters = Vec::new();
            for (ns, e) in &end.counters {
                let Some(s) = inc.start.counters.get(ns) else {
                    continue;
                };
                let delta = e.ct().delta(&s.ct());
                if delta.get("drop") > 0 || conntrack.contains_key(ns) {
                    kernel_counters.push(CounterDelta {
                        netns: *ns,
                        netns_name: e.netns_name.clone(),
                        delta: delta.columns,
                    });
                }
            }
            let kernel = match inc.subject {
                Subject::Netns(ns) => kernel_counters
                    .iter()
                    .find(|k| k.netns == ns)
                    .map(|k| k.delta.get("drop").copied().unwrap_or(0)),
                Subject::Signal(_) => None,
            };
            let sec = |t: u64| t / 1_000_000_000;
            let not_kept = self
                .not_kept
                .iter()
                .filter(|(s, _)| *s >= sec(from) && *s <= sec(to))
                .map(|(_, n)| n)
                .sum();
            let t = Trailer {
                ended_wall_ns: to + self.boot_offset,
                ended_mono_ns: to,
                duration_s: (to - from) as f64 / 1e9,
                events_sent: end.sent.saturating_sub(inc.start.sent),
                events_lost: end.lost.saturating_sub(inc.start.lost),
                decode_errors: 0,
                drops_written: w.drops,
                probes_written: w.probes,
                kernel_counters,
                counters_at_end: end.counters.values().cloned().collect(),
                watch: Some(Box::new(WatchTrailer {
                    trigger: inc.trigger.to_string(),
                    netns: match inc.subject {
                        Subject::Netns(ns) => Some(ns),
                        Subject::Signal(_) => None,
                    },
                    netns_name: inc.netns_name.clone(),
                    entries: inc.entries,
                    max: inc.max,
                    triggered_wall_ns: inc.triggered_mono + self.boot_offset,
                    pre_s: self.cfg.pre.as_secs_f64(),
                    post_s: self.cfg.post.as_secs_f64(),
                    buffer_cap: self.cfg.buffer_records,
                    drops_not_kept: not_kept,
                    cut_by_shutdown: cut,
                })),
            };
            w.finish(&t)?;
            Ok((w.drops, w.bytes_written(), kernel))
        })();
        r
    }

    fn reading(p: &Progress) -> Reading {
        Reading {
            mono_ns: p.mono_ns,
            sent: p.stats.sent,
            lost: p.stats.lost,
            counters: p
                .counters
                .iter()
                .map(|(ns, (name, c))| {
                    (
                        *ns,
                        NsCounters {
                            netns: *ns,
                            netns_name: name.clone(),
                            counters: c.columns.clone(),
                        },
                    )
                })
                .collect(),
        }
    }
}

impl Sink for Recorder {
    fn start(&mut self, info: &SessionInfo) -> std::io::Result<()> {
        self.boot_offset = info.boot_offset_ns;
        self.baselines = info.counters_at_start.clone();
        let names = crate::conntrack::netns::named_namespaces();
        let counters: BTreeMap<u32, NsCounters> = info
            .counters_at_start
            .iter()
            .map(|(ns, c)| {
                (
                    *ns,
                    NsCounters {
                        netns: *ns,
                        netns_name: names.get(ns).map(|n| n.0.clone()),
                        counters: c.columns.clone(),
                    },
                )
            })
            .collect();
        let mono = crate::probe::mono_ns();
        self.template = Some(header(info, &self.cfg.meta, mono, Vec::new()));
        self.readings.push_back(Rc::new(Reading {
            mono_ns: mono,
            sent: 0,
            lost: 0,
            counters,
        }));
        Ok(())
    }

    fn drop_event(&mut self, s: &Shown) -> std::io::Result<()> {
        self.keep(s);
        if let (Cause::ConntrackTableFull | Cause::ConntrackInsertFailed, Some(ns)) =
            (s.cause, s.ev.netns)
        {
            self.conntrack_drop(s, ns);
        }
        Ok(())
    }

    fn probe(&mut self, p: &ProbeShown) -> std::io::Result<()> {
        if self.probes.len() >= self.cfg.buffer_records {
            self.probes.pop_front();
        }
        self.probes.push_back((
            p.wall_ns.saturating_sub(self.boot_offset),
            ProbeVerdict::from_shown(p),
        ));
        Ok(())
    }

    fn user_signal(&mut self) {
        self.signals += 1;
        let fill = None;
        self.open_incident(
            Subject::Signal(self.signals),
            "signal",
            None,
            fill,
            crate::probe::mono_ns(),
        );
    }

    fn wants_counters(&self) -> bool {
        true
    }

    /// Never an error: an error would stop the session, and the recorder
    /// must not stop tracing (its failures are logged and counted).
    fn tick(&mut self, p: &Progress) -> std::io::Result<()> {
        let now = p.mono_ns;
        self.readings.push_back(Rc::new(Self::reading(p)));
        if let Some(pct) = self.cfg.trigger_fill {
            self.check_fill(pct, now);
        }
        let fresh = self.snaps.poll();
        self.poll_snapshots(fresh);
        let post = self.cfg.post.as_nanos() as u64;
        let wait = SNAPSHOT_WAIT.as_nanos() as u64;
        let end = self.readings.back().cloned().unwrap();
        let (done, still): (Vec<Incident>, Vec<Incident>) =
            std::mem::take(&mut self.open).into_iter().partition(|i| {
                now >= i.last_activity + post
                    && (i.awaiting.is_empty() || now >= i.triggered_mono + wait)
            });
        self.open = still;
        for inc in done {
            self.close(inc, end.clone(), false);
        }
        self.prune(now);
        Ok(())
    }

    fn summary(&mut self, s: &Summary) -> std::io::Result<()> {
        if self.open.is_empty() {
            return Ok(());
        }
        let fresh = self.snaps.finish(SNAPSHOT_WAIT);
        self.poll_snapshots(fresh);
        // The end edge: tracing has stopped, so the kernel counters read
        // now (the baseline plus the session's exact increase where it has
        // one) cover every drop delivered.
        let mut end = match self.readings.back() {
            Some(r) => Reading {
                mono_ns: crate::probe::mono_ns(),
                sent: s.stats.sent,
                lost: s.stats.lost,
                counters: r.counters.clone(),
            },
            None => return Ok(()),
        };
        for c in s.checks {
            let Some(base) = self.baselines.get(&c.netns) else {
                continue;
            };
            let cols = c
                .delta
                .columns
                .iter()
                .map(|(k, d)| (k.clone(), if k == "entries" { *d } else { base.get(k) + d }))
                .collect();
            let name = end
                .counters
                .get(&c.netns)
                .and_then(|n| n.netns_name.clone())
                .or(c.netns_name.clone());
            end.counters.insert(
                c.netns,
                NsCounters {
                    netns: c.netns,
                    netns_name: name,
                    counters: cols,
                },
            );
        }
        let end = Rc::new(end);
        for inc in std::mem::take(&mut self.open) {
            self.close(inc, end.clone(), true);
        }
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
