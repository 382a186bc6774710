//! An occupancy snapshot as text for an operator (`check --occupancy`,
//! the end of a live run).

use super::model::{Occupancy, SOURCES_PER_PORT};

impl Occupancy {
    /// Lines of at most 80 columns.
    pub fn write_human(&self, out: &mut dyn std::io::Write) -> std::io::Result<()> {
        let pct = |n: u64| {
            if self.entries == 0 {
                0.0
            } else {
                n as f64 * 100.0 / self.entries as f64
            }
        };
        writeln!(
            out,
            "conntrack table in {}: {} entries{}",
            self.label(),
            self.entries,
            self.max.map(|m| format!(" (max {m})")).unwrap_or_default(),
        )?;
        writeln!(
            out,
            "  unreplied {} ({:.0}%, evictable)  replied {}  assured {} ({:.0}%)",
            self.unreplied,
            pct(self.unreplied),
            self.replied,
            self.assured,
            pct(self.assured)
        )?;
        if self.nat > 0 {
            writeln!(out, "  {} entries are NAT'd", self.nat)?;
        }
        if self.unreadable > 0 {
            writeln!(
                out,
                "  {} dumped messages could not be read",
                self.unreadable
            )?;
        }
        if !self.by_proto_state.is_empty() {
            writeln!(out, "  by protocol and state:")?;
        }
        for r in self.by_proto_state.iter().take(8) {
            writeln!(
                out,
                "    {:<6} {:<12} {:>9}  ({:.0}%)",
                r.proto,
                r.state,
                r.entries,
                pct(r.entries)
            )?;
        }
        if self.by_proto_state.len() > 8 {
            writeln!(out, "    ({} more rows)", self.by_proto_state.len() - 8)?;
        }
        for (title, rows) in [
            ("top sources:", &self.top_sources),
            ("top destinations:", &self.top_destinations),
        ] {
            if rows.is_empty() {
                continue;
            }
            writeln!(out, "  {title}")?;
            let w = rows
                .iter()
                .map(|r| r.addr.to_string().len())
                .max()
                .unwrap_or(0)
                .max(15);
            for r in rows {
                writeln!(
                    out,
                    "    {:<w$} {:>9}  ({:.0}%, {} unreplied)",
                    r.addr.to_string(),
                    r.entries,
                    pct(r.entries),
                    r.unreplied
                )?;
            }
        }
        if !self.top_dst_ports.is_empty() {
            writeln!(out, "  top destination ports:")?;
        }
        for r in &self.top_dst_ports {
            let port = format!("{} {}", r.proto, r.port);
            let srcs = if r.sources as usize >= SOURCES_PER_PORT {
                format!("{}+ sources", r.sources)
            } else {
                format!("{} sources", r.sources)
            };
            writeln!(
                out,
                "    {:<12} {:>9}  ({:.0}%, {} unreplied, {srcs})",
                port,
                r.entries,
                pct(r.entries),
                r.unreplied
            )?;
        }
        writeln!(
            out,
            "  (table read in {:.0} ms, {:.0} ms CPU)",
            self.elapsed_ms, self.cpu_ms
        )?;
        Ok(())
    }
}
