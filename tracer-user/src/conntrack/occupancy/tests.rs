use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use netlink_packet_core::{NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_netfilter::{
    conntrack::{
        ConntrackAttribute, ConntrackMessage, IPTuple, ProtoInfo, ProtoInfoTCP, ProtoTuple, Status,
        Tuple,
    },
    NetfilterHeader, NetfilterMessage, NetfilterProtoFamily,
};

use super::{
    dump::{CT_NEW_MSG, NFGENMSG_LEN},
    entry::*,
    model::*,
    *,
};

fn e(proto: u8, src: &str, dport: u16, status: Status, tcp_state: Option<u8>) -> CtEntry {
    CtEntry {
        proto,
        src: src.parse().unwrap(),
        dst: "198.18.0.2".parse().unwrap(),
        sport: 40000,
        dport,
        tcp_state,
        status: status.bits(),
    }
}

#[test]
fn counts_by_state_liveness_and_port() {
    let mut b = OccupancyBuilder::default();
    for _ in 0..40 {
        b.add(&e(17, "198.18.0.1", 5353, Status::Confirmed, None));
    }
    for _ in 0..5 {
        b.add(&e(
            6,
            "198.18.0.1",
            8080,
            Status::Confirmed | Status::SeenReply | Status::Assured,
            Some(3),
        ));
    }
    b.add(&e(
        1,
        "198.18.0.9",
        0,
        Status::Confirmed | Status::SeenReply,
        None,
    ));
    b.add(&e(
        17,
        "198.18.0.9",
        53,
        Status::Confirmed | Status::SrcNat,
        None,
    ));
    let o = b.finish(3);
    assert_eq!(o.entries, 47);
    assert_eq!((o.unreplied, o.replied, o.assured, o.nat), (41, 1, 5, 1));
    assert_eq!(
        o.by_proto_state[0],
        StateRow {
            proto: "udp".into(),
            state: "UNREPLIED".into(),
            entries: 41,
            unreplied: 41,
            assured: 0
        }
    );
    assert_eq!(
        o.by_proto_state[1],
        StateRow {
            proto: "tcp".into(),
            state: "ESTABLISHED".into(),
            entries: 5,
            unreplied: 0,
            assured: 5
        }
    );
    assert_eq!(
        o.top_sources[0].addr,
        "198.18.0.1".parse::<IpAddr>().unwrap()
    );
    assert_eq!(o.top_sources[0].entries, 45);
    assert_eq!(
        (
            o.top_dst_ports[0].port,
            o.top_dst_ports[0].entries,
            o.top_dst_ports[0].unreplied,
            o.top_dst_ports[0].sources
        ),
        (5353, 40, 40, 1)
    );
    assert_eq!(o.top_dst_ports[1].port, 8080);
    assert_eq!(o.top_dst_ports.len(), 3);
    assert_eq!(o.top_destinations[0].entries, 47);
}

#[test]
fn ties_sort_stably() {
    let mut b = OccupancyBuilder::default();
    b.add(&e(17, "198.18.0.3", 9, Status::empty(), None));
    b.add(&e(17, "198.18.0.1", 7, Status::empty(), None));
    let o = b.finish(5);
    assert_eq!(o.top_sources[0].addr.to_string(), "198.18.0.1");
    assert_eq!(o.top_dst_ports[0].port, 7);
}

/// An entry as the kernel sends it, built with the crate's emitter.
fn dumped(attrs: Vec<ConntrackAttribute>) -> Vec<u8> {
    let mut hdr = NetlinkHeader::default();
    hdr.message_type = CT_NEW_MSG;
    let mut m = NetlinkMessage::new(
        hdr,
        NetlinkPayload::from(NetfilterMessage::new(
            NetfilterHeader::new(NetfilterProtoFamily::IPv4, 0, 0),
            ConntrackMessage::New(attrs),
        )),
    );
    m.finalize();
    let mut buf = vec![0u8; m.buffer_len()];
    m.serialize(&mut buf);
    buf
}

#[test]
fn reads_a_dumped_entry() {
    let orig = |src: &str, dst: &str| {
        ConntrackAttribute::CtaTupleOrig(vec![
            Tuple::Ip(vec![
                IPTuple::SourceAddress(src.parse().unwrap()),
                IPTuple::DestinationAddress(dst.parse().unwrap()),
            ]),
            Tuple::Proto(vec![
                ProtoTuple::Protocol(6.into()),
                ProtoTuple::SourcePort(40000),
                ProtoTuple::DestinationPort(443),
            ]),
        ])
    };
    let rest = vec![
        ConntrackAttribute::CtaStatus(Status::Confirmed | Status::SeenReply | Status::Assured),
        ConntrackAttribute::CtaTimeout(431999),
        ConntrackAttribute::CtaProtoInfo(vec![ProtoInfo::TCP(vec![ProtoInfoTCP::State(3)])]),
    ];
    let mut attrs = vec![orig("198.18.0.1", "198.18.0.2")];
    attrs.extend(rest.clone());
    let buf = dumped(attrs);
    let msg = NetlinkBuffer::new_checked(&buf[..]).unwrap();
    assert_eq!(msg.message_type(), CT_NEW_MSG);
    let c = CtEntry::from_nlas(&msg.payload()[NFGENMSG_LEN..]).unwrap();
    assert_eq!(
        (c.proto, c.sport, c.dport, c.state_label(), c.liveness()),
        (6, 40000, 443, "ESTABLISHED", Liveness::Assured)
    );
    assert_eq!(c.src.to_string(), "198.18.0.1");

    let mut attrs = vec![orig("2001:db8::1", "2001:db8::2")];
    attrs.extend(rest.clone());
    let buf = dumped(attrs);
    let c = CtEntry::from_nlas(
        &NetlinkBuffer::new_checked(&buf[..]).unwrap().payload()[NFGENMSG_LEN..],
    )
    .unwrap();
    assert_eq!(c.dst.to_string(), "2001:db8::2");

    // No original tuple: not an entry we can count.
    let buf = dumped(rest);
    assert!(CtEntry::from_nlas(
        &NetlinkBuffer::new_checked(&buf[..]).unwrap().payload()[NFGENMSG_LEN..]
    )
    .is_none());
}

#[test]
fn limiter_allows_one_per_gap_per_namespace() {
    let mut l = SnapshotLimiter::new(Duration::from_secs(30));
    let t = Instant::now();
    assert!(l.allow(1, t));
    assert!(!l.allow(1, t + Duration::from_secs(29)));
    assert!(l.allow(2, t + Duration::from_secs(1)));
    assert!(l.allow(1, t + Duration::from_secs(30)));
}

#[test]
fn human_lines_fit_80_columns() {
    let mut b = OccupancyBuilder::default();
    for i in 0..300u16 {
        b.add(&e(
            17,
            &format!("2001:db8:ffff:ffff:ffff:ffff:ffff:{i:x}"),
            60000 + i % 7,
            Status::empty(),
            None,
        ));
    }
    let mut o = b.finish(TOP_N);
    o.netns_name = Some("ctdemo-srv".into());
    o.max = Some(262144);
    let mut out = Vec::new();
    o.write_human(&mut out).unwrap();
    let s = String::from_utf8(out).unwrap();
    for l in s.lines() {
        assert!(
            l.chars().count() <= 80,
            "{l:?} is {} columns",
            l.chars().count()
        );
    }
}
