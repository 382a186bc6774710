//! `report --before A --after B`: did the change work? Rates, not counts,
//! because the two captures need not be equally long.

use std::{collections::BTreeSet, fmt::Write};

use serde_json::{json, Value};

use super::{
    text::{grid, rate},
    ProbeTally, Report,
};
use crate::cause::Cause;

/// How a rate moved from before to after.
pub fn change(before: f64, after: f64) -> String {
    if before == 0.0 && after == 0.0 {
        "none".into()
    } else if after == 0.0 {
        "stopped".into()
    } else if before == 0.0 {
        "new".into()
    } else if after < before {
        format!("down {:.0}%", 100.0 * (before - after) / before)
    } else if after > before {
        format!("up {:.0}%", 100.0 * (after - before) / before)
    } else {
        "unchanged".into()
    }
}

pub struct Row {
    pub what: String,
    pub before: u64,
    pub after: u64,
    pub before_per_s: f64,
    pub after_per_s: f64,
}

pub struct ProbeRow {
    pub host: String,
    pub before: ProbeTally,
    pub after: ProbeTally,
}

pub struct Comparison<'a> {
    pub before: &'a Report,
    pub after: &'a Report,
    pub causes: Vec<Row>,
    /// Sum of the kernel's conntrack `drop` increase; None without trailers.
    pub kernel_drop: Option<Row>,
    pub probes: Vec<ProbeRow>,
}

fn kernel_drops(r: &Report) -> Option<u64> {
    Some(
        r.counter_checks()?
            .iter()
            .map(|c| c.delta.get("drop"))
            .sum(),
    )
}

impl<'a> Comparison<'a> {
    pub fn new(before: &'a Report, after: &'a Report) -> Self {
        let row = |what: String, b: u64, a: u64| Row {
            what,
            before: b,
            after: a,
            before_per_s: before.rate(b),
            after_per_s: after.rate(a),
        };
        let causes = Cause::ALL
            .iter()
            .filter(|c| before.tally.count(**c) + after.tally.count(**c) > 0)
            .map(|c| row(c.to_string(), before.tally.count(*c), after.tally.count(*c)))
            .collect();
        let kernel_drop = match (kernel_drops(before), kernel_drops(after)) {
            (Some(b), Some(a)) => Some(row("kernel conntrack drop counter".into(), b, a)),
            _ => None,
        };
        let hosts: BTreeSet<&String> = before.probes.keys().chain(after.probes.keys()).collect();
        let probes = hosts
            .into_iter()
            .map(|h| ProbeRow {
                host: h.clone(),
                before: before.probes.get(h).cloned().unwrap_or_default(),
                after: after.probes.get(h).cloned().unwrap_or_default(),
            })
            .collect();
        Comparison {
            before,
            after,
            causes,
            kernel_drop,
            probes,
        }
    }

    fn conntrack_rates(&self) -> (f64, f64) {
        let n = |r: &Report| {
            Cause::ALL
                .iter()
                .filter(|c| c.is_conntrack())
                .map(|c| r.tally.count(*c))
                .sum::<u64>()
        };
        (
            self.before.rate(n(self.before)),
            self.after.rate(n(self.after)),
        )
    }

    /// One sentence: what the operator came to learn.
    pub fn verdict(&self) -> String {
        let (b, a) = self.conntrack_rates();
        let mut v = match change(b, a).as_str() {
            "none" => "no conntrack drops before or after".to_string(),
            "stopped" => format!("conntrack drops stopped ({}/s before, none after)", rate(b)),
            other => format!(
                "conntrack drops {other} ({}/s before, {}/s after)",
                rate(b),
                rate(a)
            ),
        };
        let (sb, lb, sa, la) = self.probes.iter().fold((0, 0, 0, 0), |acc, p| {
            (
                acc.0 + p.before.sent,
                acc.1 + p.before.lost,
                acc.2 + p.after.sent,
                acc.3 + p.after.lost,
            )
        });
        if sb + sa > 0 {
            let pct = |l: u64, s: u64| {
                if s == 0 {
                    0.0
                } else {
                    100.0 * l as f64 / s as f64
                }
            };
            let _ = write!(
                v,
                "; probe loss {:.1}% before, {:.1}% after",
                pct(lb, sb),
                pct(la, sa)
            );
        }
        for r in [self.before, self.after] {
            if !r.complete() {
                let _ = write!(v, "; {} is incomplete", r.path.display());
            }
        }
        v
    }

