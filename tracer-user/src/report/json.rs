//! A report as one JSON object. Keys shared with the live summary
//! (`drops_total`, `drops_by_cause`, `kernel_counters`, `probes`, ...) have
//! the same names and meaning, so a capture and the live run it recorded
//! compare key by key.

use serde_json::{json, Map, Value};

use super::Report;
use crate::{cause::Cause, events::decode::proto_name};

pub fn to_json(r: &Report, top: usize) -> Value {
    let h = &r.header;
    let t = &r.tally;
    let by_cause: Map<String, Value> = Cause::ALL
        .iter()
        .map(|c| (c.as_str().to_string(), t.count(*c).into()))
        .collect();
    let by_netns: Map<String, Value> = t
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
    let by_interface: Vec<Value> = t
        .by_ifindex
        .iter()
        .map(|((ns, ifx), n)| {
            json!({
                "netns": ns, "netns_name": ns.and_then(|i| r.netns_names.get(&i)),
                "ifindex": ifx, "ifname": r.ifnames.get(&(*ns, *ifx)), "drops": n,
            })
        })
        .collect();
    let top_flows: Vec<Value> = t
        .top_flows(top)
        .into_iter()
        .map(|(id, s)| {
            json!({
                "netns": id.netns, "proto": proto_name(id.proto),
                "src": id.src.map(|a| a.to_string()), "dst": id.dst.map(|a| a.to_string()),
                "sport": id.sport, "dport": id.dport, "drops": s.drops, "cause": s.main_cause().as_str(),
                "first_ts_ns": s.first_ns + h.boot_offset_ns, "last_ts_ns": s.last_ns + h.boot_offset_ns,
            })
        })
        .collect();
    let checks = r.counter_checks().map(|cs| {
        cs.iter()
            .map(|c| {
                json!({
                    "netns": c.netns, "netns_name": c.netns_name,
                    "drop": c.delta.get("drop"), "insert_failed": c.delta.get("insert_failed"),
                    "early_drop": c.delta.get("early_drop"), "entries": c.delta.entries(),
                    "table_full_records": c.table_full, "insert_failed_records": c.insert_failed,
                    "agree": c.agrees(), "unrecorded": c.unrecorded(),
                })
            })
            .collect::<Vec<_>>()
    });
    let agree = r.counter_checks().map(|cs| cs.iter().all(|c| c.agrees()));
    let probes: Value = if r.probes.is_empty() {
        Value::Null
    } else {
        r.probes
            .iter()
            .map(|(host, p)| {
                (
                    host.clone(),
                    json!({
                        "sent": p.sent, "answered": p.answered, "lost": p.lost, "late": p.late,
                        "lost_by_cause": p.lost_by_cause, "lost_unexplained": p.lost_unexplained,
                        "loss_pct": p.loss_pct(), "lost_probes": p.lost_probes,
                    }),
                )
            })
            .collect::<Map<String, Value>>()
            .into()
    };
    let tr = r.trailer();
    json!({
        "kind": "report",
        "file": r.path.display().to_string(),
        "complete": r.complete(),
        "stopped": r.end.describe(),
        "capture": {
            "format_version": h.format_version, "ctdrop_version": h.ctdrop_version, "host": h.host,
            "kernel_release": h.kernel_release, "started_ts_ns": h.started_wall_ns, "ended_ts_ns": r.ended_wall_ns(),
            "mechanisms": h.mechanisms, "filter": h.filter, "headers": h.headers,
            "conntrack_max": h.conntrack_max, "conntrack_buckets": h.conntrack_buckets, "command": h.command,
        },
        "duration_s": r.duration_s(),
        "drops_total": t.total,
        "drops_per_s": r.rate(t.total),
        "drops_by_cause": by_cause,
        "drops_by_netns": by_netns,
        "drops_by_interface": by_interface,
        "drops_per_second": r.per_second,
        "timeline": r.timeline.to_json(),
        "top_flows": top_flows,
        "flows_tracked": t.flows_tracked(),
        "flows_untracked": t.flows_untracked,
        "events_lost": r.events_lost(),
        "events_sent": tr.map(|t| t.events_sent),
        "decode_errors": tr.map(|t| t.decode_errors),
        "kernel_counters": checks,
        "kernel_counters_agree": agree,
        "filtered": h.filter.narrows(),
        "probes": probes,
        "advice": crate::advice::to_json(&r.advice()),
        "occupancy": r.occupancy,
        "watch": tr.and_then(|t| t.watch.as_ref()),
    })
}
