//! The prober's verdicts against real drops: every lost probe carries the
//! drop that ate it, no answered probe ever does.

use std::{thread::sleep, time::Duration};

use ctdrop_tests::{send_udp_flows, ConntrackMaxGuard, Ctdrop, CtdropOutput, Topology};
use serde_json::Value;

fn probes(out: &CtdropOutput) -> Vec<&Value> {
    out.records.iter().filter(|r| r["kind"] == "probe").collect()
}

fn start_pinger(t: &Topology, extra: &[&str]) -> Ctdrop {
    let target = t.receiver_addr.to_string();
    let mut args = vec!["live", "--json", "--ping", &target, "--from-netns", &t.sender.name, "--interval", "200ms", "--timeout", "500ms"];
    args.extend_from_slice(extra);
    Ctdrop::spawn(&args).unwrap()
}

#[test]
fn intermittent_table_full_every_lost_probe_has_exactly_its_drop_and_answered_ones_none() {
    let t = Topology::pair().unwrap();
    t.track_receiver().unwrap();
    let rx = t.receiver.inode().unwrap();
    let _max = ConntrackMaxGuard::set(64).unwrap();
    let c = start_pinger(&t, &[]);
    let mut port = 10000u16;
    for _ in 0..3 {
        sleep(Duration::from_millis(1200));
        send_udp_flows(&t.sender, t.receiver_addr, port, 100).unwrap(); // fill
        port += 100;
        sleep(Duration::from_millis(1500));
        t.receiver.exec(&["conntrack", "-F"]).unwrap(); // drain
    }
    sleep(Duration::from_millis(800));
    let out = c.stop().unwrap();
    let ps = probes(&out);
    let lost: Vec<&&Value> = ps.iter().filter(|p| p["status"] == "lost").collect();
    let ok: Vec<&&Value> = ps.iter().filter(|p| p["status"] == "ok").collect();
    assert!(lost.len() >= 3, "the full table ate too few probes: {} of {}", lost.len(), ps.len());
    assert!(ok.len() >= 3, "too few probes answered between fills: {} of {}", ok.len(), ps.len());
    let echo_drops: Vec<&Value> = out.drops_in(rx).into_iter().filter(|d| d["proto"] == "icmp").collect();
    for p in &lost {
        assert_eq!(p["cause"], "conntrack_table_full", "{p}");
        assert_eq!(p["drop"]["icmp_id"], p["icmp_id"], "{p}");
        assert_eq!(p["drop"]["netns"].as_u64(), Some(rx as u64));
        let n = echo_drops.iter().filter(|d| d["icmp_id"] == p["icmp_id"] && d["icmp_seq"] == p["icmp_seq"]).count();
        assert_eq!(n, 1, "lost probe {} has {n} drop records", p["seq"]);
    }
    for p in &ok {
        assert!(p["drop"].is_null() && p["cause"].is_null(), "{p}");
        let n = echo_drops.iter().filter(|d| d["icmp_id"] == p["icmp_id"]).count();
        assert_eq!(n, 0, "answered probe {} has a drop record", p["seq"]);
    }
    let host = &out.summary().unwrap()["probes"][t.receiver_addr.to_string()];
    assert_eq!(host["lost"].as_u64(), Some(lost.len() as u64));
    assert_eq!(host["answered"].as_u64(), Some(ok.len() as u64));
    assert_eq!(host["lost_by_cause"]["conntrack_table_full"].as_u64(), Some(lost.len() as u64));
    assert_eq!(host["lost_unexplained"], 0);
}

#[test]
fn echo_replies_dropped_by_a_filter_rule_are_explained_on_the_reply_path() {
    let t = Topology::pair().unwrap();
    t.receiver.exec(&["iptables", "-A", "OUTPUT", "-p", "icmp", "--icmp-type", "echo-reply", "-j", "DROP"]).unwrap();
    let rx = t.receiver.inode().unwrap();
    let c = start_pinger(&t, &["--count", "5"]);
    sleep(Duration::from_millis(2000));
    let out = c.stop().unwrap();
    let ps = probes(&out);
    assert_eq!(ps.len(), 5, "{}", out.stdout);
    for p in ps {
        assert_eq!(p["status"], "lost", "{p}");
        assert_eq!(p["cause"], "netfilter_rule", "{p}");
        assert_eq!(p["drop"]["icmp_type"], 0, "the dropped packet is the echo reply: {p}");
        assert_eq!(p["drop"]["netns"].as_u64(), Some(rx as u64), "{p}");
        assert!(p["verdict"].as_str().unwrap().contains("reply dropped"), "{p}");
    }
}

fn ignoring_target_is_down_with_no_drop_seen(extra: &[&str]) {
    let t = Topology::pair().unwrap();
    t.receiver.exec(&["sysctl", "-qw", "net.ipv4.icmp_echo_ignore_all=1"]).unwrap();
    let mut args = vec!["--count", "4"];
    args.extend_from_slice(extra);
    let c = start_pinger(&t, &args);
    sleep(Duration::from_millis(1800));
    let out = c.stop().unwrap();
    let ps = probes(&out);
    assert_eq!(ps.len(), 4, "{}", out.stdout);
    let ids: Vec<&Value> = ps.iter().map(|p| &p["icmp_id"]).collect();
    for p in &ps {
        assert_eq!(p["status"], "lost");
        assert!(p["drop"].is_null(), "{p}");
        assert_eq!(p["verdict"], "no drop seen on this host");
    }
    // The kernel consumes an ignored echo request (icmp_echo returns "not
    // dropped"), so not even --all-reasons sees a drop for these probes.
    let seen = out.drops().iter().filter(|d| ids.contains(&&d["icmp_id"])).count();
    assert_eq!(seen, 0);
}

#[test]
fn target_ignoring_echo_is_down_with_no_drop_seen_on_this_host() {
    ignoring_target_is_down_with_no_drop_seen(&[]);
}

#[test]
fn target_ignoring_echo_shows_no_drop_even_with_all_reasons() {
    ignoring_target_is_down_with_no_drop_seen(&["--all-reasons"]);
}
