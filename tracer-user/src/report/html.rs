//! A report as one self-contained HTML page for an incident ticket: the
//! timeline drawn as inline SVG (drops per second by cause, each
//! namespace's table fill, lost probes marked), then the tables the text
//! report has. No script, no fonts, no images, no link to anything: the
//! page opens the same offline, in a mail client, or attached to a ticket.
//!
//! The SVG is drawn by hand rather than with a plotting crate: a step line
//! per cause, one dashed line per namespace and a tick per lost probe is a
//! few hundred lines of `path` data, and hand-drawing keeps it so (README
//! "HTML report" has the measurement that decided it).
//!
//! Every number comes from the same [`Report`] the JSON format renders,
//! through the same accessors, and carries a `data-key` naming the JSON
//! value it equals (a path, `/` between keys: `drops_by_cause/other`), so
//! a test (or a reader) can check the two agree.

use std::fmt::Write;

use super::{
    compare::{change, Comparison},
    text::{bucket, counter_verdict, date, flow_ends, rate},
    timeline::Timeline,
    Report,
};
use crate::{
    advice::{Advice, Step},
    cause::Cause,
    conntrack::occupancy::Occupancy,
    events::decode::proto_name,
    output::human::clock,
};

/// Plot size in SVG user units (the page scales it to the window).
const W: f64 = 960.0;
const H: f64 = 280.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 56.0;
const TOP: f64 = 14.0;
const BOTTOM: f64 = 40.0;
/// Most columns a series is drawn with; longer captures are bucketed.
const MAX_COLUMNS: usize = 900;

