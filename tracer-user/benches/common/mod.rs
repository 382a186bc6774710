//! Drops for the benchmarks.

use std::net::IpAddr;

use ctdrop::events::{CtFill, DropEvent, Flow, Icmp};

/// Drops as the incident makes them: UDP flows to new ports (most), some
/// pings, all in one namespace with a full table.
pub fn drop_no(i: u64, header: bool) -> DropEvent {
    let src: IpAddr = "198.18.0.1".parse().unwrap();
    let dst: IpAddr = "198.18.0.2".parse().unwrap();
    let ping = i.is_multiple_of(10);
    DropEvent {
        ts_ns: 5_000_000_000_000 + i * 3_333,
        cpu: (i % 2) as u32,
        reason: 12,
        location: 0,
        skb: 0,
        source: 1,
        netns: Some(4026532521),
        ifindex: Some(2),
        skb_len: if ping { 84 } else { 29 },
        flow: Some(Flow {
            src,
            dst,
            proto: if ping { 1 } else { 17 },
            ports: (!ping).then_some((32768 + (i % 28000) as u16, 20000 + (i % 40000) as u16)),
        }),
        icmp: ping.then_some(Icmp {
            ty: 8,
            code: 0,
            echo: Some((4000 + (i / 10) as u16, 1)),
        }),
        ct: None,
        ct_fill: Some(CtFill {
            count: 64,
            max: 64,
            sampled: true,
            counted_drop: Some(true),
        }),
        truncated: false,
        header: header.then(|| Box::new([0x45; 128])),
    }
}
