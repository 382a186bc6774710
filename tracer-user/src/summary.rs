//! End-of-run summary: totals, top flows, kernel counter cross-check,
//! probe verdicts. One value, rendered as text or JSON; built once by the
//! session's `finish()` for every mode.
//!
//! It borrows the parts of the run it reports (tally, matcher, snapshots,
//! advice), not the session's collector: outputs render it, and the session
//! drives outputs, so this module stays below both.

use std::{collections::BTreeMap, io::Write, time::Duration};

use crate::{
    advice::Advice,
    cause::Cause,
    conntrack::{netns::NsRegistry, occupancy::Occupancy, stats::CounterCheck},
    flows::Tally,
    kernel::attach::KernelStats,
    probe::Matcher,
};

pub struct Summary<'a> {
    pub tally: &'a Tally,
    /// Names namespaces, as every output does.
    pub names: &'a NsRegistry,
    /// Probe verdict counts and passive echo-loss groups.
    pub matcher: &'a Matcher,
    pub probe_labels: &'a [String],
    /// Per namespace, the fullest table snapshot taken.
    pub occupancy: &'a BTreeMap<u32, Occupancy>,
    pub advice: &'a [Advice],
    /// Records whose cause the `drop` counter budget decided.
    pub inferred_by_budget: u64,
    pub decode_errors: u64,
    /// CLOCK_REALTIME minus CLOCK_MONOTONIC.
    pub boot_offset: u64,
    /// Conntrack probes were attached (tier kprobe).
    pub probes_attached: bool,
    pub stats: KernelStats,
    pub elapsed: Duration,
    pub checks: &'a [CounterCheck],
    /// A filter was set: counts cover only matching packets.
    pub filtered: bool,
    /// Conntrack path events per namespace (probe tier).
    pub ct_events: &'a [(u32, tracer_common::CtEventCounts)],
    pub mechanisms: &'a [crate::kernel::tier::Mechanism],
}

