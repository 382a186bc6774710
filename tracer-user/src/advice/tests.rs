use std::collections::BTreeMap;

use netlink_packet_netfilter::conntrack::Status;

use super::{
    render::wrap_command,
    rules::{bytes_human, capacity, notrack_candidates},
    *,
};
use crate::{
    cause::Cause,
    conntrack::occupancy::{CtEntry, OccupancyBuilder},
    flows::Tally,
};

fn table(udp_port: u16, udp: u64, tcp: u64, nat: bool) -> Occupancy {
    let mut b = OccupancyBuilder::default();
    let src = "198.18.0.1".parse().unwrap();
    let dst = "198.18.0.2".parse().unwrap();
    for i in 0..udp {
        let st = if nat {
            Status::Confirmed | Status::DstNat
        } else {
            Status::Confirmed
        };
        b.add(&CtEntry {
            proto: 17,
            src,
            dst,
            sport: 1000 + i as u16,
            dport: udp_port,
            tcp_state: None,
            status: st.bits(),
        });
    }
    for i in 0..tcp {
        b.add(&CtEntry {
            proto: 6,
            src,
            dst,
            sport: 2000 + i as u16,
            dport: 8080,
            tcp_state: Some(3),
            status: (Status::Confirmed | Status::SeenReply | Status::Assured).bits(),
        });
    }
    b.finish(5)
}

fn host() -> Host {
    Host {
        module: ModuleKind::BuiltIn,
        entry_bytes: Some(256),
    }
}

fn limits(max: u64) -> Option<CtLimits> {
    Some(CtLimits {
        max,
        buckets: 262144,
    })
}

#[test]
fn commands_paste_into_a_shell() {
    let s = Step::run(
        &[
            "sh",
            "-c",
            "echo 128 > /sys/module/nf_conntrack/parameters/hashsize",
        ],
        false,
    );
    assert_eq!(
        s.command_line().unwrap(),
        "sh -c 'echo 128 > /sys/module/nf_conntrack/parameters/hashsize'"
    );
    assert_eq!(shell_quote("it's"), "'it'\\''s'");
    assert_eq!(bytes_human(128 * 256), "32 KiB");
    assert_eq!(bytes_human(524288 * 256), "128 MiB");
}

#[test]
fn max_covers_peak_with_headroom() {
    assert_eq!(max_for_peak(64), 128);
    assert_eq!(max_for_peak(100), 128);
    assert_eq!(max_for_peak(103), 256);
    assert_eq!(max_for_peak(0), 2);
    for p in [1, 7, 65536, 262144, 300000] {
        assert!(max_for_peak(p) as f64 >= p as f64 * HEADROOM);
    }
}

#[test]
fn one_source_flood_is_limited_at_its_source_and_the_limit_is_not_sized_from_its_drops() {
    // 58 unanswered UDP flows to 5353 and 5 TCP connections, all from
    // 198.18.0.1, fill a 64-entry table; 40 more packets turned away.
    let o = table(5353, 58, 5, false);
    let e = NsEvidence {
        netns: Some(7),
        netns_name: Some("ctdo-b".into()),
        table_full_drops: 40,
        table_full_flows: 40,
        peak_entries: 64,
        occupancy: Some(&o),
        limits: limits(64),
        ..Default::default()
    };
    let a = for_namespace(&e, &host());
    let topics: Vec<&str> = a.iter().map(|a| a.topic).collect();
    assert_eq!(
        topics,
        vec!["limit_origin", "capacity", "notrack"],
        "the source first, before any limit"
    );
    let src = &a[0];
    assert!(
        src.headline
            .starts_with("198.18.0.1 is behind 63 of 63 entries (100%)"),
        "{}",
        src.headline
    );
    let cmds: Vec<String> = src.steps.iter().filter_map(Step::command_line).collect();
    assert_eq!(
        cmds,
        vec![
            "iptables -I INPUT -s 198.18.0.1 -m conntrack --ctstate NEW -m hashlimit --hashlimit-above 50/sec --hashlimit-burst 100 --hashlimit-mode srcip --hashlimit-name ctdrop_src -j DROP",
            "iptables -I INPUT -s 198.18.0.1 -m connlimit --connlimit-above 16 --connlimit-mask 32 -j DROP",
            "conntrack -D -s 198.18.0.1",
        ]
    );
    assert!(src.notes.iter().any(|n| n.contains("find the client")));
    // Sized from what was legitimately held (the 5 answered TCP
    // connections), not from 64 + 40 turned-away flood packets.
    let cap = &a[1];
    assert_eq!(cap.values["legit_entries"], 6);
    assert_eq!(cap.values["change_needed"], false);
    assert_eq!(cap.values["recommended_max"], 64);
    assert!(cap.steps.is_empty(), "{:?}", cap.steps);
    assert!(cap.headline.contains("do not raise it"), "{}", cap.headline);
    let nt = &a[2];
    let cmds: Vec<String> = nt.steps.iter().filter_map(Step::command_line).collect();
    assert!(
        cmds.contains(&"iptables -t raw -A PREROUTING -p udp --dport 5353 -j NOTRACK".to_string())
    );
    assert!(cmds.contains(&"iptables -t raw -A OUTPUT -p udp --sport 5353 -j NOTRACK".to_string()));
    assert!(cmds.contains(&"conntrack -D -p udp --orig-port-dst 5353".to_string()));
    // The ASSURED TCP connections are stateful: never advised away.
    assert!(!cmds.iter().any(|c| c.contains("8080")));
}

