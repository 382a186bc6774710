//! A report for people: aligned tables on a terminal, or markdown to paste
//! into an incident ticket. Both come from the same rows.

use std::{
    fmt::Write,
    time::{Duration, UNIX_EPOCH},
};

use super::Report;
use crate::{cause::Cause, events::decode::proto_name, output::human::clock};

/// Rows (the first is the header) as aligned columns or a markdown table.
pub fn grid(rows: &[Vec<String>], md: bool) -> String {
    let mut out = String::new();
    if rows.is_empty() {
        return out;
    }
    if md {
        let esc = |s: &String| s.replace('|', "\\|");
        for (i, r) in rows.iter().enumerate() {
            let _ = writeln!(
                out,
                "| {} |",
                r.iter().map(esc).collect::<Vec<_>>().join(" | ")
            );
            if i == 0 {
                let _ = writeln!(out, "|{}", r.iter().map(|_| "---|").collect::<String>());
            }
        }
        return out;
    }
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let width: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for r in rows {
        let mut line = String::from(" ");
        for (c, cell) in r.iter().enumerate() {
            // Numbers right-aligned, words left-aligned.
            let numeric = cell
                .chars()
                .next()
                .map(|ch| ch.is_ascii_digit() || ch == '+')
                .unwrap_or(false)
                && !cell.contains(' ');
            let pad = width[c] - cell.chars().count();
            if numeric {
                let _ = write!(line, " {}{cell} ", " ".repeat(pad));
            } else {
                let _ = write!(line, " {cell}{} ", " ".repeat(pad));
            }
        }
        let _ = writeln!(out, "{}", line.trim_end());
    }
    out
}

/// Eight-level bars; `·` marks a second with no drops.
pub fn sparkline(series: &[u64]) -> String {
    const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    let max = series.iter().copied().max().unwrap_or(0);
    series
        .iter()
        .map(|&v| {
            if v == 0 {
                '·'
            } else {
                BARS[((v * 8 - 1) / max.max(1)).min(7) as usize]
            }
        })
        .collect()
}

/// At most `width` columns: seconds summed into equal buckets.
pub fn bucket(series: &[u64], width: usize) -> (Vec<u64>, usize) {
    let per = series.len().div_ceil(width.max(1)).max(1);
    (series.chunks(per).map(|c| c.iter().sum()).collect(), per)
}

pub fn date(wall_ns: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_nanos(wall_ns)).to_string()
}

fn pct(n: u64, total: u64) -> String {
    if total == 0 {
        "-".into()
    } else {
        format!("{:.1}%", 100.0 * n as f64 / total as f64)
    }
}

pub fn rate(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v < 10.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.1}")
    }
}

/// A flow's two ends as shown: `addr:port` for TCP/UDP, `addr id N` for
/// an ICMP echo, the address alone otherwise.
pub fn flow_ends(id: &crate::flows::FlowId) -> (String, String) {
    let end = |a: Option<std::net::IpAddr>, p: u16| match (a, id.proto) {
        (Some(a), 6 | 17) => format!("{a}:{p}"),
        (Some(a), _) => a.to_string(),
        (None, _) => "?".into(),
    };
    if matches!(id.proto, 1 | 58) && id.sport != 0 {
        (
            format!("{} id {}", end(id.src, 0), id.sport),
            end(id.dst, 0),
        )
    } else {
        (end(id.src, id.sport), end(id.dst, id.dport))
    }
}

/// The kernel-vs-ctdrop verdict for one namespace (`filtered`: a capture
/// filter was set, so a difference is expected).
pub fn counter_verdict(c: &crate::conntrack::stats::CounterCheck, filtered: bool) -> String {
    if c.agrees() {
        "agree".to_string()
    } else if filtered {
        "differ (a filter was set)".to_string()
    } else {
        format!(
            "DIFFER by {}",
            c.delta.get("drop") as i64 - (c.table_full + c.insert_failed) as i64
        )
    }
}