    pub fn to_json(&self) -> Value {
        let side = |r: &Report| {
            json!({
                "file": r.path.display().to_string(), "complete": r.complete(), "duration_s": r.duration_s(),
                "drops_total": r.tally.total, "drops_per_s": r.rate(r.tally.total), "events_lost": r.events_lost(),
            })
        };
        let row = |r: &Row| {
            json!({
                "before": r.before, "after": r.after, "before_per_s": r.before_per_s, "after_per_s": r.after_per_s,
                "change": change(r.before_per_s, r.after_per_s),
            })
        };
        let causes: serde_json::Map<String, Value> = self
            .causes
            .iter()
            .map(|r| (r.what.clone(), row(r)))
            .collect();
        let probes: serde_json::Map<String, Value> = self
            .probes
            .iter()
            .map(|p| {
                (
                    p.host.clone(),
                    json!({
                        "before": {"sent": p.before.sent, "lost": p.before.lost, "loss_pct": p.before.loss_pct()},
                        "after": {"sent": p.after.sent, "lost": p.after.lost, "loss_pct": p.after.loss_pct()},
                        "change": change(p.before.loss_pct(), p.after.loss_pct()),
                    }),
                )
            })
            .collect();
        let (cb, ca) = self.conntrack_rates();
        json!({
            "kind": "comparison",
            "before": side(self.before),
            "after": side(self.after),
            "causes": causes,
            "conntrack_drops": {"before_per_s": cb, "after_per_s": ca, "change": change(cb, ca)},
            "kernel_drop_counter": self.kernel_drop.as_ref().map(row),
            "probes": probes,
            "verdict": self.verdict(),
        })
    }

    pub fn render(&self, md: bool) -> String {
        let mut o = String::new();
        if md {
            let _ = writeln!(o, "## ctdrop before/after\n");
        } else {
            let _ = writeln!(o, "ctdrop before/after");
        }
        let bullet = if md { "- " } else { "  " };
        for (label, r) in [("before", self.before), ("after", self.after)] {
            let _ = writeln!(
                o,
                "{bullet}{label}: {} ({:.1} s from {}, {} drops{})",
                r.path.display(),
                r.duration_s(),
                super::text::date(r.header.started_wall_ns),
                r.tally.total,
                if r.complete() {
                    ""
                } else {
                    ", INCOMPLETE: trailer missing"
                }
            );
        }
        let _ = writeln!(o);
        let mut rows = vec![vec![
            "drops per second".to_string(),
            "before".into(),
            "after".into(),
            "change".into(),
        ]];
        for r in self.causes.iter().chain(self.kernel_drop.as_ref()) {
            rows.push(vec![
                r.what.clone(),
                rate(r.before_per_s),
                rate(r.after_per_s),
                change(r.before_per_s, r.after_per_s),
            ]);
        }
        if rows.len() == 1 {
            rows.push(vec![
                "(no drops)".into(),
                "0".into(),
                "0".into(),
                "none".into(),
            ]);
        }
        o += &grid(&rows, md);
        if !self.probes.is_empty() {
            let _ = writeln!(o);
            let mut rows = vec![vec![
                "probe loss".to_string(),
                "before".into(),
                "after".into(),
                "change".into(),
            ]];
            for p in &self.probes {
                rows.push(vec![
                    p.host.clone(),
                    p.before.loss_text(),
                    p.after.loss_text(),
                    change(p.before.loss_pct(), p.after.loss_pct()),
                ]);
            }
            o += &grid(&rows, md);
        }
        let _ = writeln!(
            o,
            "\n{}{}",
            if md { "**Verdict:** " } else { "verdict: " },
            self.verdict()
        );
        o
    }
}

#[cfg(test)]
mod tests {
    use super::change;

    #[test]
    fn changes_are_named() {
        assert_eq!(change(0.0, 0.0), "none");
        assert_eq!(change(400.0, 0.0), "stopped");
        assert_eq!(change(0.0, 3.0), "new");
        assert_eq!(change(400.0, 100.0), "down 75%");
        assert_eq!(change(100.0, 150.0), "up 50%");
        assert_eq!(change(2.0, 2.0), "unchanged");
    }
}
