//! What `ctdrop top` shows, kept apart from the terminal so it can be
//! tested: drops per second by cause (per namespace, with a short
//! history), each namespace's table fill, the ports drops turn up on,
//! probe status, and the operator's view choices (sort, filter, pause).

use std::collections::{BTreeMap, HashMap, VecDeque};

use crate::{cause::Cause, flows::cause_index, probe::matcher::Status};

/// (namespace, L4 protocol, destination port) of a port turning up in drops.
pub type PortKey = (Option<u32>, u8, u16);

/// Seconds of history kept for the sparklines.
pub const HISTORY: usize = 60;
/// Distinct (namespace, proto, port) keys counted; drops beyond land in
/// `ports_untracked` (a flood to every port must not grow memory).
pub const MAX_PORTS: usize = 4096;

const NC: usize = Cause::ALL.len();
type PerCause = [u64; NC];

/// How the namespace list is ordered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SortBy {
    Rate,
    Fill,
    Name,
}

impl SortBy {
    pub fn next(self) -> SortBy {
        match self {
            SortBy::Rate => SortBy::Fill,
            SortBy::Fill => SortBy::Name,
            SortBy::Name => SortBy::Rate,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SortBy::Rate => "drops/s",
            SortBy::Fill => "fill",
            SortBy::Name => "name",
        }
    }
}

/// A key the operator pressed, already decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Key {
    Quit,
    Sort,
    /// Show the next namespace only (after the last: all again).
    NextNamespace,
    /// Show every namespace again.
    AllNamespaces,
    Pause,
}

#[derive(Clone, Debug, Default)]
struct NsData {
    name: Option<String>,
    /// Table entries now (from the namespace's stat file), when read.
    entries: Option<u64>,
    total: PerCause,
    current: PerCause,
    /// Completed seconds, oldest first.
    history: VecDeque<PerCause>,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct PortStat {
    pub total: u64,
    current: u64,
    pub last_second: u64,
    pub cause: Option<Cause>,
}

#[derive(Clone, Debug, Default)]
pub struct ProbeRow {
    pub sent: u64,
    pub lost: u64,
    /// "ok 0.2 ms", "down conntrack_table_full in ns X", ...
    pub last: String,
    pub last_ok: bool,
}

/// One namespace as listed.
#[derive(Clone, Debug, PartialEq)]
pub struct NsRow {
    pub netns: Option<u32>,
    pub label: String,
    pub entries: Option<u64>,
    pub max: Option<u64>,
    /// Drops in the last completed second.
    pub rate: u64,
    pub total: u64,
    pub main_cause: Option<Cause>,
}

impl NsRow {
    pub fn fill(&self) -> Option<f64> {
        match (self.entries, self.max) {
            (Some(e), Some(m)) if m > 0 => Some(e as f64 / m as f64),
            _ => None,
        }
    }
}

pub struct TopState {
    ns: BTreeMap<Option<u32>, NsData>,
    /// Seconds completed so far (history length before trimming).
    seconds: u64,
    pub max: Option<u64>,
    ports: HashMap<PortKey, PortStat>,
    pub ports_untracked: u64,
    pub probes: BTreeMap<String, ProbeRow>,
    pub events_lost: u64,
    pub events_sent: u64,
    pub elapsed_s: f64,
    pub sort: SortBy,
    /// Some(ns): only this namespace's drops, flows and ports.
    pub filter: Option<Option<u32>>,
    pub paused: bool,
    pub quit: bool,
    /// Last notes for the operator (ctdrop's own warnings, snapshots).
    pub messages: VecDeque<String>,
}

impl Default for TopState {
    fn default() -> Self {
        TopState {
            ns: BTreeMap::new(),
            seconds: 0,
            max: None,
            ports: HashMap::new(),
            ports_untracked: 0,
            probes: BTreeMap::new(),
            events_lost: 0,
            events_sent: 0,
            elapsed_s: 0.0,
            sort: SortBy::Rate,
            filter: None,
            paused: false,
            quit: false,
            messages: VecDeque::new(),
        }
    }
}

impl TopState {
    pub fn drop_seen(
        &mut self,
        netns: Option<u32>,
        name: Option<&str>,
        cause: Cause,
        port: Option<(u8, u16)>,
    ) {
        let ci = cause_index(cause);
        let d = self.ns.entry(netns).or_default();
        if d.name.is_none() {
            d.name = name.map(str::to_string);
        }
        d.total[ci] += 1;
        d.current[ci] += 1;
        if let Some((proto, port)) = port {
            let len = self.ports.len();
            match self.ports.get_mut(&(netns, proto, port)) {
                Some(p) => {
                    p.total += 1;
                    p.current += 1;
                    p.cause = Some(cause);
                }
                None if len >= MAX_PORTS => self.ports_untracked += 1,
                None => {
                    self.ports.insert(
                        (netns, proto, port),
                        PortStat {
                            total: 1,
                            current: 1,
                            last_second: 0,
                            cause: Some(cause),
                        },
                    );
                }
            }
        }
    }