#[test]
fn legit_growth_raises_the_limit_from_the_entries_held() {
    // 72 answered connections from 72 clients fill a 72-entry table;
    // 30 more clients were turned away, each once.
    let mut b = OccupancyBuilder::default();
    for i in 0..72u32 {
        let src = IpAddr::from([198, 18, 1, i as u8]);
        b.add(&CtEntry {
            proto: 6,
            src,
            dst: "198.18.0.2".parse().unwrap(),
            sport: 40000,
            dport: 443,
            tcp_state: Some(3),
            status: (Status::Confirmed | Status::SeenReply | Status::Assured).bits(),
        });
    }
    let o = b.finish(5);
    let drop_sources: Vec<(IpAddr, u64)> = (0..3u8)
        .map(|i| (IpAddr::from([198, 18, 2, i]), 1))
        .collect();
    let e = NsEvidence {
        netns: Some(3),
        table_full_drops: 30,
        table_full_flows: 30,
        peak_entries: 72,
        occupancy: Some(&o),
        limits: limits(72),
        drop_sources,
        ..Default::default()
    };
    let a = for_namespace(&e, &host());
    let topics: Vec<&str> = a.iter().map(|a| a.topic).collect();
    // Port 443 holds every entry, but answered: a busy service, not a flood.
    assert_eq!(topics, vec!["capacity"]);
    assert_eq!(a[0].values["observed_peak"], 102);
    assert_eq!(a[0].values["recommended_max"], 128);
    assert_eq!(a[0].values["change_needed"], true);
    assert!(a[0].steps.iter().any(
        |s| s.command_line().as_deref() == Some("sysctl -w net.netfilter.nf_conntrack_max=128")
    ));
}

#[test]
fn idle_big_table_gets_no_capacity_or_notrack_advice_and_says_the_threshold() {
    // The issue's case: 4 entries in a 262,144-entry table.
    let o = table(5353, 2, 2, false);
    let e = NsEvidence {
        netns: Some(1),
        occupancy: Some(&o),
        limits: limits(262144),
        peak_entries: 4,
        ..Default::default()
    };
    let a = for_namespace(&e, &host());
    assert_eq!(
        a.iter().map(|a| a.topic).collect::<Vec<_>>(),
        vec!["headroom"]
    );
    assert!(
        a[0].headline.contains("4 of 262144 entries (0%)"),
        "{}",
        a[0].headline
    );
    assert!(
        a[0].headline.contains("start at 80% of nf_conntrack_max"),
        "{}",
        a[0].headline
    );
    assert!(a[0].steps.is_empty());
    // At 80% the same table is near full: advice comes back.
    let e = NsEvidence {
        limits: limits(5),
        ..e
    };
    assert!(for_namespace(&e, &host())
        .iter()
        .any(|a| a.topic == "capacity"));
}

