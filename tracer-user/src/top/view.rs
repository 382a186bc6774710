//! One frame of `ctdrop top`, drawn from [`TopState`] and the run's top
//! flows. Top to bottom: a status line; namespaces with their table fill;
//! drops per second by cause with the last minute as a sparkline; the
//! flows and ports drops turn up on; probes; keys and notes.

use ratatui::{
    layout::{Constraint, Layout, Rect},
    style::{Color, Modifier, Style},
    text::{Line, Span},
    widgets::{Block, Borders, Cell, Paragraph, Row, Sparkline, Table},
    Frame,
};

use super::state::TopState;
use crate::{cause::Cause, events::decode::proto_name};

/// A flow as listed (already filtered to the shown namespaces).
pub struct FlowLine {
    pub drops: u64,
    pub proto: u8,
    pub src: String,
    pub dst: String,
    pub cause: Cause,
    /// Seconds since its last drop.
    pub idle_s: f64,
}

fn cause_color(c: Cause) -> Color {
    match c {
        Cause::ConntrackTableFull => Color::Red,
        Cause::ConntrackInsertFailed => Color::LightRed,
        Cause::ConntrackInvalid => Color::Magenta,
        Cause::IcmpErrorBlocked => Color::Yellow,
        Cause::NetfilterRule => Color::Blue,
        Cause::Other => Color::Gray,
    }
}

/// `[█████████░░░]` for a fill fraction; `width` cells inside the brackets.
pub fn bar(fill: f64, width: usize) -> String {
    let full = ((fill.clamp(0.0, 1.0) * width as f64).round() as usize).min(width);
    format!("[{}{}]", "█".repeat(full), "░".repeat(width - full))
}

fn fill_color(f: f64) -> Color {
    if f >= 0.95 {
        Color::Red
    } else if f >= 0.8 {
        Color::Yellow
    } else {
        Color::Green
    }
}

pub fn draw(f: &mut Frame, s: &TopState, flows: &[FlowLine]) {
    let rows = s.rows();
    let causes = s.causes();
    let ns_h = (rows.len().clamp(1, 8) + 3) as u16;
    let cause_h = (causes.len().max(1) + 2) as u16;
    let probe_h = if s.probes.is_empty() {
        0
    } else {
        (s.probes.len().min(6) + 3) as u16
    };
    let [status, ns_area, cause_area, mid, probe_area, help] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(ns_h),
        Constraint::Length(cause_h),
        Constraint::Min(5),
        Constraint::Length(probe_h),
        Constraint::Length(1 + s.messages.len().min(3) as u16),
    ])
    .areas(f.area());

    let filter = match s.filter {
        None => "all namespaces".to_string(),
        Some(ns) => format!("only {}", s.label(ns)),
    };
    let lost_style = if s.events_lost > 0 {
        Style::default().fg(Color::Red).add_modifier(Modifier::BOLD)
    } else {
        Style::default()
    };
    let mut head = vec![
        Span::styled("ctdrop top", Style::default().add_modifier(Modifier::BOLD)),
        Span::raw(format!("  {:.0} s  ", s.elapsed_s)),
        Span::styled(format!("events lost {}", s.events_lost), lost_style),
        Span::raw(format!("  sort {}  {filter}", s.sort.as_str())),
    ];
    if s.paused {
        head.push(Span::styled(
            "  PAUSED",
            Style::default().fg(Color::Black).bg(Color::Yellow),
        ));
    }
    f.render_widget(Paragraph::new(Line::from(head)), status);

    namespaces(f, ns_area, s, &rows);
    cause_rates(f, cause_area, &causes);
    let [flow_area, port_area] =
        Layout::horizontal([Constraint::Percentage(62), Constraint::Percentage(38)]).areas(mid);
    flow_table(f, flow_area, flows);
    port_table(f, port_area, s);
    if probe_h > 0 {
        probes(f, probe_area, s);
    }
    let mut lines = vec![Line::from(Span::styled(
        "q quit  s sort  n next namespace  a all  p pause",
        Style::default().fg(Color::DarkGray),
    ))];
    lines.extend(
        s.messages
            .iter()
            .map(|m| Line::from(Span::styled(m.clone(), Style::default().fg(Color::Yellow)))),
    );
    f.render_widget(Paragraph::new(lines), help);
}

