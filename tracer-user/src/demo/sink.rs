//! What the demo shows while the tracer runs: one short line per ping, like
//! the incident's ping loop, each `down` explained; the flood's own drops
//! as a count every few seconds (hundreds a second would bury the pings).
//! Everything is also recorded for the before/after comparison.

use std::{
    collections::HashSet,
    io::Write,
    sync::{mpsc, Arc, Mutex},
};

use crate::{
    cause::Cause,
    output::{fold::Folder, ProbeShown, Shown, Sink},
    probe::Status,
    session::SessionInfo,
};

#[derive(Clone, Copy, Debug)]
pub struct PingRecord {
    /// Unix ns of the send.
    pub sent_ns: u64,
    pub lost: bool,
    pub explained: bool,
}

#[derive(Default)]
pub struct Log {
    pub pings: Vec<PingRecord>,
    /// Unix ns of each conntrack_table_full drop in the server's namespace.
    pub table_full_ns: Vec<u64>,
    /// Distinct flows turned away: each wanted one more entry.
    pub flows_turned_away: HashSet<(std::net::IpAddr, u16, u16)>,
    /// Drops elsewhere or for other causes (other tests may run meanwhile).
    pub other_drops: u64,
    /// Flood drops not yet summed up on screen (live's folding, all folded).
    pub flood: Folder,
}

pub struct DemoSink {
    pub log: Arc<Mutex<Log>>,
    server_netns: u32,
    attached: Option<mpsc::Sender<()>>,
    last_report_ns: u64,
}

/// Live's fold line as the demo shows it: the ping lines carry the time, and
/// the story keeps to 80 columns, so without the leading clock.
pub fn fold_line(live: &str) -> String {
    format!("  {}", live.split_once(' ').map_or(live, |(_, rest)| rest))
}

/// How often the flood's drops are summed up on screen.
const REPORT_EVERY_NS: u64 = 2_000_000_000;

impl DemoSink {
    pub fn new(log: Arc<Mutex<Log>>, server_netns: u32, attached: mpsc::Sender<()>) -> Self {
        DemoSink {
            log,
            server_netns,
            attached: Some(attached),
            last_report_ns: 0,
        }
    }
}

/// `lost/sent  hh:mm:ss  ok|down  why`, at most 80 columns.
pub fn ping_line(p: &ProbeShown) -> String {
    let head = format!(
        "  {:>3}/{:<3} {}",
        p.lost,
        p.sent,
        &crate::output::human::clock(p.wall_ns)[..8]
    );
    match &p.outcome.status {
        Status::Ok { rtt_ns } => format!("{head}  ok    {:.2} ms", *rtt_ns as f64 / 1e6),
        Status::Late { .. } => format!("{head}  late  (reply after the timeout)"),
        Status::Lost { drop: Some(d) } => {
            let mut why = format!("{}{}", d.cause, if d.reply_path { " (reply)" } else { "" });
            if let Some(n) = &d.netns_name {
                why += &format!(" in {n}");
            }
            if let (Some(c), Some(m)) = (d.ct_count, d.ct_max) {
                // The count only: at a real limit (1048576/1048576) the word
                // "table" would push the line past 80 columns.
                why += &format!(", {c}/{m}");
            }
            format!("{head}  down  {why}")
        }
        Status::Lost { drop: None } => format!("{head}  down  no drop seen on this host"),
    }
}

impl Sink for DemoSink {
    fn start(&mut self, _info: &SessionInfo) -> std::io::Result<()> {
        if let Some(tx) = self.attached.take() {
            let _ = tx.send(());
        }
        Ok(())
    }

    fn drop_event(&mut self, s: &Shown) -> std::io::Result<()> {
        let mut log = self.log.lock().unwrap();
        let is_echo = s.ev.icmp.and_then(|i| i.echo).is_some();
        if s.cause == Cause::ConntrackTableFull && s.ev.netns == Some(self.server_netns) {
            log.table_full_ns.push(s.wall_ns);
            if let Some(f) = &s.ev.flow {
                let (sp, dp) = f.ports.unwrap_or((0, 0));
                log.flows_turned_away.insert((f.src, sp, dp));
            }
            if !is_echo {
                log.flood.fold(s);
            }
        } else {
            log.other_drops += 1;
        }
        Ok(())
    }

    fn probe(&mut self, p: &ProbeShown) -> std::io::Result<()> {
        let rec = PingRecord {
            sent_ns: p.wall_ns,
            lost: matches!(p.outcome.status, Status::Lost { .. }),
            explained: matches!(p.outcome.status, Status::Lost { drop: Some(_) }),
        };
        let mut log = self.log.lock().unwrap();
        log.pings.push(rec);
        let mut out = std::io::stdout().lock();
        writeln!(out, "{}", ping_line(p))?;
        if p.wall_ns.saturating_sub(self.last_report_ns) >= REPORT_EVERY_NS {
            for l in log.flood.take_lines() {
                writeln!(out, "{}", fold_line(&l))?;
                self.last_report_ns = p.wall_ns;
            }
        }
        Ok(())
    }

    fn summary(&mut self, _s: &crate::summary::Summary) -> std::io::Result<()> {
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stdout().flush()
    }
}