    /// A namespace's table count now (from its stat file).
    pub fn entries(&mut self, netns: u32, name: Option<&str>, entries: u64) {
        let d = self.ns.entry(Some(netns)).or_default();
        d.entries = Some(entries);
        if d.name.is_none() {
            d.name = name.map(str::to_string);
        }
    }

    /// Closes the current second: its counts become the newest history column.
    pub fn roll(&mut self) {
        self.seconds += 1;
        for d in self.ns.values_mut() {
            d.history.push_back(std::mem::take(&mut d.current));
            while d.history.len() > HISTORY {
                d.history.pop_front();
            }
        }
        for p in self.ports.values_mut() {
            p.last_second = std::mem::take(&mut p.current);
        }
    }

    pub fn probe(&mut self, label: &str, sent: u64, lost: u64, status: &Status) {
        let row = self.probes.entry(label.to_string()).or_default();
        row.sent = sent;
        row.lost = lost;
        (row.last, row.last_ok) = match status {
            Status::Ok { rtt_ns } => (format!("ok {:.1} ms", *rtt_ns as f64 / 1e6), true),
            Status::Late { rtt_ns } => (format!("late {:.0} ms", *rtt_ns as f64 / 1e6), false),
            Status::Lost { drop: Some(d) } => {
                let mut s = format!("down: {}", d.cause.as_str());
                if let Some(n) = &d.netns_name {
                    s += &format!(" in {n}");
                }
                if let (Some(c), Some(m)) = (d.ct_count, d.ct_max) {
                    s += &format!(", table {c}/{m}");
                }
                (s, false)
            }
            Status::Lost { drop: None } => ("down: no drop seen on this host".into(), false),
        };
    }

    pub fn note(&mut self, line: String) {
        self.messages.push_back(line);
        while self.messages.len() > 3 {
            self.messages.pop_front();
        }
    }

    pub fn key(&mut self, k: Key) {
        match k {
            Key::Quit => self.quit = true,
            Key::Sort => self.sort = self.sort.next(),
            Key::Pause => self.paused = !self.paused,
            Key::AllNamespaces => self.filter = None,
            Key::NextNamespace => {
                let with_drops: Vec<Option<u32>> = self
                    .ns
                    .iter()
                    .filter(|(_, d)| d.total.iter().any(|n| *n > 0))
                    .map(|(k, _)| *k)
                    .collect();
                self.filter = match self.filter {
                    None => with_drops.first().copied(),
                    Some(cur) => with_drops.iter().find(|k| **k > cur).copied(),
                };
            }
        }
    }

    fn shown(&self, ns: Option<u32>) -> bool {
        self.filter.is_none_or(|f| f == ns)
    }

    pub fn label(&self, ns: Option<u32>) -> String {
        match ns {
            Some(i) => match self.ns.get(&ns).and_then(|d| d.name.as_deref()) {
                Some(n) => format!("{n} ({i})"),
                None => i.to_string(),
            },
            None => "unknown".into(),
        }
    }

    /// Namespaces worth a row (a table in use or drops seen), in the chosen order.
    pub fn rows(&self) -> Vec<NsRow> {
        let mut v: Vec<NsRow> = self
            .ns
            .iter()
            .filter(|(k, d)| {
                self.shown(**k) && (d.entries.unwrap_or(0) > 0 || d.total.iter().any(|n| *n > 0))
            })
            .map(|(k, d)| {
                let total: u64 = d.total.iter().sum();
                let main = d
                    .total
                    .iter()
                    .enumerate()
                    .filter(|(_, n)| **n > 0)
                    .max_by_key(|(_, n)| **n)
                    .map(|(i, _)| Cause::ALL[i]);
                NsRow {
                    netns: *k,
                    label: self.label(*k),
                    entries: d.entries,
                    max: self.max,
                    rate: d.history.back().map(|c| c.iter().sum()).unwrap_or(0),
                    total,
                    main_cause: main,
                }
            })
            .collect();
        match self.sort {
            SortBy::Rate => v.sort_by(|a, b| {
                b.rate
                    .cmp(&a.rate)
                    .then(b.total.cmp(&a.total))
                    .then(a.label.cmp(&b.label))
            }),
            SortBy::Fill => v.sort_by(|a, b| {
                b.fill()
                    .unwrap_or(0.0)
                    .total_cmp(&a.fill().unwrap_or(0.0))
                    .then(a.label.cmp(&b.label))
            }),
            SortBy::Name => v.sort_by(|a, b| a.label.cmp(&b.label)),
        }
        v
    }

