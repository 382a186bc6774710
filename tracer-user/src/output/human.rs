//! One readable line per drop, for an operator's terminal.

use std::fmt::Write;

use super::{CountsShown, ProbeShown, Shown, Sink};
use crate::events::decode::proto_name;
use crate::probe::{SeenDrop, Status, Wire};

/// Defined beside the sinks (the fold lines use it too).
pub use super::clock;

pub fn netns_label(netns: Option<u32>, name: Option<&str>) -> String {
    crate::conntrack::netns::label(netns, name)
}

pub fn drop_line(s: &Shown, out: &mut String) {
    let ev = s.ev;
    let _ = write!(
        out,
        "{} ns {} if {}",
        clock(s.wall_ns),
        netns_label(ev.netns, s.netns_name),
        s.ifname.map(str::to_string).unwrap_or_else(|| ev
            .ifindex
            .map(|i| format!("#{i}"))
            .unwrap_or_else(|| "-".into()))
    );
    match &ev.flow {
        Some(f) => {
            let _ = write!(out, " {}", proto_name(f.proto));
            match f.ports {
                Some((sp, dp)) => {
                    let _ = write!(out, " {} -> {}", sock(&f.src, sp), sock(&f.dst, dp));
                }
                None => {
                    let _ = write!(out, " {} -> {}", f.src, f.dst);
                }
            }
        }
        None => out.push_str(" (no IP header)"),
    }
    if let Some(i) = ev.icmp {
        match i.echo {
            Some((id, seq)) => {
                let _ = write!(
                    out,
                    " {} id {id} seq {seq}",
                    if i.ty == 8 || i.ty == 128 {
                        "echo-request"
                    } else {
                        "echo-reply"
                    }
                );
            }
            None => {
                let _ = write!(out, " type {} code {}", i.ty, i.code);
            }
        }
    }
    let _ = write!(out, "  {}", s.cause);
    if s.cause == crate::cause::Cause::Other {
        let _ = write!(out, " ({})", s.reason);
    }
    if let Some(c) = ev.ct_fill {
        let _ = write!(out, "  ct {}/{}", c.count, c.max);
    }
    let _ = write!(out, "  at {}", s.location);
}

fn sock(a: &std::net::IpAddr, port: u16) -> String {
    match a {
        std::net::IpAddr::V4(v) => format!("{v}:{port}"),
        std::net::IpAddr::V6(v) => format!("[{v}]:{port}"),
    }
}

/// Why a lost probe was lost, in one phrase.
pub fn verdict(d: &SeenDrop) -> String {
    let mut v = format!(
        "{}{}",
        d.cause,
        if d.reply_path { " (reply dropped)" } else { "" }
    );
    if d.cause == crate::cause::Cause::Other {
        let _ = write!(v, " {}", d.reason);
    }
    let _ = write!(
        v,
        " in ns {}",
        netns_label(d.netns, d.netns_name.as_deref())
    );
    if let Some(i) = &d.ifname {
        let _ = write!(v, " on {i}");
    }
    if let (Some(c), Some(m)) = (d.ct_count, d.ct_max) {
        let _ = write!(v, ", table {c}/{m}");
    }
    v
}

/// One line when a full table was snapshotted; the summary has the rest.
pub fn occupancy_line(o: &crate::conntrack::occupancy::Occupancy) -> String {
    let mut l = format!(
        "table full in ns {}: {} entries, {} unreplied",
        o.label(),
        o.entries,
        o.unreplied
    );
    if let Some(p) = o.top_dst_ports.first() {
        let _ = write!(l, "; top {} port {} ({})", p.proto, p.port, p.entries);
    }
    l
}

/// Human lines on stdout; colours only on a terminal.
/// Count mode's periodic line: `12:00:01.000000 +312345 drops (conntrack_table_full 312345) in 1.0 s, 1234567 total; rx: 312345 ct 64/64`.
pub fn counts_line(c: &CountsShown, out: &mut String) {
    let causes: Vec<String> = c
        .by_cause
        .iter()
        .map(|(cause, n)| format!("{cause} {n}"))
        .collect();
    let _ = write!(out, "{} +{} drops", clock(c.wall_ns), c.drops);
    if !causes.is_empty() {
        let _ = write!(out, " ({})", causes.join(", "));
    }
    let _ = write!(out, " in {:.1} s, {} total", c.interval_s, c.drops_total);
    for (ns, name, n, fill) in c.by_netns {
        let _ = write!(out, "; {}: {n}", netns_label(Some(*ns), name.as_deref()));
        if let Some(f) = fill {
            let _ = write!(out, " ct {}/{}", f.count, f.max);
        }
    }
}