#[test]
fn nat_present_says_conntrack_stays() {
    let o = table(53, 30, 0, true);
    let e = NsEvidence {
        occupancy: Some(&o),
        limits: limits(262144),
        ..Default::default()
    };
    let a = for_namespace(&e, &host());
    assert!(a
        .iter()
        .any(|a| a.topic == "nat" && a.headline.contains("cannot be disabled")));
}

#[test]
fn small_groups_and_tcp_are_not_untracked() {
    let mut o = table(5353, 2, 60, false);
    o.top_dst_ports.retain(|p| p.port != 5353 || p.entries >= 2);
    assert!(notrack_candidates(&o).is_empty());
}

#[test]
fn built_in_module_hashsize_goes_on_the_command_line() {
    let e = NsEvidence {
        table_full_drops: 1,
        table_full_flows: 1,
        peak_entries: 64,
        limits: limits(64),
        ..Default::default()
    };
    let cap = capacity(&e, &host(), None);
    assert!(cap
        .notes
        .iter()
        .any(|n| n.contains("nf_conntrack.hashsize=128")));
    let cap = capacity(
        &e,
        &Host {
            module: ModuleKind::Loadable,
            entry_bytes: None,
        },
        None,
    );
    assert!(cap.steps.contains(&Step::Persist {
        file: "/etc/modprobe.d/nf_conntrack.conf".into(),
        line: "options nf_conntrack hashsize=128".into()
    }));
}

#[test]
fn a_run_advises_per_namespace_from_its_drops() {
    use crate::events::{DropEvent, Flow, Icmp};
    let ev = |ns: u32, proto: u8, sport: u16, icmp: Option<Icmp>| DropEvent {
        ts_ns: 0,
        cpu: 0,
        reason: 12,
        location: 0,
        skb: 0,
        source: 0,
        netns: Some(ns),
        ifindex: None,
        skb_len: 64,
        flow: Some(Flow {
            src: "198.18.0.1".parse().unwrap(),
            dst: "198.18.0.2".parse().unwrap(),
            proto,
            ports: (proto == 17).then_some((sport, 5353)),
        }),
        icmp,
        ct: None,
        ct_fill: None,
        truncated: false,
        header: None,
    };
    let mut t = Tally::new(1000);
    for p in 0..30 {
        t.record(&ev(1, 17, 1000 + p, None), Cause::ConntrackTableFull);
    }
    // The same flow again: one more drop, no more demand.
    t.record(&ev(1, 17, 1000, None), Cause::ConntrackTableFull);
    t.record(
        &ev(
            2,
            1,
            0,
            Some(Icmp {
                ty: 3,
                code: 4,
                echo: None,
            }),
        ),
        Cause::IcmpErrorBlocked,
    );
    t.record(&ev(3, 17, 7, None), Cause::NetfilterRule);
    let a = from_run(&t, &BTreeMap::new(), limits(64), &host(), |ns| {
        Some(format!("ns{ns}"))
    });
    let topics: Vec<(&str, Option<u32>)> = a.iter().map(|a| (a.topic, a.netns)).collect();
    assert_eq!(
        topics,
        vec![
            ("limit_origin", Some(1)),
            ("capacity", Some(1)),
            ("icmp_error_blocked", Some(2))
        ]
    );
    // Every turned-away packet came from one source: that source is named,
    // and the limit is sized from the 64 entries held, not 64 + 30 drops.
    assert_eq!(a[0].values["source"], "198.18.0.1");
    assert_eq!(
        (a[0].values["count"].as_u64(), a[0].values["of"].as_u64()),
        (Some(31), Some(31))
    );
    assert_eq!(a[1].values["turned_away_flows"], 30);
    assert_eq!(a[1].values["observed_peak"], 64);
    assert_eq!(a[1].netns_name.as_deref(), Some("ns1"));
    assert_eq!(a[2].netns_name.as_deref(), Some("ns2"));
}

