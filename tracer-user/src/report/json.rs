//! A report as one JSON object: [`ReportDoc`], built from a [`Report`].

use serde_json::Value;

use super::{ProbeTally, Report};
use crate::{
    model::report::{CaptureInfo, InterfaceDrops, ProbeTotals, ReportDoc},
    summary::{agreement, top_flows},
};

pub fn to_json(r: &Report, top: usize) -> Value {
    serde_json::to_value(doc(r, top)).expect("a report serializes")
}

pub fn doc(r: &Report, top: usize) -> ReportDoc {
    let h = &r.header;
    let t = &r.tally;
    let checks = r.counter_checks();
    let tr = r.trailer();
    ReportDoc {
        kind: Default::default(),
        file: r.path.display().to_string(),
        complete: r.complete(),
        stopped: r.end.describe(),
        capture: CaptureInfo {
            format_version: h.format_version,
            ctdrop_version: h.ctdrop_version.clone(),
            host: h.host.clone(),
            kernel_release: h.kernel_release.clone(),
            started_ts_ns: h.started_wall_ns,
            ended_ts_ns: r.ended_wall_ns(),
            mechanisms: h.mechanisms.clone(),
            filter: h.filter.clone(),
            headers: h.headers,
            conntrack_max: h.conntrack_max,
            conntrack_buckets: h.conntrack_buckets,
            command: h.command.clone(),
        },
        duration_s: r.duration_s(),
        drops_total: t.total,
        drops_per_s: r.rate(t.total),
        drops_by_cause: t
            .by_cause_map()
            .into_iter()
            .map(|(c, n)| (c.to_string(), n))
            .collect(),
        drops_by_netns: t.by_netns_map(),
        drops_by_interface: t
            .by_ifindex
            .iter()
            .map(|((ns, ifx), n)| InterfaceDrops {
                netns: *ns,
                netns_name: ns.and_then(|i| r.netns_names.get(&i)).cloned(),
                ifindex: *ifx,
                ifname: r.ifnames.get(&(*ns, *ifx)).cloned(),
                drops: *n,
            })
            .collect(),
        drops_per_second: r.per_second.clone(),
        timeline: r.timeline.to_json(),
        top_flows: top_flows(t, top, h.boot_offset_ns),
        flows_tracked: t.flows_tracked(),
        flows_untracked: t.flows_untracked,
        events_lost: r.events_lost(),
        events_sent: tr.map(|t| t.events_sent),
        decode_errors: tr.map(|t| t.decode_errors),
        kernel_counters_agree: checks.as_ref().map(|cs| cs.iter().all(|c| c.agrees())),
        kernel_counters: checks.map(|cs| cs.iter().map(agreement).collect()),
        filtered: h.filter.narrows(),
        probes: (!r.probes.is_empty()).then(|| {
            r.probes
                .iter()
                .map(|(host, p)| (host.clone(), totals(p)))
                .collect()
        }),
        advice: crate::advice::to_json(&r.advice()),
        occupancy: r.occupancy.clone(),
        watch: tr.and_then(|t| t.watch.as_deref()).cloned(),
    }
}

fn totals(p: &ProbeTally) -> ProbeTotals {
    ProbeTotals {
        counts: p.counts.clone(),
        loss_pct: p.loss_pct(),
        lost_probes: p.lost_probes.clone(),
    }
}