impl Summary<'_> {
    pub fn to_json(&self) -> serde_json::Value {
        let t = &self.tally;
        let by_cause: serde_json::Map<String, serde_json::Value> = Cause::ALL
            .iter()
            .map(|c| (c.as_str().to_string(), t.count(*c).into()))
            .collect();
        let by_netns: serde_json::Map<String, serde_json::Value> = t
            .by_netns
            .iter()
            .map(|(ns, n)| {
                (
                    ns.map(|x| x.to_string())
                        .unwrap_or_else(|| "unknown".into()),
                    n.total.into(),
                )
            })
            .collect();
        // Keys above stay inodes (a contract); names, as every output shows them:
        let names = self.names;
        let netns_names: serde_json::Map<String, serde_json::Value> = t
            .by_netns
            .keys()
            .flatten()
            .map(|ns| (ns.to_string(), names.display_name(*ns).into()))
            .collect();
        let top: Vec<serde_json::Value> = t
            .top_flows(10)
            .into_iter()
            .map(|(id, s)| {
                serde_json::json!({
                    "netns": id.netns, "proto": crate::events::decode::proto_name(id.proto),
                    "src": id.src.map(|a| a.to_string()), "dst": id.dst.map(|a| a.to_string()),
                    "sport": id.sport, "dport": id.dport, "drops": s.drops, "cause": s.main_cause().as_str(),
                    "first_ts_ns": s.first_ns + self.boot_offset, "last_ts_ns": s.last_ns + self.boot_offset,
                })
            })
            .collect();
        let checks: Vec<serde_json::Value> = self
            .checks
            .iter()
            .map(|c| {
                serde_json::json!({
                    "netns": c.netns, "netns_name": c.netns_name,
                    "drop": c.delta.get("drop"), "insert_failed": c.delta.get("insert_failed"),
                    "early_drop": c.delta.get("early_drop"), "entries": c.delta.entries(),
                    "table_full_records": c.table_full, "insert_failed_records": c.insert_failed,
                    "agree": c.agrees(), "unrecorded": c.unrecorded(),
                })
            })
            .collect();
        serde_json::json!({
            "kind": "summary",
            "duration_s": self.elapsed.as_secs_f64(),
            "drops_total": t.total,
            "drops_by_cause": by_cause,
            "drops_by_netns": by_netns,
            "inferred_by_budget": self.inferred_by_budget,
            "netns_names": netns_names,
            "events_lost": self.stats.lost,
            "events_sent": self.stats.sent,
            "decode_errors": self.decode_errors,
            "flows_tracked": t.flows_tracked(),
            "flows_untracked": t.flows_untracked,
            "top_flows": top,
            "kernel_counters": checks,
            "filtered": self.filtered,
            "probes": self.probes_json(),
            "tier": if self.probes_attached { "kprobe" } else { "tracepoint" },
            "mechanisms": self.mechanisms.iter().map(|m| serde_json::json!({"signal": m.signal, "mechanism": m.chosen, "note": m.note})).collect::<Vec<_>>(),
            "conntrack_events": self.ct_events.iter().map(|(ns, c)| serde_json::json!({
                "netns": ns, "inserts": c.inserts, "early_drop_evicted": c.early_drop_evicted,
                "early_drop_failed": c.early_drop_failed, "alloc_failed": c.alloc_failed,
                "confirm_dropped": c.confirm_dropped, "clash_resolved": c.clash_resolved,
                "in_dropped": c.in_dropped, "invalid": c.invalid,
            })).collect::<Vec<_>>(),
            "echo_losses": self.echo_losses_json(),
            "echo_losses_not_kept": self.matcher.passive_overflow,
            "occupancy": self.occupancy.values().map(|o| o.to_json()).collect::<Vec<_>>(),
            "advice": crate::advice::to_json(self.advice),
        })
    }

    pub fn write_human(&self, out: &mut dyn Write) -> std::io::Result<()> {
        let t = &self.tally;
        writeln!(out)?;
        writeln!(
            out,
            "ctdrop summary: {:.1} s, {} drops, {} events lost{}",
            self.elapsed.as_secs_f64(),
            t.total,
            self.stats.lost,
            if self.stats.lost > 0 {
                " (ring buffer full: raise --ring-size)"
            } else {
                ""
            }
        )?;
        writeln!(out, "by cause:")?;
        for c in Cause::ALL {
            let n = t.count(c);
            if n > 0 {
                writeln!(out, "  {:<26} {n:>10}", c.as_str())?;
            }
        }
        if self.inferred_by_budget > 0 {
            writeln!(
                out,
                "  ({} records' cause decided by the namespace's `drop` counter budget, not per packet: evidence inferred:drop_counter)",
                self.inferred_by_budget
            )?;
        }
        if !t.by_netns.is_empty() {
            writeln!(out, "by namespace:")?;
            for (ns, n) in &t.by_netns {
                writeln!(
                    out,
                    "  {:<26} {:>10}",
                    self.names.label(*ns),
                    n.total
                )?;
            }
        }
        let top = t.top_flows(5);
        if !top.is_empty() {
            writeln!(out, "top flows:")?;
            for (id, s) in top {
                let ports = if id.sport != 0 || id.dport != 0 {
                    format!(" {} -> {}", id.sport, id.dport)
                } else {
                    String::new()
                };
                writeln!(
                    out,
                    "  {:>8}  {} {} -> {}{}  {}",
                    s.drops,
                    crate::events::decode::proto_name(id.proto),
                    id.src.map(|a| a.to_string()).unwrap_or_else(|| "?".into()),
                    id.dst.map(|a| a.to_string()).unwrap_or_else(|| "?".into()),
                    ports,
                    s.main_cause()
                )?;
            }
        }
        if t.flows_untracked > 0 {
            writeln!(
                out,
                "  ({} drops in flows beyond --max-flows, counted in totals only)",
                t.flows_untracked
            )?;
        }
        self.write_probes_human(out)?;
        for (ns, c) in self.ct_events {
            writeln!(
                out,
                "conntrack events in {}: {} inserted, {} evicted by early_drop ({} found nothing), {} allocations failed, {} confirm drops, {} clashes resolved, {} invalid",
                self.names.label(Some(*ns)),
                c.inserts, c.early_drop_evicted, c.early_drop_failed, c.alloc_failed, c.confirm_dropped, c.clash_resolved, c.invalid
            )?;
        }
        for c in self.checks {
            let name = crate::conntrack::netns::label(Some(c.netns), c.netns_name.as_deref());
            let verdict = if c.agrees() {
                "agrees".to_string()
            } else if self.stats.lost > 0 && c.unrecorded() <= self.stats.lost {
                format!(
                    "{} drops have no record: {} events were lost (ring buffer full)",
                    c.unrecorded(),
                    self.stats.lost
                )
            } else if self.filtered {
                "differs (a filter is set: only matching packets were traced)".to_string()
            } else {
                format!(
                    "DIFFERS: kernel counted {} conntrack drops, ctdrop attributed {}",
                    c.delta.get("drop"),
                    c.table_full + c.insert_failed
                )
            };
            writeln!(
                out,
                "kernel counters in {name}: drop +{}, insert_failed +{}, early_drop +{}, entries {} -- {verdict}",
                c.delta.get("drop"),
                c.delta.get("insert_failed"),
                c.delta.get("early_drop"),
                c.delta.entries()
            )?;
        }
        for o in self.occupancy.values() {
            o.write_human(out)?;
        }
        crate::advice::write_human(self.advice, out)?;
        Ok(())
    }

    fn probes_json(&self) -> serde_json::Value {
        if self.probe_labels.is_empty() {
            return serde_json::Value::Null;
        }
        let mut obj = serde_json::Map::new();
        for (i, label) in self.probe_labels.iter().enumerate() {
            let s = &self.matcher.stats[i];
            obj.insert(
                label.clone(),
                serde_json::json!({
                    "sent": s.sent, "answered": s.answered, "lost": s.lost, "late": s.late,
                    "lost_by_cause": s.lost_by_cause, "lost_unexplained": s.lost_unexplained,
                }),
            );
        }
        obj.into()
    }

    /// Echo requests of pings ctdrop did not send, dropped here: per
    /// (src, dst, id) the lost seqs and their causes.
    fn echo_losses_json(&self) -> serde_json::Value {
        let groups: Vec<serde_json::Value> = self
            .matcher
            .passive_groups()
            .map(|(src, dst, id, g)| {
                let mut causes = std::collections::BTreeMap::<&str, u64>::new();
                for (_, c) in &g.seqs {
                    *causes.entry(c.as_str()).or_default() += 1;
                }
                serde_json::json!({
                    "src": src.to_string(), "dst": dst.to_string(), "icmp_id": id,
                    "lost_seqs": g.seqs.iter().map(|s| s.0).collect::<Vec<_>>(), "causes": causes,
                })
            })
            .collect();
        groups.into()
    }

    fn write_probes_human(&self, out: &mut dyn Write) -> std::io::Result<()> {
        if !self.probe_labels.is_empty() {
            writeln!(out, "probes:")?;
        }
        for (i, label) in self.probe_labels.iter().enumerate() {
            let s = &self.matcher.stats[i];
            let mut parts: Vec<String> = s
                .lost_by_cause
                .iter()
                .map(|(c, n)| format!("{n} {c}"))
                .collect();
            if s.lost_unexplained > 0 {
                parts.push(format!(
                    "{} with no drop seen on this host",
                    s.lost_unexplained
                ));
            }
            writeln!(
                out,
                "  {label}: sent {}, answered {}, lost {}{}{}",
                s.sent,
                s.answered,
                s.lost,
                if s.lost > 0 {
                    format!(" ({})", parts.join(", "))
                } else {
                    String::new()
                },
                if s.late > 0 {
                    format!(", {} late replies", s.late)
                } else {
                    String::new()
                }
            )?;
        }
        for (src, dst, id, g) in self.matcher.passive_groups() {
            let seqs: Vec<String> = g.seqs.iter().map(|s| s.0.to_string()).collect();
            writeln!(
                out,
                "echo loss {src} -> {dst} id {id}: seqs {} ({})",
                seqs.join(","),
                g.seqs[0].1
            )?;
        }
        Ok(())
    }
}