    /// Per cause seen (in the shown namespaces): drops in the last
    /// second, total, and the history (oldest first, HISTORY long).
    pub fn causes(&self) -> Vec<(Cause, u64, u64, Vec<u64>)> {
        let mut hist = vec![[0u64; NC]; HISTORY];
        let mut total = [0u64; NC];
        for (k, d) in &self.ns {
            if !self.shown(*k) {
                continue;
            }
            let pad = HISTORY - d.history.len();
            for (i, c) in d.history.iter().enumerate() {
                for (j, n) in c.iter().enumerate() {
                    hist[pad + i][j] += n;
                }
            }
            for (j, n) in d.total.iter().enumerate() {
                total[j] += n;
            }
        }
        Cause::ALL
            .iter()
            .enumerate()
            .filter(|(j, _)| total[*j] > 0)
            .map(|(j, c)| {
                let series: Vec<u64> = hist.iter().map(|h| h[j]).collect();
                (*c, *series.last().unwrap_or(&0), total[j], series)
            })
            .collect()
    }

    /// Ports drops turn up on (in the shown namespaces), busiest first.
    pub fn top_ports(&self, n: usize) -> Vec<(PortKey, PortStat)> {
        let mut v: Vec<_> = self
            .ports
            .iter()
            .filter(|((ns, _, _), _)| self.shown(*ns))
            .map(|(k, s)| (*k, *s))
            .collect();
        v.sort_by(|a, b| {
            b.1.last_second
                .cmp(&a.1.last_second)
                .then(b.1.total.cmp(&a.1.total))
                .then(a.0.cmp(&b.0))
        });
        v.truncate(n);
        v
    }

    pub fn filter_shows(&self, ns: Option<u32>) -> bool {
        self.shown(ns)
    }

    pub fn seconds(&self) -> u64 {
        self.seconds
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full(s: &mut TopState, ns: u32, n: u64, port: u16) {
        for _ in 0..n {
            s.drop_seen(
                Some(ns),
                Some("rx"),
                Cause::ConntrackTableFull,
                Some((17, port)),
            );
        }
    }

    #[test]
    fn rates_are_last_completed_second_and_history_is_bounded() {
        let mut s = TopState {
            max: Some(64),
            ..Default::default()
        };
        s.entries(7, Some("rx"), 64);
        full(&mut s, 7, 5, 5353);
        assert_eq!(s.rows()[0].rate, 0, "the second is not over yet");
        s.roll();
        full(&mut s, 7, 2, 5353);
        let r = &s.rows()[0];
        assert_eq!(
            (r.rate, r.total, r.entries, r.max),
            (5, 7, Some(64), Some(64))
        );
        assert_eq!(r.label, "rx (7)");
        assert_eq!(r.fill(), Some(1.0));
        let c = s.causes();
        assert_eq!(c.len(), 1);
        assert_eq!((c[0].0, c[0].1, c[0].2), (Cause::ConntrackTableFull, 5, 7));
        assert_eq!(c[0].3.len(), HISTORY);
        for _ in 0..100 {
            s.roll();
        }
        assert_eq!(s.causes()[0].3.len(), HISTORY);
        assert_eq!(s.causes()[0].1, 0);
    }

    #[test]
    fn filter_cycles_through_namespaces_with_drops_then_back_to_all() {
        let mut s = TopState::default();
        full(&mut s, 3, 1, 53);
        full(&mut s, 9, 4, 80);
        s.entries(5, None, 10); // a table in use, no drops: listed, not a filter stop
        assert_eq!(s.rows().len(), 3);
        s.key(Key::NextNamespace);
        assert_eq!(s.filter, Some(Some(3)));
        assert_eq!(s.rows().len(), 1);
        assert_eq!(s.causes()[0].2, 1);
        assert_eq!(s.top_ports(5).len(), 1);
        s.key(Key::NextNamespace);
        assert_eq!(s.filter, Some(Some(9)));
        assert_eq!(s.causes()[0].2, 4);
        s.key(Key::NextNamespace);
        assert_eq!(s.filter, None);
        s.key(Key::NextNamespace);
        s.key(Key::AllNamespaces);
        assert_eq!(s.filter, None);
    }

    #[test]
    fn sort_orders_and_keys() {
        let mut s = TopState {
            max: Some(100),
            ..Default::default()
        };
        s.entries(1, Some("b"), 90);
        s.entries(2, Some("a"), 10);
        full(&mut s, 2, 3, 1);
        s.roll();
        let names = |s: &TopState| s.rows().iter().map(|r| r.label.clone()).collect::<Vec<_>>();
        assert_eq!(names(&s), ["a (2)", "b (1)"]);
        s.key(Key::Sort);
        assert_eq!(s.sort, SortBy::Fill);
        assert_eq!(names(&s), ["b (1)", "a (2)"]);
        s.key(Key::Sort);
        assert_eq!(names(&s), ["a (2)", "b (1)"]);
        s.key(Key::Pause);
        assert!(s.paused);
        s.key(Key::Quit);
        assert!(s.quit);
    }

    #[test]
    fn ports_are_bounded() {
        let mut s = TopState::default();
        for p in 0..(MAX_PORTS as u32 + 10) {
            s.drop_seen(
                Some(1),
                None,
                Cause::ConntrackTableFull,
                Some((17, p as u16)),
            );
        }
        assert_eq!(s.ports_untracked, 10);
        s.roll();
        assert_eq!(s.top_ports(3).len(), 3);
    }
}