fn namespaces(f: &mut Frame, area: Rect, s: &TopState, rows: &[super::state::NsRow]) {
    let table_rows: Vec<Row> = rows
        .iter()
        .map(|r| {
            let (fill_text, style) = match (r.entries, r.max, r.fill()) {
                (Some(e), Some(m), Some(fr)) => (
                    format!("{} {e}/{m} {:.0}%", bar(fr, 12), fr * 100.0),
                    Style::default().fg(fill_color(fr)),
                ),
                (Some(e), _, _) => (format!("{e} entries"), Style::default()),
                _ => ("-".into(), Style::default()),
            };
            let rate_style = if r.rate > 0 {
                Style::default().fg(Color::Red).add_modifier(Modifier::BOLD)
            } else {
                Style::default()
            };
            Row::new(vec![
                Cell::from(r.label.clone()),
                Cell::from(fill_text).style(style),
                Cell::from(r.rate.to_string()).style(rate_style),
                Cell::from(r.total.to_string()),
                Cell::from(r.main_cause.map(Cause::as_str).unwrap_or("-")),
            ])
        })
        .collect();
    let t = Table::new(
        table_rows,
        [
            Constraint::Min(20),
            Constraint::Length(34),
            Constraint::Length(9),
            Constraint::Length(10),
            Constraint::Length(24),
        ],
    )
    .header(
        Row::new([
            "namespace",
            "table fill (count/max)",
            "drops/s",
            "drops",
            "main cause",
        ])
        .style(Style::default().add_modifier(Modifier::BOLD)),
    )
    .block(
        Block::default()
            .borders(Borders::TOP)
            .title(format!(" namespaces ({}) ", rows.len())),
    );
    let _ = s;
    f.render_widget(t, area);
}

fn cause_rates(f: &mut Frame, area: Rect, causes: &[(Cause, u64, u64, Vec<u64>)]) {
    let block = Block::default()
        .borders(Borders::TOP)
        .title(" drops/s by cause (last 60 s) ");
    let inner = block.inner(area);
    f.render_widget(block, area);
    if causes.is_empty() {
        f.render_widget(Paragraph::new("no drops yet"), inner);
        return;
    }
    let rows = Layout::vertical(causes.iter().map(|_| Constraint::Length(1))).split(inner);
    for ((cause, rate, total, hist), row) in causes.iter().zip(rows.iter()) {
        let [label, spark] =
            Layout::horizontal([Constraint::Length(56), Constraint::Min(10)]).areas(*row);
        let text = format!("{:<24} {:>8}/s {:>12} total", cause.as_str(), rate, total);
        f.render_widget(
            Paragraph::new(text).style(Style::default().fg(cause_color(*cause))),
            label,
        );
        // The newest seconds at the right edge, as wide as there is room.
        let w = spark.width as usize;
        let data = &hist[hist.len().saturating_sub(w)..];
        f.render_widget(
            Sparkline::default()
                .data(data)
                .style(Style::default().fg(cause_color(*cause))),
            spark,
        );
    }
}

fn flow_table(f: &mut Frame, area: Rect, flows: &[FlowLine]) {
    let rows: Vec<Row> = flows
        .iter()
        .map(|l| {
            Row::new(vec![
                Cell::from(l.drops.to_string()),
                Cell::from(proto_name(l.proto)),
                Cell::from(l.src.clone()),
                Cell::from(l.dst.clone()),
                Cell::from(l.cause.as_str()).style(Style::default().fg(cause_color(l.cause))),
                Cell::from(format!("{:.0}s ago", l.idle_s)),
            ])
        })
        .collect();
    let t = Table::new(
        rows,
        [
            Constraint::Length(8),
            Constraint::Length(5),
            Constraint::Min(16),
            Constraint::Min(16),
            Constraint::Length(21),
            Constraint::Length(8),
        ],
    )
    .header(
        Row::new(["drops", "proto", "source", "destination", "cause", "last"])
            .style(Style::default().add_modifier(Modifier::BOLD)),
    )
    .block(Block::default().borders(Borders::TOP).title(" top flows "));
    f.render_widget(t, area);
}

