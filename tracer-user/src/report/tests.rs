//! Reports from synthetic captures: the numbers, the kernel cross-check,
//! what is said when the trailer is missing, and before/after.

use std::path::Path;

use super::{compare::Comparison, json::to_json, text::render, Report};
use crate::{
    capture::{
        meta::Trailer,
        tests::{capture_with, drop_no, trailer},
        CaptureReader,
    },
    cause::Cause,
};

/// 20 drops 0.3 s apart in namespace 7 ("recv"): 15 table-full, 5 rule.
fn report(end: Option<Trailer>) -> Report {
    report_of(20, end)
}

fn report_of(n: u64, end: Option<Trailer>) -> Report {
    let bytes = capture_with(n, 6, end);
    Report::build(
        Path::new("t.ctdrop"),
        CaptureReader::new(&bytes[..]).unwrap(),
        |_| {},
    )
}

#[test]
fn counts_by_cause_namespace_interface_second_and_probe() {
    let r = report(Some(trailer(20, 15)));
    assert!(r.complete());
    assert_eq!(r.tally.total, 20);
    assert_eq!(
        (
            r.tally.count(Cause::ConntrackTableFull),
            r.tally.count(Cause::NetfilterRule)
        ),
        (15, 5)
    );
    assert_eq!(r.per_second, vec![4, 3, 3, 4, 3, 3]);
    assert_eq!(r.netns_label(Some(7)), "recv (7)");
    assert_eq!(r.ifname(Some(7), 7), "veth1");
    let p = &r.probes["198.18.0.2"];
    assert_eq!(
        (p.sent, p.lost, p.lost_by_cause["conntrack_table_full"]),
        (1, 1, 1)
    );
    let checks = r.counter_checks().unwrap();
    assert_eq!(checks.len(), 1);
    assert!(checks[0].agrees());
    let j = to_json(&r, 10);
    assert_eq!(j["kernel_counters_agree"], true);
    assert_eq!(j["drops_by_cause"]["conntrack_table_full"], 15);
    assert_eq!(j["drops_per_second"], serde_json::json!([4, 3, 3, 4, 3, 3]));
    assert_eq!(j["stopped"], serde_json::Value::Null);
}

#[test]
fn kernel_counts_that_differ_are_called_out() {
    let r = report(Some(trailer(20, 16)));
    assert!(!r.counter_checks().unwrap()[0].agrees());
    assert_eq!(to_json(&r, 10)["kernel_counters_agree"], false);
    let t = render(&r, 10, false);
    assert!(t.contains("DIFFER by 1"), "{t}");
    assert!(t.contains("the kernel's counts and ctdrop's DIFFER"), "{t}");
}

#[test]
fn without_trailer_the_records_give_duration_and_events_lost() {
    let r = report(None);
    assert!(!r.complete());
    assert!((r.duration_s() - 5.7).abs() < 1e-6, "{}", r.duration_s());
    assert_eq!(r.events_lost(), Some(0), "from the checkpoint");
    assert!(r.counter_checks().is_none());
    let t = render(&r, 10, false);
    assert!(t.contains("WARNING: trailer missing"), "{t}");
    assert!(
        t.contains("unknown: the trailer with the counters at the end is missing"),
        "{t}"
    );
    let j = to_json(&r, 10);
    assert!(j["stopped"].as_str().unwrap().contains("trailer missing"));
    assert_eq!(j["kernel_counters"], serde_json::Value::Null);
}

#[test]
fn markdown_is_a_ticket_ready_table() {
    let md = render(&report(Some(trailer(20, 15))), 10, true);
    assert!(
        md.starts_with("## ctdrop capture report: `t.ctdrop`"),
        "{md}"
    );
    assert!(md.contains("| conntrack_table_full | 15 | 75.0% |"), "{md}");
    assert!(md.contains("### Kernel counters"), "{md}");
    assert!(
        !md.contains("\n  "),
        "no terminal indentation in markdown:\n{md}"
    );
}

#[test]
fn a_fix_that_ends_the_drops_reads_stopped() {
    let before = report(Some(trailer(20, 15)));
    let after = report_of(0, Some(trailer(0, 0)));
    let c = Comparison::new(&before, &after);
    assert!(
        c.verdict().starts_with("conntrack drops stopped"),
        "{}",
        c.verdict()
    );
    let j = c.to_json();
    assert_eq!(j["causes"]["conntrack_table_full"]["before"], 15);
    assert_eq!(j["causes"]["conntrack_table_full"]["change"], "stopped");
    assert_eq!(j["kernel_drop_counter"]["before"], 15);
    assert_eq!(j["kernel_drop_counter"]["after"], 0);
    assert_eq!(j["probes"]["198.18.0.2"]["before"]["loss_pct"], 100.0);
    let same = Comparison::new(&before, &before);
    assert!(
        same.verdict().starts_with("conntrack drops unchanged"),
        "{}",
        same.verdict()
    );
}

#[test]
fn metrics_from_a_capture_carry_the_drop_counts() {
    let r = report(Some(trailer(20, 15)));
    let (mut udp, mut none) = (0, 0);
    for i in 0..20 {
        let (ev, cause) = drop_no(i);
        if cause == Cause::ConntrackTableFull {
            if ev.flow.is_some() {
                udp += 1
            } else {
                none += 1
            }
        }
    }
    let text = r.metrics().encode_classic();
    assert!(text.contains(&format!("ctdrop_drops_total{{cause=\"conntrack_table_full\",netns=\"recv\",proto=\"udp\"}} {udp}\n")), "{text}");
    assert!(text.contains(&format!("ctdrop_drops_total{{cause=\"conntrack_table_full\",netns=\"recv\",proto=\"none\"}} {none}\n")), "{text}");
    assert!(
        text.contains(
            "ctdrop_probes_lost_total{host=\"198.18.0.2\",cause=\"conntrack_table_full\"} 1\n"
        ),
        "{text}"
    );
    assert!(
        text.contains("ctdrop_conntrack_stat_total{netns=\"recv\",counter=\"drop\"} 20\n"),
        "end value: {text}"
    );
}
