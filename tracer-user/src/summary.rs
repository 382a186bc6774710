//! End-of-run summary: totals, top flows, kernel counter cross-check,
//! probe verdicts. One value, rendered as text or JSON; built once by the
//! session's `finish()` for every mode.
//!
//! It borrows the parts of the run it reports (tally, matcher, snapshots,
//! advice), not the session's collector: outputs render it, and the session
//! drives outputs, so this module stays below both.

use std::{collections::BTreeMap, io::Write, time::Duration};

pub use crate::model::summary::{CtEvents, EchoLoss, FlowSamplingLine, MechanismLine, SummaryLine};
use crate::{
    advice::Advice,
    cause::Cause,
    conntrack::{netns::NsRegistry, occupancy::Occupancy, stats::CounterCheck},
    events::decode::proto_name,
    flows::Tally,
    kernel::attach::KernelStats,
    model::{
        report::{CounterAgreement, TopFlow},
        SummaryKind,
    },
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
    /// The JSON object (`kind: summary`): [`SummaryLine`] as a value, so
    /// its keys come out sorted as they always have.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self.line()).unwrap_or_default()
    }

    /// The typed summary object every JSON output writes.
    pub fn line(&self) -> SummaryLine<'_> {
        let t = self.tally;
        let names = self.names;
        SummaryLine {
            kind: SummaryKind::Tag,
            duration_s: self.elapsed.as_secs_f64(),
            drops_total: t.total,
            drops_by_cause: t.by_cause_map(),
            drops_by_netns: t.by_netns_map(),
            inferred_by_budget: self.inferred_by_budget,
            // Keys above stay inodes (a contract); names, as every output shows them:
            netns_names: t
                .by_netns
                .keys()
                .flatten()
                .map(|ns| (ns.to_string(), names.display_name(*ns)))
                .collect(),
            events_lost: self.stats.lost,
            events_sent: self.stats.sent,
            kfree_skb_skipped: self.stats.skipped_runs,
            decode_errors: self.decode_errors,
            flows_tracked: t.flows_tracked(),
            flows_untracked: t.flows_untracked,
            top_flows: top_flows(t, 10, self.boot_offset),
            flow_sampling: t.flow_sampling.map(|s| FlowSamplingLine {
                one_in: s.one_in,
                sampled_drops: s.sampled_drops,
                estimated: s.estimated(),
            }),
            kernel_counters: self.checks.iter().map(agreement).collect(),
            filtered: self.filtered,
            probes: (!self.probe_labels.is_empty()).then(|| {
                self.probe_labels
                    .iter()
                    .zip(&self.matcher.stats)
                    .map(|(label, s)| (label.as_str(), s))
                    .collect()
            }),
            tier: if self.probes_attached {
                "kprobe"
            } else {
                "tracepoint"
            },
            mechanisms: self
                .mechanisms
                .iter()
                .map(|m| MechanismLine {
                    signal: m.signal,
                    mechanism: m.chosen.as_deref(),
                    note: &m.note,
                })
                .collect(),
            conntrack_events: self
                .ct_events
                .iter()
                .map(|(ns, c)| CtEvents {
                    netns: *ns,
                    counts: *c,
                })
                .collect(),
            echo_losses: self.echo_losses(),
            echo_losses_not_kept: self.matcher.passive_overflow,
            occupancy: self.occupancy.values().collect(),
            advice: crate::advice::to_json(self.advice),
        }
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
                writeln!(out, "  {:<26} {:>10}", self.names.label(*ns), n.total)?;
            }
        }
        let top = t.top_flows(5);
        let estimated = t.flow_sampling.filter(|f| f.estimated());
        if !top.is_empty() {
            match estimated {
                Some(f) => writeln!(
                    out,
                    "top flows (estimated from {} drops sampled 1 in {}: ~ = sampled drops x {}; totals above count every drop):",
                    f.sampled_drops, f.one_in, f.one_in
                )?,
                None => writeln!(out, "top flows:")?,
            }
            for (id, s) in top {
                let ports = if id.sport != 0 || id.dport != 0 {
                    format!(" {} -> {}", id.sport, id.dport)
                } else {
                    String::new()
                };
                let drops = match estimated {
                    Some(_) => format!("~{}", s.drops),
                    None => s.drops.to_string(),
                };
                writeln!(
                    out,
                    "  {:>8}  {} {} -> {}{}  {}",
                    drops,
                    proto_name(id.proto),
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
                "  ({}{} drops in flows beyond --max-flows, counted in totals only)",
                if estimated.is_some() { "~" } else { "" },
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

    /// Echo requests of pings ctdrop did not send, dropped here: per
    /// (src, dst, id) the lost seqs and their causes.
    fn echo_losses(&self) -> Vec<EchoLoss> {
        self.matcher
            .passive_groups()
            .map(|(src, dst, id, g)| {
                let mut causes = BTreeMap::<&str, u64>::new();
                for (_, c) in &g.seqs {
                    *causes.entry(c.as_str()).or_default() += 1;
                }
                EchoLoss {
                    src: src.to_string(),
                    dst: dst.to_string(),
                    icmp_id: id,
                    lost_seqs: g.seqs.iter().map(|s| s.0).collect(),
                    causes,
                }
            })
            .collect()
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

/// The `top` flows by drops, their times on the wall clock: the summary's
/// and a capture report's `top_flows`.
pub fn top_flows(t: &Tally, top: usize, boot_offset_ns: u64) -> Vec<TopFlow> {
    t.top_flows(top)
        .into_iter()
        .map(|(id, s)| TopFlow {
            netns: id.netns,
            proto: proto_name(id.proto),
            src: id.src,
            dst: id.dst,
            sport: id.sport,
            dport: id.dport,
            drops: s.drops,
            cause: s.main_cause(),
            first_ts_ns: s.first_ns + boot_offset_ns,
            last_ts_ns: s.last_ns + boot_offset_ns,
            sampled_drops: t
                .flow_sampling
                .filter(|f| f.estimated())
                .map(|f| s.drops / f.one_in as u64),
        })
        .collect()
}

/// One namespace's counter check as the summary and a report write it.
pub fn agreement(c: &CounterCheck) -> CounterAgreement {
    CounterAgreement {
        netns: c.netns,
        netns_name: c.netns_name.clone(),
        drop: c.delta.get("drop"),
        insert_failed: c.delta.get("insert_failed"),
        early_drop: c.delta.get("early_drop"),
        entries: c.delta.entries(),
        table_full_records: c.table_full,
        insert_failed_records: c.insert_failed,
        agree: c.agrees(),
        unrecorded: c.unrecorded(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        conntrack::stats::CtCounters,
        flows::{FlowId, FlowSampling, FlowStat},
        kernel::tier::Mechanism,
    };

    /// A run with a drop of every kind the summary reports on.
    fn with_summary<R>(f: impl FnOnce(&Summary) -> R) -> R {
        with_sampled_summary(None, f)
    }

    /// The same run in count mode with per-flow detail sampled as `sampling`
    /// says (the flow's 5 drops sampled, shown scaled).
    fn with_sampled_summary<R>(sampling: Option<FlowSampling>, f: impl FnOnce(&Summary) -> R) -> R {
        let scale = sampling.map_or(1, |s| s.one_in as u64);
        let mut tally = Tally::new(10);
        tally.flow_sampling = sampling;
        tally.add_counted(Some(7), 12, Cause::ConntrackTableFull, 5);
        tally.add_counted(None, 2, Cause::Other, 1);
        let mut by_cause = [0u64; Cause::ALL.len()];
        by_cause[0] = 5;
        tally.add_flow(
            FlowId {
                netns: Some(7),
                proto: 17,
                src: Some("198.18.0.1".parse().unwrap()),
                dst: Some("198.18.0.2".parse().unwrap()),
                sport: 1000,
                dport: 53,
            },
            FlowStat {
                drops: 5 * scale,
                bytes: 300 * scale,
                first_ns: 10,
                last_ns: 20,
                by_cause,
            },
        );
        let names = NsRegistry::new();
        let matcher = Matcher::new(vec!["198.18.0.2".parse().unwrap()], 1_000_000_000);
        let labels = vec!["198.18.0.2".to_string()];
        let occupancy = BTreeMap::new();
        let delta = CtCounters {
            columns: [
                ("drop", 5),
                ("insert_failed", 0),
                ("early_drop", 1),
                ("entries", 64),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
        };
        let checks = [CounterCheck {
            netns: 7,
            netns_name: Some("recv".into()),
            delta,
            table_full: 5,
            insert_failed: 0,
        }];
        let ct_events = [(7, tracer_common::CtEventCounts::default())];
        let mechanisms = [Mechanism {
            signal: "drops",
            chosen: Some("tp_btf/kfree_skb".into()),
            note: String::new(),
        }];
        let s = Summary {
            tally: &tally,
            names: &names,
            matcher: &matcher,
            probe_labels: &labels,
            occupancy: &occupancy,
            advice: &[],
            inferred_by_budget: 2,
            decode_errors: 0,
            boot_offset: 1000,
            probes_attached: false,
            stats: KernelStats {
                sent: 6,
                ..Default::default()
            },
            elapsed: Duration::from_millis(1500),
            checks: &checks,
            filtered: false,
            ct_events: &ct_events,
            mechanisms: &mechanisms,
        };
        f(&s)
    }

    /// The line the pre-typed `json!` code wrote for this run (checked
    /// byte for byte against it when the struct replaced it): keys sorted,
    /// nulls kept.
    #[test]
    fn the_summary_object_keeps_its_keys_and_values() {
        let j = with_summary(|s| serde_json::to_string(&s.to_json()).unwrap());
        assert_eq!(j, GOLDEN);
    }

    /// The sampled run's summary as JSON and as text.
    fn json_and_text(sampling: FlowSampling) -> (serde_json::Value, String) {
        with_sampled_summary(Some(sampling), |s| {
            let mut text = Vec::new();
            s.write_human(&mut text).unwrap();
            (s.to_json(), String::from_utf8(text).unwrap())
        })
    }

    #[test]
    fn sampled_flows_are_labelled_estimates_in_json_and_text() {
        let sampling = FlowSampling {
            one_in: 16,
            sampled_drops: 5,
        };
        let (j, text) = json_and_text(sampling);
        assert_eq!(
            j["flow_sampling"],
            serde_json::json!({"one_in": 16, "sampled_drops": 5, "estimated": true})
        );
        let top = &j["top_flows"][0];
        assert_eq!(
            (top["drops"].as_u64(), top["sampled_drops"].as_u64()),
            (Some(80), Some(5))
        );
        // Totals are not scaled: they count every drop.
        assert_eq!(j["drops_total"], 6);
        assert!(
            text.contains("top flows (estimated from 5 drops sampled 1 in 16"),
            "{text}"
        );
        assert!(
            text.contains("     ~80  udp 198.18.0.1 -> 198.18.0.2"),
            "{text}"
        );

        // Every drop sampled: exact counts, said so, and no per-flow label.
        let every = FlowSampling {
            one_in: 1,
            sampled_drops: 5,
        };
        let (j, text) = json_and_text(every);
        assert_eq!(j["flow_sampling"]["estimated"], false);
        assert!(j["top_flows"][0].get("sampled_drops").is_none(), "{j}");
        assert!(text.contains("top flows:\n         5  udp"), "{text}");
    }

    const GOLDEN: &str = r#"{"advice":[],"conntrack_events":[{"alloc_failed":0,"clash_resolved":0,"confirm_dropped":0,"early_drop_evicted":0,"early_drop_failed":0,"in_dropped":0,"inserts":0,"invalid":0,"netns":7}],"decode_errors":0,"drops_by_cause":{"conntrack_insert_failed":0,"conntrack_invalid":0,"conntrack_table_full":5,"icmp_error_blocked":0,"netfilter_rule":0,"other":1},"drops_by_netns":{"7":5,"unknown":1},"drops_total":6,"duration_s":1.5,"echo_losses":[],"echo_losses_not_kept":0,"events_lost":0,"events_sent":6,"filtered":false,"flows_tracked":1,"flows_untracked":0,"inferred_by_budget":2,"kernel_counters":[{"agree":true,"drop":5,"early_drop":1,"entries":64,"insert_failed":0,"insert_failed_records":0,"netns":7,"netns_name":"recv","table_full_records":5,"unrecorded":0}],"kfree_skb_skipped":0,"kind":"summary","mechanisms":[{"mechanism":"tp_btf/kfree_skb","note":"","signal":"drops"}],"netns_names":{"7":null},"occupancy":[],"probes":{"198.18.0.2":{"answered":0,"late":0,"lost":0,"lost_by_cause":{},"lost_unexplained":0,"sent":0}},"tier":"tracepoint","top_flows":[{"cause":"conntrack_table_full","dport":53,"drops":5,"dst":"198.18.0.2","first_ts_ns":1010,"last_ts_ns":1020,"netns":7,"proto":"udp","sport":1000,"src":"198.18.0.1"}]}"#;
}