#[test]
fn insert_clashes_get_their_causes_and_mitigations() {
    let e = NsEvidence {
        netns: Some(9),
        insert_failed: 120,
        limits: limits(262144),
        ..Default::default()
    };
    let a = for_namespace(&e, &host());
    assert_eq!(
        a.len(),
        1,
        "no table advice without a snapshot or table-full drops"
    );
    assert_eq!(
        (a[0].topic, a[0].cause),
        ("insert_clash", "conntrack_insert_failed")
    );
    assert!(a[0].headline.starts_with("120 packets"));
    assert!(a[0]
        .notes
        .iter()
        .any(|n| n.contains("single-request-reopen")));
}

#[test]
fn icmp_blocked_warns_about_pmtu() {
    let g = IcmpBlocked {
        netns: Some(3),
        netns_name: Some("ctdo-e".into()),
        src: "198.18.1.1".parse().ok(),
        dst: "198.18.0.1".parse().ok(),
        drops: 2,
    };
    let a = for_icmp_blocked(&[g.clone(), IcmpBlocked { drops: 1, ..g }]);
    assert_eq!(a.len(), 1);
    assert_eq!(a[0].cause, "icmp_error_blocked");
    assert!(a[0].headline.starts_with("3 ICMP"));
    assert!(a[0].headline.contains("path-MTU"));
}

#[test]
fn markdown_fences_the_commands() {
    let o = table(5353, 58, 5, false);
    let e = NsEvidence {
        netns: Some(4),
        netns_name: Some("srv".into()),
        table_full_drops: 9,
        table_full_flows: 9,
        peak_entries: 64,
        occupancy: Some(&o),
        limits: limits(64),
        ..Default::default()
    };
    let mut out = Vec::new();
    write_markdown(&for_namespace(&e, &host()), &mut out).unwrap();
    let md = String::from_utf8(out).unwrap();
    assert!(md.contains("**notrack** in srv:"), "{md}");
    assert!(
        md.contains("```sh\niptables -t raw -A PREROUTING -p udp --dport 5353 -j NOTRACK\n"),
        "{md}"
    );
    assert!(md.contains("- nf_conntrack_max is global"), "{md}");
    assert_eq!(md.matches("```").count() % 2, 0, "unbalanced fences:\n{md}");
}

#[test]
fn human_advice_fits_80_columns() {
    let o = table(5353, 58, 5, true);
    let e = NsEvidence {
        netns: Some(4026532000),
        netns_name: Some("ctdemo-srv".into()),
        table_full_drops: 123456,
        table_full_flows: 100000,
        insert_failed: 3,
        peak_entries: 262144,
        occupancy: Some(&o),
        limits: limits(262144),
        ..Default::default()
    };
    let mut a = for_namespace(&e, &host());
    a.extend(for_icmp_blocked(&[IcmpBlocked {
        netns: Some(1),
        netns_name: None,
        src: "2001:db8::1".parse().ok(),
        dst: "2001:db8::2".parse().ok(),
        drops: 9,
    }]));
    let mut out = Vec::new();
    write_human(&a, &mut out).unwrap();
    let s = String::from_utf8(out).unwrap();
    for l in s.lines() {
        assert!(
            l.chars().count() <= 80,
            "{l:?} is {} columns",
            l.chars().count()
        );
    }
    assert!(s.contains("$ iptables -t raw -A PREROUTING -p udp --dport 5353 -j NOTRACK"));
    // Long commands continue with a backslash, never inside quotes.
    assert!(
        s.contains(
            "$ iptables -I INPUT -s 198.18.0.1 -m conntrack --ctstate NEW -m hashlimit \\\n"
        ),
        "{s}"
    );
    assert_eq!(
        wrap_command(
            "sh -c 'echo 1 > /a/very/long/path/that/goes/on/and/on/and/on/hashsize' x",
            40
        )[0],
        "    $ sh -c \\"
    );
    assert!(wrap_command(
        "sh -c 'echo 1 > /a/very/long/path/that/goes/on/and/on/and/on/hashsize' x",
        40
    )
    .iter()
    .any(
        |l| l.trim_start() == "'echo 1 > /a/very/long/path/that/goes/on/and/on/and/on/hashsize' \\"
    ));
}