pub fn render(r: &Report, top: usize, md: bool) -> String {
    let mut o = String::new();
    let h = &r.header;
    let t = &r.tally;
    let section = |o: &mut String, title: &str| {
        if md {
            let _ = writeln!(o, "\n### {title}\n");
        } else {
            let _ = writeln!(o, "\n{title}:");
        }
    };
    if md {
        let _ = writeln!(o, "## ctdrop capture report: `{}`\n", r.path.display());
    } else {
        let _ = writeln!(o, "ctdrop capture report: {}", r.path.display());
    }
    let bullet = if md { "- " } else { "  " };
    let _ = writeln!(
        o,
        "{bullet}host {} (kernel {}), ctdrop {}",
        h.host, h.kernel_release, h.ctdrop_version
    );
    let _ = writeln!(
        o,
        "{bullet}from {} to {} ({:.1} s)",
        date(h.started_wall_ns),
        date(r.ended_wall_ns()),
        r.duration_s()
    );
    let mech: Vec<String> = h
        .mechanisms
        .iter()
        .map(|(k, v)| format!("{k} via {v}"))
        .collect();
    let _ = writeln!(o, "{bullet}{}", mech.join("; "));
    let mut filt = Vec::new();
    // Files from before repeatable filters hold only the single fields.
    let f = &h.filter;
    let netns = if f.netns_all.is_empty() {
        f.netns.into_iter().collect()
    } else {
        f.netns_all.clone()
    };
    let hosts = if f.hosts.is_empty() {
        f.host.clone().into_iter().collect()
    } else {
        f.hosts.clone()
    };
    let ports = if f.ports.is_empty() {
        f.port.into_iter().collect()
    } else {
        f.ports.clone()
    };
    for n in netns {
        filt.push(format!("netns {}", r.netns_label(Some(n))));
    }
    for (ns, i) in &f.interfaces {
        filt.push(format!("interface #{i} in {}", r.netns_label(Some(*ns))));
    }
    if let Some(p) = f.proto {
        filt.push(format!("proto {}", proto_name(p)));
    }
    for a in hosts {
        filt.push(format!("host {a}"));
    }
    for p in ports {
        filt.push(format!("port {p}"));
    }
    let scope = if h.filter.all_reasons {
        "all drop reasons"
    } else {
        "netfilter drops"
    };
    let filt = if filt.is_empty() {
        String::new()
    } else {
        format!(", only {}", filt.join(", "))
    };
    let _ = writeln!(o, "{bullet}traced {scope}{filt}");
    if let Some(m) = h.conntrack_max {
        let _ = writeln!(
            o,
            "{bullet}nf_conntrack_max {m}, buckets {}",
            h.conntrack_buckets
                .map(|b| b.to_string())
                .unwrap_or_else(|| "?".into())
        );
    }
    if let Some(d) = r.end.describe() {
        let _ = writeln!(o, "{}WARNING: {d}", if md { "\n> " } else { "\n" });
    }

    let lost = match r.events_lost() {
        Some(0) => "no events lost".to_string(),
        Some(n) => format!(
            "{n} events lost (ring buffer full: these drops are missing from every count below)"
        ),
        None => "events lost unknown".to_string(),
    };
    let totals = format!(
        "{} drops, {}/s on average, peak {}/s",
        t.total,
        rate(r.rate(t.total)),
        r.per_second.iter().max().copied().unwrap_or(0)
    );
    if md {
        let _ = writeln!(o, "\n**{totals}**; {lost}");
    } else {
        let _ = writeln!(o, "\n{totals}; {lost}");
    }

    section(&mut o, "Drops by cause");
    let mut rows = vec![vec![
        "cause".to_string(),
        "drops".into(),
        "share".into(),
        "per s".into(),
    ]];
    for c in Cause::ALL {
        let n = t.count(c);
        if n > 0 {
            rows.push(vec![
                c.to_string(),
                n.to_string(),
                pct(n, t.total),
                rate(r.rate(n)),
            ]);
        }
    }
    o += &grid(&rows, md);

    if !t.by_netns.is_empty() {
        section(&mut o, "Drops by namespace");
        let mut rows = vec![vec![
            "namespace".to_string(),
            "drops".into(),
            "main cause".into(),
        ]];
        for (ns, n) in &t.by_netns {
            let main = n
                .by_cause
                .iter()
                .enumerate()
                .max_by_key(|(_, v)| **v)
                .map(|(i, _)| Cause::ALL[i])
                .unwrap_or(Cause::Other);
            rows.push(vec![
                r.netns_label(*ns),
                n.total.to_string(),
                main.to_string(),
            ]);
        }
        o += &grid(&rows, md);
    }
    if !t.by_ifindex.is_empty() {
        section(&mut o, "Drops by interface");
        let mut rows = vec![vec![
            "namespace".to_string(),
            "interface".into(),
            "drops".into(),
        ]];
        for ((ns, ifx), n) in &t.by_ifindex {
            rows.push(vec![r.netns_label(*ns), r.ifname(*ns, *ifx), n.to_string()]);
        }
        o += &grid(&rows, md);
    }

    if !r.per_second.is_empty() {
        section(&mut o, "Drops per second");
        let (cols, per) = bucket(&r.per_second, 60);
        let unit = if per == 1 {
            "1 column = 1 s".to_string()
        } else {
            format!("1 column = {per} s")
        };
        let line = sparkline(&cols);
        if md {
            let _ = writeln!(
                o,
                "`{line}` ({unit}, peak {} per column)",
                cols.iter().max().unwrap_or(&0)
            );
        } else {
            let _ = writeln!(
                o,
                "  {line}  ({unit}, peak {} per column)",
                cols.iter().max().unwrap_or(&0)
            );
        }
    }

    let flows = t.top_flows(top);
    if !flows.is_empty() {
        section(&mut o, "Top flows");
        let mut rows = vec![vec![
            "drops".to_string(),
            "proto".into(),
            "source".into(),
            "destination".into(),
            "cause".into(),
            "first".into(),
            "last".into(),
        ]];
        for (id, s) in flows {
            let (src, dst) = flow_ends(id);
            rows.push(vec![
                s.drops.to_string(),
                proto_name(id.proto),
                src,
                dst,
                s.main_cause().to_string(),
                clock(s.first_ns + h.boot_offset_ns),
                clock(s.last_ns + h.boot_offset_ns),
            ]);
        }
        o += &grid(&rows, md);
        if t.flows_untracked > 0 {
            let _ = writeln!(
                o,
                "{bullet}({} drops in flows beyond the flow limit: counted in totals only)",
                t.flows_untracked
            );
        }
    }

    section(&mut o, "Kernel counters");
    match r.counter_checks() {
        None => {
            let _ = writeln!(
                o,
                "{bullet}unknown: the trailer with the counters at the end is missing"
            );
        }
        Some(cs) if cs.is_empty() => {
            let _ = writeln!(o, "{bullet}no conntrack drops counted by the kernel nor recorded by ctdrop: they agree");
        }
        Some(cs) => {
            let mut rows = vec![vec![
                "namespace".to_string(),
                "kernel drop".into(),
                "insert_failed".into(),
                "early_drop".into(),
                "ctdrop table_full".into(),
                "ctdrop insert_failed".into(),
                "verdict".into(),
            ]];
            for c in &cs {
                let verdict = counter_verdict(c, h.filter.narrows());
                let name = match &c.netns_name {
                    Some(n) => format!("{n} ({})", c.netns),
                    None => c.netns.to_string(),
                };
                rows.push(vec![
                    name,
                    format!("+{}", c.delta.get("drop")),
                    format!("+{}", c.delta.get("insert_failed")),
                    format!("+{}", c.delta.get("early_drop")),
                    c.table_full.to_string(),
                    c.insert_failed.to_string(),
                    verdict,
                ]);
            }
            o += &grid(&rows, md);
            let all = cs.iter().all(|c| c.agrees());
            let _ = writeln!(
                o,
                "{bullet}{}",
                if all {
                    "every conntrack drop the kernel counted has its record here".to_string()
                } else {
                    "the kernel's counts and ctdrop's DIFFER: see events lost and filters above"
                        .to_string()
                }
            );
        }
    }

    if !r.probes.is_empty() {
        section(&mut o, "Probes");
        let mut rows = vec![vec![
            "host".to_string(),
            "sent".into(),
            "answered".into(),
            "lost".into(),
            "loss".into(),
            "lost because".into(),
        ]];
        for (host, p) in &r.probes {
            let mut why: Vec<String> = p
                .lost_by_cause
                .iter()
                .map(|(c, n)| format!("{n} {c}"))
                .collect();
            if p.lost_unexplained > 0 {
                why.push(format!("{} with no drop on this host", p.lost_unexplained));
            }
            rows.push(vec![
                host.clone(),
                p.sent.to_string(),
                p.answered.to_string(),
                p.lost.to_string(),
                format!("{:.1}%", p.loss_pct()),
                why.join(", "),
            ]);
        }
        o += &grid(&rows, md);
        for (host, p) in &r.probes {
            for l in p.lost_probes.iter().take(20) {
                let ts = clock(l.ts_ns);
                let v = l.verdict.as_deref().unwrap_or("");
                let _ = writeln!(o, "{bullet}{host} #{} at {ts}: down, {v}", l.seq);
            }
            if p.lost_probes.len() > 20 {
                let _ = writeln!(
                    o,
                    "{bullet}{host}: {} more lost probes (see --format json)",
                    p.lost_probes.len() - 20
                );
            }
        }
    }
    if let Some(w) = r.trailer().and_then(|t| t.watch.as_ref()) {
        section(&mut o, "Recorded by ctdrop watch");
        let fill = match (w.entries, w.max) {
            (Some(e), Some(m)) if m > 0 => {
                format!(", table {e}/{m} ({:.0}%)", e as f64 * 100.0 / m as f64)
            }
            _ => String::new(),
        };
        let _ = writeln!(
            o,
            "{bullet}trigger {} in {} at {}{fill}",
            w.trigger,
            r.netns_label(w.netns),
            date(w.triggered_wall_ns)
        );
        let _ = writeln!(
            o,
            "{bullet}window: {:.0} s before the trigger to {:.0} s after the last drop",
            w.pre_s, w.post_s
        );
        if w.drops_not_kept > 0 {
            let _ = writeln!(o, "{bullet}{} drops in this window were not kept: the in-memory buffer ({} records) was full", w.drops_not_kept, w.buffer_cap);
        }
        if w.cut_by_shutdown {
            let _ = writeln!(o, "{bullet}ctdrop stopped before the window ended");
        }
    }
    for snap in &r.occupancy {
        section(
            &mut o,
            &format!("Who held the table (snapshot at {})", date(snap.taken_ns)),
        );
        let mut text = Vec::new();
        let _ = snap.write_human(&mut text);
        let text = String::from_utf8_lossy(&text);
        if md {
            let _ = writeln!(o, "```\n{}```", text);
        } else {
            for l in text.lines() {
                let _ = writeln!(o, "  {l}");
            }
        }
    }
    let advice = r.advice();
    if !advice.is_empty() {
        section(&mut o, "advice");
        let mut text = Vec::new();
        if md {
            let _ = crate::advice::write_markdown(&advice, &mut text);
            o += &String::from_utf8_lossy(&text);
        } else {
            let _ = crate::advice::write_human(&advice, &mut text);
            // The human form's first line is its own title.
            for l in String::from_utf8_lossy(&text).lines().skip(1) {
                o += l;
                o.push('\n');
            }
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparkline_scales_to_the_peak_and_marks_silence() {
        assert_eq!(sparkline(&[0, 1, 4, 8]), "·▁▄█");
        assert_eq!(sparkline(&[]), "");
        assert_eq!(sparkline(&[5, 5]), "██");
    }

    #[test]
    fn long_series_are_bucketed() {
        let s: Vec<u64> = (0..120).map(|_| 1).collect();
        let (b, per) = bucket(&s, 60);
        assert_eq!((b.len(), per), (60, 2));
        assert!(b.iter().all(|v| *v == 2));
        assert_eq!(bucket(&[1, 2, 3], 60), (vec![1, 2, 3], 1));
    }

    #[test]
    fn markdown_tables_escape_pipes() {
        let rows = vec![
            vec!["a".to_string(), "b".into()],
            vec!["x|y".into(), "1".into()],
        ];
        assert_eq!(grid(&rows, true), "| a | b |\n|---|---|\n| x\\|y | 1 |\n");
        let t = grid(&rows, false);
        assert_eq!(t.lines().count(), 2);
    }
}