pub struct HumanSink<W: std::io::Write> {
    out: W,
    color: bool,
    line: String,
    /// No per-drop lines at all (`--quiet`).
    quiet: bool,
    folder: super::fold::Folder,
    folded: Vec<String>,
    boot_offset_ns: u64,
}

impl<W: std::io::Write> HumanSink<W> {
    pub fn new(out: W, color: bool) -> Self {
        HumanSink {
            out,
            color,
            line: String::with_capacity(256),
            quiet: false,
            folder: super::fold::Folder::new(super::fold::DEFAULT_LIMIT),
            folded: Vec::new(),
            boot_offset_ns: 0,
        }
    }

    /// `--quiet`: probe verdicts, snapshots and the summary, no drop lines.
    pub fn quiet(mut self, quiet: bool) -> Self {
        self.quiet = quiet;
        self
    }

    fn write_folded(&mut self) -> std::io::Result<()> {
        for l in self.folded.drain(..) {
            writeln!(self.out, "{l}")?;
        }
        Ok(())
    }

    fn paint(&self, code: &str, s: &str) -> String {
        if self.color {
            format!("\x1b[{code}m{s}\x1b[0m")
        } else {
            s.to_string()
        }
    }
}

impl<W: std::io::Write> Sink for HumanSink<W> {
    fn start(&mut self, info: &super::SessionInfo) -> std::io::Result<()> {
        self.boot_offset_ns = info.boot_offset_ns;
        Ok(())
    }

    fn drop_event(&mut self, s: &Shown) -> std::io::Result<()> {
        if self.quiet {
            return Ok(());
        }
        self.folder.due(s.wall_ns, &mut self.folded);
        self.write_folded()?;
        if !self.folder.admit(s) {
            return Ok(());
        }
        self.line.clear();
        drop_line(s, &mut self.line);
        writeln!(self.out, "{}", self.line)
    }

    fn tick(&mut self, p: &super::Progress) -> std::io::Result<()> {
        // A fold line also comes when the flood has stopped.
        self.folder
            .due(p.mono_ns + self.boot_offset_ns, &mut self.folded);
        self.write_folded()
    }

    fn probe(&mut self, p: &ProbeShown) -> std::io::Result<()> {
        let o = p.outcome;
        let wire = match o.wire {
            Wire::Echo { id, seq } => format!("id {id} seq {seq}"),
            Wire::Port { local, .. } => format!("port {local}"),
        };
        let head = format!(
            "{}/{}  {}  {}  #{} {}",
            p.lost,
            p.sent,
            clock(p.wall_ns),
            p.label,
            o.number,
            wire
        );
        let tail = match &o.status {
            Status::Ok { rtt_ns } => {
                format!("{} {:.2} ms", self.paint("32", "ok"), *rtt_ns as f64 / 1e6)
            }
            Status::Late { rtt_ns } => format!(
                "{} reply after {:.2} s (already counted lost)",
                self.paint("33", "late"),
                *rtt_ns as f64 / 1e9
            ),
            Status::Lost { drop: Some(d) } => {
                format!("{}  {}", self.paint("31", "down"), verdict(d))
            }
            Status::Lost { drop: None } => {
                format!("{}  no drop seen on this host", self.paint("31", "down"))
            }
        };
        writeln!(self.out, "{head}  {tail}")
    }

    fn counts(&mut self, c: &CountsShown) -> std::io::Result<()> {
        let mut line = String::new();
        counts_line(c, &mut line);
        line.push('\n');
        self.out.write_all(line.as_bytes())
    }

    fn occupancy(&mut self, o: &crate::conntrack::occupancy::Occupancy) -> std::io::Result<()> {
        writeln!(self.out, "{}", occupancy_line(o))
    }

    fn summary(&mut self, s: &crate::summary::Summary) -> std::io::Result<()> {
        self.folded = self.folder.take_lines();
        self.write_folded()?;
        s.write_human(&mut self.out)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// Only the end-of-run summary, for commands whose events go elsewhere
/// (capture writes them to its file).
pub struct SummaryOnly<W: std::io::Write> {
    out: W,
}

impl<W: std::io::Write> SummaryOnly<W> {
    pub fn new(out: W) -> Self {
        SummaryOnly { out }
    }
}

impl<W: std::io::Write> Sink for SummaryOnly<W> {
    fn drop_event(&mut self, _s: &Shown) -> std::io::Result<()> {
        Ok(())
    }

    fn probe(&mut self, _p: &ProbeShown) -> std::io::Result<()> {
        Ok(())
    }

    fn summary(&mut self, s: &crate::summary::Summary) -> std::io::Result<()> {
        s.write_human(&mut self.out)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}