const STYLE: &str = "
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px auto;max-width:1040px;color:#1d1d1f;padding:0 16px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:3px}
.meta{color:#555;margin:0 0 12px}.warn{background:#fff3cd;border:1px solid #e0c36c;padding:6px 10px;border-radius:4px}
.big{font-size:18px}.big b{font-size:22px}
table{border-collapse:collapse;margin:6px 0}th,td{padding:3px 10px;border-bottom:1px solid #eee;text-align:left;vertical-align:top}
th{background:#f5f5f7;font-weight:600}td.n{text-align:right;font-variant-numeric:tabular-nums}
.agree{color:#1a7f37;font-weight:600}.differ{color:#c62828;font-weight:600}
svg{width:100%;height:auto;background:#fff;border:1px solid #e4e4e4;border-radius:4px}
svg text{font:11px system-ui,sans-serif;fill:#444}svg .grid{stroke:#eee}svg .axis{stroke:#999}
.legend span{display:inline-block;margin-right:16px}.legend i{display:inline-block;width:14px;height:4px;margin-right:5px;vertical-align:middle}
pre{background:#f6f8fa;border:1px solid #e4e4e4;padding:8px 10px;border-radius:4px;overflow-x:auto;font-size:13px}
.advice{margin:10px 0 16px}.advice h3{font-size:15px;margin:0 0 4px}
";

/// One colour per cause, the same in every plot and legend.
fn color(c: Cause) -> &'static str {
    match c {
        Cause::ConntrackTableFull => "#d62728",
        Cause::ConntrackInsertFailed => "#ff7f0e",
        Cause::ConntrackInvalid => "#9467bd",
        Cause::IcmpErrorBlocked => "#8c564b",
        Cause::NetfilterRule => "#1f77b4",
        Cause::Other => "#7f7f7f",
    }
}

const FILL_COLORS: [&str; 4] = ["#2ca02c", "#17becf", "#bcbd22", "#e377c2"];

/// Text for HTML element content and attribute values.
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

fn page(title: &str, body: &str) -> String {
    // The CSP forbids every fetch: should anything in the page ever point
    // outside it, the browser refuses instead of reaching out.
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n\
         <meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; img-src data:\">\n\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\n<title>{}</title>\n<style>{STYLE}</style></head>\n<body>\n{body}</body></html>\n",
        esc(title)
    )
}

/// A table from a header row and rows of cells (already HTML); cells whose
/// text is a number are right-aligned.
fn table(o: &mut String, head: &[&str], rows: &[Vec<String>]) {
    o.push_str("<table><tr>");
    for h in head {
        let _ = write!(o, "<th>{}</th>", esc(h));
    }
    o.push_str("</tr>\n");
    for r in rows {
        o.push_str("<tr>");
        for c in r {
            if c.starts_with("<td") {
                o.push_str(c);
            } else {
                let numeric = c
                    .chars()
                    .next()
                    .is_some_and(|ch| ch.is_ascii_digit() || ch == '+')
                    && !c.contains(' ');
                let _ = write!(
                    o,
                    "<td{}>{c}</td>",
                    if numeric { " class=\"n\"" } else { "" }
                );
            }
        }
        o.push_str("</tr>\n");
    }
    o.push_str("</table>\n");
}

/// A number cell tagged with the JSON key it equals.
fn keyed(key: &str, v: impl std::fmt::Display) -> String {
    format!("<td class=\"n\" data-key=\"{}\">{v}</td>", esc(key))
}

/// 1, 2 or 5 times a power of ten: a step that gives about `ticks` ticks up to `max`.
fn nice_step(max: f64, ticks: f64) -> f64 {
    if max <= 0.0 {
        return 1.0;
    }
    let raw = max / ticks;
    let p = 10f64.powf(raw.log10().floor());
    let f = raw / p;
    let m = if f <= 1.0 {
        1.0
    } else if f <= 2.0 {
        2.0
    } else if f <= 5.0 {
        5.0
    } else {
        10.0
    };
    (m * p).max(1.0)
}

/// The y-axis top for drops per second: the highest column, rounded up to a tick.
pub fn y_top(t: &Timeline) -> f64 {
    let (cols, per) = columns(t.seconds());
    let peak = t
        .causes()
        .map(|(_, s)| bucket(s, cols).0.into_iter().max().unwrap_or(0))
        .max()
        .unwrap_or(0) as f64
        / per as f64;
    let step = nice_step(peak, 4.0);
    ((peak / step).ceil() * step).max(step)
}

/// How many columns a series of `secs` seconds is drawn with, and seconds per column.
fn columns(secs: usize) -> (usize, usize) {
    let (b, per) = bucket(&vec![0; secs.max(1)], MAX_COLUMNS);
    (b.len(), per)
}

/// The timeline plot. `ymax`: the drops-per-second axis top (the same for
/// two plots that are compared); `netns_label` names a namespace.
pub fn timeline_svg(
    o: &mut String,
    t: &Timeline,
    ymax: f64,
    id: &str,
    netns_label: &dyn Fn(u32) -> String,
) {
    let secs = t.seconds().max(1);
    let (ncols, per) = columns(secs);
    let pw = W - LEFT - RIGHT;
    let ph = H - TOP - BOTTOM;
    let x = |col: f64| LEFT + pw * col / ncols as f64;
    let y = |v: f64| TOP + ph * (1.0 - (v / ymax).min(1.0));
    let yf = |frac: f64| TOP + ph * (1.0 - frac.clamp(0.0, 1.0));
    let _ = writeln!(
        o,
        "<svg id=\"{id}\" viewBox=\"0 0 {W} {H}\" xmlns=\"http://www.w3.org/2000/svg\" role=\"img\" aria-label=\"drops per second by cause, table fill and lost probes over time\">"
    );
    // Grid and left axis: drops per second.
    let step = nice_step(ymax, 4.0);
    let mut v = 0.0;
    while v <= ymax + 1e-9 {
        let _ = writeln!(
            o,
            "<line class=\"grid\" x1=\"{LEFT}\" x2=\"{:.1}\" y1=\"{:.1}\" y2=\"{:.1}\"/>",
            W - RIGHT,
            y(v),
            y(v)
        );
        let _ = writeln!(
            o,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            LEFT - 6.0,
            y(v) + 4.0,
            v
        );
        v += step;
    }
    let _ = writeln!(
        o,
        "<text transform=\"translate(14,{:.1}) rotate(-90)\" text-anchor=\"middle\">drops/s</text>",
        TOP + ph / 2.0
    );
    // Right axis: table fill.
    for pct in [0, 50, 100] {
        let _ = writeln!(
            o,
            "<text x=\"{:.1}\" y=\"{:.1}\">{pct}%</text>",
            W - RIGHT + 6.0,
            yf(pct as f64 / 100.0) + 4.0
        );
    }
    let _ = writeln!(o, "<text transform=\"translate({:.1},{:.1}) rotate(90)\" text-anchor=\"middle\">table fill</text>", W - 10.0, TOP + ph / 2.0);
    // Time axis: seconds since the capture started.
    let tstep = nice_step(secs as f64, 8.0);
    let mut s = 0.0;
    while s <= secs as f64 + 1e-9 {
        let cx = x(s / per as f64);
        let _ = writeln!(
            o,
            "<line class=\"axis\" x1=\"{cx:.1}\" x2=\"{cx:.1}\" y1=\"{:.1}\" y2=\"{:.1}\"/>",
            TOP + ph,
            TOP + ph + 4.0
        );
        let _ = writeln!(
            o,
            "<text x=\"{cx:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{s}s</text>",
            TOP + ph + 16.0
        );
        s += tstep;
    }
    let _ = writeln!(o, "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">seconds since the capture started</text>", LEFT + pw / 2.0, H - 6.0);
    let _ = writeln!(
        o,
        "<line class=\"axis\" x1=\"{LEFT}\" x2=\"{:.1}\" y1=\"{:.1}\" y2=\"{:.1}\"/>",
        W - RIGHT,
        TOP + ph,
        TOP + ph
    );
    let _ = writeln!(
        o,
        "<line class=\"axis\" x1=\"{LEFT}\" x2=\"{LEFT}\" y1=\"{TOP}\" y2=\"{:.1}\"/>",
        TOP + ph
    );

    // Table fill per namespace: dashed, broken where no drop read it.
    for (i, (ns, series)) in t.fill().enumerate() {
        let cols: Vec<Option<f64>> = series
            .chunks(per)
            .map(|c| {
                c.iter()
                    .flatten()
                    .map(|(n, m)| if *m > 0 { *n as f64 / *m as f64 } else { 0.0 })
                    .reduce(f64::max)
            })
            .collect();
        let mut d = String::new();
        let mut pen = false;
        for (c, f) in cols.iter().enumerate() {
            match f {
                Some(f) => {
                    let _ = write!(
                        d,
                        "{}{:.1},{:.1}H{:.1}",
                        if pen { 'L' } else { 'M' },
                        x(c as f64),
                        yf(*f),
                        x(c as f64 + 1.0)
                    );
                    pen = true;
                }
                None => pen = false,
            }
        }
        let _ = writeln!(
            o,
            "<path class=\"fill\" data-netns=\"{ns}\" d=\"{d}\" fill=\"none\" stroke=\"{}\" stroke-width=\"2\" stroke-dasharray=\"6 3\"><title>table fill in {}</title></path>",
            FILL_COLORS[i % FILL_COLORS.len()],
            esc(&netns_label(ns))
        );
    }
    // Drops per second, one step line per cause seen.
    for (cause, series) in t.causes() {
        let (cols, _) = bucket(series, ncols);
        let mut d = format!("M{:.1},{:.1}", x(0.0), y(0.0));
        for (c, n) in cols.iter().enumerate() {
            let _ = write!(
                d,
                "V{:.1}H{:.1}",
                y(*n as f64 / per as f64),
                x(c as f64 + 1.0)
            );
        }
        let _ = write!(d, "V{:.1}", y(0.0));
        let _ = writeln!(
            o,
            "<path class=\"series\" data-cause=\"{c}\" d=\"{d}\" fill=\"none\" stroke=\"{}\" stroke-width=\"1.6\"><title>{c}: {} drops</title></path>",
            color(cause),
            series.iter().sum::<u64>(),
            c = cause.as_str()
        );
    }
    // Lost probes: a tick under the top edge at the second each was sent.
    for l in &t.lost_probes {
        let cx = x(l.at_s / per as f64);
        let why = l.cause.as_deref().unwrap_or("no drop seen on this host");
        let _ = writeln!(
            o,
            "<path class=\"lost-probe\" d=\"M{:.1},{TOP}l-4,-8h8z M{cx:.1},{TOP}V{:.1}\" fill=\"#000\" stroke=\"#000\" stroke-opacity=\"0.2\" stroke-dasharray=\"3 3\"><title>{} #{} lost at {:.1} s: {}</title></path>",
            cx,
            TOP + ph,
            esc(&l.host),
            l.seq,
            l.at_s,
            esc(why)
        );
    }
    o.push_str("</svg>\n");
    // Legend below, in HTML so it wraps with the window.
    o.push_str("<div class=\"legend\">");
    for (cause, _) in t.causes() {
        let _ = write!(
            o,
            "<span><i style=\"background:{}\"></i>{}</span>",
            color(cause),
            cause.as_str()
        );
    }
    for (i, (ns, _)) in t.fill().enumerate() {
        let _ = write!(
            o,
            "<span><i style=\"background:{}\"></i>table fill, {}</span>",
            FILL_COLORS[i % FILL_COLORS.len()],
            esc(&netns_label(ns))
        );
    }
    if !t.lost_probes.is_empty() {
        let _ = write!(o, "<span>▼ lost probe ({})</span>", t.lost_probes.len());
    }
    if per > 1 {
        let _ = write!(o, "<span>(1 column = {per} s, averaged)</span>");
    }
    o.push_str("</div>\n");
}

fn netns_name(r: &Report, ns: u32) -> String {
    r.netns_label(Some(ns))
}

pub fn render(r: &Report, top: usize) -> String {
    let mut o = String::new();
    let h = &r.header;
    let t = &r.tally;
    let _ = writeln!(o, "<h1>ctdrop capture report</h1>");
    let _ = writeln!(
        o,
        "<p class=\"meta\">{} &middot; host {} (kernel {}) &middot; ctdrop {}<br>from {} to {} (<span data-key=\"duration_s\">{:.1}</span> s) &middot; {}</p>",
        esc(&r.path.display().to_string()),
        esc(&h.host),
        esc(&h.kernel_release),
        esc(&h.ctdrop_version),
        date(h.started_wall_ns),
        date(r.ended_wall_ns()),
        r.duration_s(),
        esc(&h.mechanisms.iter().map(|(k, v)| format!("{k} via {v}")).collect::<Vec<_>>().join("; ")),
    );
    if let Some(m) = h.conntrack_max {
        let _ = writeln!(o, "<p class=\"meta\">nf_conntrack_max <span data-key=\"capture/conntrack_max\">{m}</span>{}</p>", match h.conntrack_buckets {
            Some(b) => format!(", buckets {b}"),
            None => String::new(),
        });
    }
    if let Some(d) = r.end.describe() {
        let _ = writeln!(o, "<p class=\"warn\">{}</p>", esc(&d));
    }
    let lost = match r.events_lost() {
        Some(0) => "no events lost (<span data-key=\"events_lost\">0</span>)".to_string(),
        Some(n) => format!("<span data-key=\"events_lost\">{n}</span> events lost (ring buffer full: missing from every count below)"),
        None => "events lost unknown".to_string(),
    };
    let _ = writeln!(
        o,
        "<p class=\"big\"><b data-key=\"drops_total\">{}</b> drops, {}/s on average, peak {}/s; {lost}</p>",
        t.total,
        rate(r.rate(t.total)),
        r.per_second.iter().max().copied().unwrap_or(0)
    );

    let _ = writeln!(o, "<h2>Timeline</h2>");
    timeline_svg(&mut o, &r.timeline, y_top(&r.timeline), "timeline", &|ns| {
        netns_name(r, ns)
    });

    let _ = writeln!(o, "<h2>Drops by cause</h2>");
    let rows: Vec<Vec<String>> = Cause::ALL
        .iter()
        .filter(|c| t.count(**c) > 0)
        .map(|c| {
            let n = t.count(*c);
            vec![
                format!("<td><i style=\"display:inline-block;width:10px;height:10px;background:{};margin-right:6px\"></i>{}</td>", color(*c), c.as_str()),
                keyed(&format!("drops_by_cause/{}", c.as_str()), n),
                format!("{:.1}%", 100.0 * n as f64 / t.total.max(1) as f64),
                rate(r.rate(n)),
            ]
        })
        .collect();
    if rows.is_empty() {
        o.push_str("<p>No drops recorded.</p>\n");
    } else {
        table(&mut o, &["cause", "drops", "share", "per s"], &rows);
    }

    if !t.by_netns.is_empty() {
        let _ = writeln!(o, "<h2>Drops by namespace</h2>");
        let rows: Vec<Vec<String>> = t
            .by_netns
            .iter()
            .map(|(ns, n)| {
                let key = ns
                    .map(|x| x.to_string())
                    .unwrap_or_else(|| "unknown".into());
                let main = n
                    .by_cause
                    .iter()
                    .enumerate()
                    .max_by_key(|(_, v)| **v)
                    .map(|(i, _)| Cause::ALL[i])
                    .unwrap_or(Cause::Other);
                vec![
                    esc(&r.netns_label(*ns)),
                    keyed(&format!("drops_by_netns/{key}"), n.total),
                    main.as_str().to_string(),
                ]
            })
            .collect();
        table(&mut o, &["namespace", "drops", "main cause"], &rows);
    }
    if !t.by_ifindex.is_empty() {
        let _ = writeln!(o, "<h2>Drops by interface</h2>");
        let rows: Vec<Vec<String>> = t
            .by_ifindex
            .iter()
            .map(|((ns, ifx), n)| {
                vec![
                    esc(&r.netns_label(*ns)),
                    esc(&r.ifname(*ns, *ifx)),
                    n.to_string(),
                ]
            })
            .collect();
        table(&mut o, &["namespace", "interface", "drops"], &rows);
    }

    let flows = t.top_flows(top);
    if !flows.is_empty() {
        let _ = writeln!(o, "<h2>Top flows</h2>");
        let rows: Vec<Vec<String>> = flows
            .into_iter()
            .enumerate()
            .map(|(i, (id, s))| {
                let (src, dst) = flow_ends(id);
                vec![
                    keyed(&format!("top_flows/{i}/drops"), s.drops),
                    proto_name(id.proto),
                    esc(&src),
                    esc(&dst),
                    esc(&r.netns_label(id.netns)),
                    s.main_cause().as_str().to_string(),
                    clock(s.first_ns + h.boot_offset_ns),
                    clock(s.last_ns + h.boot_offset_ns),
                ]
            })
            .collect();
        table(
            &mut o,
            &[
                "drops",
                "proto",
                "source",
                "destination",
                "namespace",
                "cause",
                "first",
                "last",
            ],
            &rows,
        );
        if t.flows_untracked > 0 {
            let _ = writeln!(
                o,
                "<p>{} drops in flows beyond the flow limit: counted in totals only.</p>",
                t.flows_untracked
            );
        }
    }

    for (i, snap) in r.occupancy.iter().enumerate() {
        occupancy(&mut o, i, snap);
    }

    let _ = writeln!(o, "<h2>Kernel counters vs ctdrop</h2>");
    match r.counter_checks() {
        None => o.push_str("<p class=\"warn\">Unknown: the trailer with the counters at the end is missing.</p>\n"),
        Some(cs) if cs.is_empty() => o.push_str("<p class=\"agree\">No conntrack drops counted by the kernel nor recorded by ctdrop: they agree.</p>\n"),
        Some(cs) => {
            let rows: Vec<Vec<String>> = cs
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let verdict = format!(
                        "<td class=\"{}\">{}</td>",
                        if c.agrees() { "agree" } else { "differ" },
                        esc(&counter_verdict(c, h.filter.narrows()))
                    );
                    vec![
                        esc(&match &c.netns_name {
                            Some(n) => format!("{n} ({})", c.netns),
                            None => c.netns.to_string(),
                        }),
                        keyed(&format!("kernel_counters/{i}/drop"), format!("+{}", c.delta.get("drop"))),
                        format!("+{}", c.delta.get("insert_failed")),
                        format!("+{}", c.delta.get("early_drop")),
                        keyed(&format!("kernel_counters/{i}/table_full_records"), c.table_full),
                        c.insert_failed.to_string(),
                        verdict,
                    ]
                })
                .collect();
            table(&mut o, &["namespace", "kernel drop", "kernel insert_failed", "kernel early_drop", "ctdrop table_full", "ctdrop insert_failed", "verdict"], &rows);
        }
    }

    if !r.probes.is_empty() {
        let _ = writeln!(o, "<h2>Probes</h2>");
        let rows: Vec<Vec<String>> = r
            .probes
            .iter()
            .map(|(host, p)| {
                let mut why: Vec<String> = p
                    .lost_by_cause
                    .iter()
                    .map(|(c, n)| format!("{n} {c}"))
                    .collect();
                if p.lost_unexplained > 0 {
                    why.push(format!("{} with no drop on this host", p.lost_unexplained));
                }
                vec![
                    esc(host),
                    keyed(&format!("probes/{host}/sent"), p.sent),
                    p.answered.to_string(),
                    keyed(&format!("probes/{host}/lost"), p.lost),
                    format!("{:.1}%", p.loss_pct()),
                    esc(&why.join(", ")),
                ]
            })
            .collect();
        table(
            &mut o,
            &["host", "sent", "answered", "lost", "loss", "lost because"],
            &rows,
        );
    }
    advice(&mut o, &r.advice());
    page(&format!("ctdrop report: {}", r.path.display()), &o)
}

/// The `i`th table snapshot of the capture (JSON: `occupancy/i`).
fn occupancy(o: &mut String, i: usize, s: &Occupancy) {
    let _ = writeln!(
        o,
        "<h2>Table snapshot: {}</h2>\n<p><span data-key=\"occupancy/{i}/entries\">{}</span> entries{} at {}: {} unreplied, {} replied, {} assured, {} NATed</p>",
        esc(&s.label()),
        s.entries,
        s.max.map(|m| format!(" of {m}")).unwrap_or_default(),
        clock(s.taken_ns),
        s.unreplied,
        s.replied,
        s.assured,
        s.nat
    );
    let rows: Vec<Vec<String>> = s
        .by_proto_state
        .iter()
        .map(|r| {
            vec![
                esc(&r.proto),
                r.state.to_string(),
                r.entries.to_string(),
                r.unreplied.to_string(),
                r.assured.to_string(),
            ]
        })
        .collect();
    table(
        o,
        &["proto", "state", "entries", "unreplied", "assured"],
        &rows,
    );
    let rows: Vec<Vec<String>> = s
        .top_dst_ports
        .iter()
        .enumerate()
        .map(|(j, p)| {
            vec![
                format!("{}/{}", esc(&p.proto), p.port),
                keyed(
                    &format!("occupancy/{i}/top_dst_ports/{j}/entries"),
                    p.entries,
                ),
                p.unreplied.to_string(),
                p.sources.to_string(),
            ]
        })
        .collect();
    table(
        o,
        &["destination port", "entries", "unreplied", "sources"],
        &rows,
    );
}

fn advice(o: &mut String, advice: &[Advice]) {
    if advice.is_empty() {
        return;
    }
    let _ = writeln!(o, "<h2>Advice</h2>\n<p>ctdrop changes nothing itself; these are the steps that fit what was recorded.</p>");
    for a in advice {
        let place = match (&a.netns_name, a.netns) {
            (Some(n), _) => n.clone(),
            (None, Some(i)) => i.to_string(),
            (None, None) => "the host".into(),
        };
        let _ = writeln!(
            o,
            "<div class=\"advice\"><h3>[{}] {}: {}</h3>",
            esc(a.topic),
            esc(&place),
            esc(&a.headline)
        );
        if !a.notes.is_empty() {
            o.push_str("<ul>");
            for n in &a.notes {
                let _ = write!(o, "<li>{}</li>", esc(n));
            }
            o.push_str("</ul>\n");
        }
        let runs: Vec<String> = a.steps.iter().filter_map(Step::command_line).collect();
        if !runs.is_empty() {
            if a.steps
                .iter()
                .any(|s| matches!(s, Step::Run { in_netns: true, .. }))
                && a.netns_name.is_some()
            {
                let _ = writeln!(
                    o,
                    "<p>in {p} (<code>ip netns exec {p} ...</code>):</p>",
                    p = esc(&place)
                );
            }
            let _ = writeln!(o, "<pre>{}</pre>", esc(&runs.join("\n")));
        }
        for s in &a.steps {
            match s {
                Step::Persist { file, line } => {
                    let _ = writeln!(
                        o,
                        "<p>persist in <code>{}</code>:</p><pre>{}</pre>",
                        esc(file),
                        esc(line)
                    );
                }
                Step::Nft { script } => {
                    let _ = writeln!(
                        o,
                        "<p>or with nft (<code>nft -f FILE</code>):</p><pre>{}</pre>",
                        esc(script)
                    );
                }
                Step::Run { .. } => {}
            }
        }
        o.push_str("</div>\n");
    }
}

/// `--before/--after`: both timelines on one drops-per-second scale, one
/// above the other, then the comparison table.
pub fn render_comparison(c: &Comparison) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "<h1>ctdrop before/after</h1>");
    let _ = writeln!(
        o,
        "<p class=\"big\" data-key=\"verdict\">{}</p>",
        esc(&c.verdict())
    );
    let ymax = y_top(&c.before.timeline).max(y_top(&c.after.timeline));
    for (label, r) in [("before", c.before), ("after", c.after)] {
        let _ = writeln!(
            o,
            "<h2>{label}: {}</h2>\n<p class=\"meta\">{:.1} s from {}, <span data-key=\"{label}/drops_total\">{}</span> drops{}</p>",
            esc(&r.path.display().to_string()),
            r.duration_s(),
            date(r.header.started_wall_ns),
            r.tally.total,
            if r.complete() { "" } else { ", INCOMPLETE: trailer missing" }
        );
        timeline_svg(&mut o, &r.timeline, ymax, label, &|ns| netns_name(r, ns));
    }
    let _ = writeln!(o, "<h2>Comparison</h2>");
    let mut rows: Vec<Vec<String>> = c
        .causes
        .iter()
        .chain(c.kernel_drop.as_ref())
        .map(|r| {
            vec![
                esc(&r.what),
                rate(r.before_per_s),
                rate(r.after_per_s),
                change(r.before_per_s, r.after_per_s),
            ]
        })
        .collect();
    if rows.is_empty() {
        rows.push(vec![
            "(no drops)".into(),
            "0".into(),
            "0".into(),
            "none".into(),
        ]);
    }
    table(
        &mut o,
        &["drops per second", "before", "after", "change"],
        &rows,
    );
    if !c.probes.is_empty() {
        let rows: Vec<Vec<String>> = c
            .probes
            .iter()
            .map(|p| {
                vec![
                    esc(&p.host),
                    p.before.loss_text(),
                    p.after.loss_text(),
                    change(p.before.loss_pct(), p.after.loss_pct()),
                ]
            })
            .collect();
        table(&mut o, &["probe loss", "before", "after", "change"], &rows);
    }
    page("ctdrop before/after", &o)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_in_names() {
        assert_eq!(
            esc("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
    }

    #[test]
    fn steps_are_one_two_or_five() {
        assert_eq!(nice_step(100.0, 4.0), 50.0);
        assert_eq!(nice_step(7.0, 4.0), 2.0);
        assert_eq!(nice_step(0.0, 4.0), 1.0);
        assert_eq!(nice_step(3600.0, 8.0), 500.0);
    }

    #[test]
    fn one_series_per_cause_seen_and_a_mark_per_lost_probe() {
        let mut t = Timeline::new();
        for s in 0..10 {
            t.drop(s, Cause::ConntrackTableFull, Some(5), Some((64, 64)));
        }
        t.drop(3, Cause::NetfilterRule, None, None);
        t.lost_probes.push(super::super::timeline::LostProbe {
            at_s: 2.5,
            host: "<h>".into(),
            seq: 3,
            cause: None,
        });
        let mut o = String::new();
        timeline_svg(&mut o, &t, y_top(&t), "t", &|ns| format!("ns{ns}"));
        assert_eq!(o.matches("class=\"series\"").count(), 2);
        assert!(
            o.contains("data-cause=\"conntrack_table_full\"")
                && o.contains("data-cause=\"netfilter_rule\"")
        );
        assert_eq!(o.matches("class=\"fill\"").count(), 1);
        assert_eq!(o.matches("class=\"lost-probe\"").count(), 1);
        assert!(o.contains("&lt;h&gt; #3"), "host names are escaped");
        assert!(!o.contains("NaN") && !o.contains("inf"), "{o}");
    }

    #[test]
    fn long_captures_are_drawn_with_bounded_columns() {
        let mut t = Timeline::new();
        t.drop(86_399, Cause::Other, None, None);
        let mut o = String::new();
        timeline_svg(&mut o, &t, y_top(&t), "t", &|ns| ns.to_string());
        assert!(
            o.len() < 200_000,
            "a day-long series drew {} bytes",
            o.len()
        );
    }
}