fn port_table(f: &mut Frame, area: Rect, s: &TopState) {
    let rows: Vec<Row> = s
        .top_ports(area.height.saturating_sub(2) as usize)
        .into_iter()
        .map(|((_, proto, port), p)| {
            Row::new(vec![
                Cell::from(format!("{}/{port}", proto_name(proto))),
                Cell::from(p.last_second.to_string()),
                Cell::from(p.total.to_string()),
            ])
        })
        .collect();
    let title = if s.ports_untracked > 0 {
        format!(
            " ports ({} drops beyond {} ports) ",
            s.ports_untracked,
            super::state::MAX_PORTS
        )
    } else {
        " destination ports ".into()
    };
    let t = Table::new(
        rows,
        [
            Constraint::Min(10),
            Constraint::Length(8),
            Constraint::Length(10),
        ],
    )
    .header(
        Row::new(["port", "drops/s", "drops"]).style(Style::default().add_modifier(Modifier::BOLD)),
    )
    .block(
        Block::default()
            .borders(Borders::TOP | Borders::LEFT)
            .title(title),
    );
    f.render_widget(t, area);
}

fn probes(f: &mut Frame, area: Rect, s: &TopState) {
    let rows: Vec<Row> = s
        .probes
        .iter()
        .map(|(host, p)| {
            let pct = if p.sent > 0 {
                100.0 * p.lost as f64 / p.sent as f64
            } else {
                0.0
            };
            Row::new(vec![
                Cell::from(host.clone()),
                Cell::from(format!("{}/{}", p.lost, p.sent)),
                Cell::from(format!("{pct:.0}%")),
                Cell::from(p.last.clone()).style(Style::default().fg(if p.last_ok {
                    Color::Green
                } else {
                    Color::Red
                })),
            ])
        })
        .collect();
    let t = Table::new(
        rows,
        [
            Constraint::Length(24),
            Constraint::Length(10),
            Constraint::Length(6),
            Constraint::Min(20),
        ],
    )
    .header(
        Row::new(["probe", "lost/sent", "loss", "last"])
            .style(Style::default().add_modifier(Modifier::BOLD)),
    )
    .block(Block::default().borders(Borders::TOP).title(" probes "));
    f.render_widget(t, area);
}

#[cfg(test)]
mod tests {
    use super::*;
    use ratatui::{backend::TestBackend, Terminal};

    #[test]
    fn bars_fill_in_proportion() {
        assert_eq!(bar(1.0, 4), "[████]");
        assert_eq!(bar(0.5, 4), "[██░░]");
        assert_eq!(bar(0.0, 4), "[░░░░]");
        assert_eq!(bar(7.0, 4), "[████]");
    }

    #[test]
    fn a_full_namespace_shows_its_name_fill_and_rate() {
        let mut s = TopState::default();
        s.max = Some(64);
        s.entries(4026532000, Some("ctdt-rx"), 64);
        for _ in 0..42 {
            s.drop_seen(
                Some(4026532000),
                Some("ctdt-rx"),
                Cause::ConntrackTableFull,
                Some((17, 5353)),
            );
        }
        s.roll();
        let flows = [FlowLine {
            drops: 3,
            proto: 17,
            src: "198.18.0.1:4000".into(),
            dst: "198.18.0.2:5353".into(),
            cause: Cause::ConntrackTableFull,
            idle_s: 0.0,
        }];
        let mut term = Terminal::new(TestBackend::new(120, 30)).unwrap();
        term.draw(|f| draw(f, &s, &flows)).unwrap();
        let screen: String = term
            .backend()
            .buffer()
            .content()
            .iter()
            .map(|c| c.symbol())
            .collect();
        assert!(screen.contains("ctdt-rx (4026532000)"), "{screen}");
        assert!(screen.contains("64/64 100%"), "{screen}");
        assert!(screen.contains("conntrack_table_full"), "{screen}");
        assert!(screen.contains("42/s"), "{screen}");
        assert!(screen.contains("udp/5353"), "{screen}");
    }
}
