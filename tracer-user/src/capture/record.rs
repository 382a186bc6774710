//! Records inside a capture block: one kind byte, then the body.
//!
//! Drops are written field by field (not as the kernel struct), with a
//! presence bit per optional part, varints for numbers and an id for every
//! string (cause, location, namespace and interface names); a string is
//! defined by a `STRING` record before its first use. Timestamps are deltas
//! from the previous drop of the same block, so each block decodes alone
//! given the strings defined before it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use tracer_common::HEADER_CAPTURE_LEN;

use super::codec::{put_varint, unzigzag, zigzag, CodecError, Cursor};
use crate::{
    cause::Cause,
    events::{CtFill, CtRef, DropEvent, Flow, Icmp},
    model::ProbeVerdict,
};

pub const DROP: u8 = 1;
pub const STRING: u8 = 2;
pub const PROBE: u8 = 3;
pub const CHECKPOINT: u8 = 4;

mod bit {
    pub const NETNS: u16 = 1 << 0;
    pub const NETNS_NAME: u16 = 1 << 1;
    pub const IFINDEX: u16 = 1 << 2;
    pub const IFNAME: u16 = 1 << 3;
    pub const FLOW: u16 = 1 << 4;
    pub const V6: u16 = 1 << 5;
    pub const PORTS: u16 = 1 << 6;
    pub const ICMP: u16 = 1 << 7;
    pub const ECHO: u16 = 1 << 8;
    pub const CT: u16 = 1 << 9;
    pub const CT_STATUS: u16 = 1 << 10;
    pub const FILL: u16 = 1 << 11;
    pub const FILL_SAMPLED: u16 = 1 << 12;
    pub const TRUNCATED: u16 = 1 << 13;
    pub const HEADER: u16 = 1 << 14;
    pub const KNOWN: u16 = (1 << 15) - 1;
}

/// A drop as stored: the decoded event (without kernel addresses, which
/// mean nothing offline) plus string ids for what was resolved live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CapturedDrop {
    pub ev: DropEvent,
    pub cause: Cause,
    pub location: u32,
    pub netns_name: Option<u32>,
    pub ifname: Option<u32>,
}

/// String ids of one drop, assigned by the writer's intern table.
pub struct DropStrings {
    pub cause: u32,
    pub location: u32,
    pub netns_name: Option<u32>,
    pub ifname: Option<u32>,
}

/// Kernel program counters and ctdrop's own count at one moment; lets a
/// report tell events lost even when the trailer never got written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Checkpoint {
    pub mono_ns: u64,
    pub events_sent: u64,
    pub events_lost: u64,
    pub drops_seen: u64,
}

pub fn put_string(out: &mut Vec<u8>, id: u32, s: &str) {
    out.push(STRING);
    put_varint(out, id as u64);
    put_varint(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

/// A probe verdict: its serde form ([`crate::model::ProbeVerdict`]) as JSON.
pub fn put_probe(out: &mut Vec<u8>, json: &[u8]) {
    out.push(PROBE);
    put_varint(out, json.len() as u64);
    out.extend_from_slice(json);
}

pub fn put_checkpoint(out: &mut Vec<u8>, c: &Checkpoint) {
    out.push(CHECKPOINT);
    for v in [c.mono_ns, c.events_sent, c.events_lost, c.drops_seen] {
        put_varint(out, v);
    }
}

/// `prev_ts`: timestamp of the previous drop in this block (0 at its start).
pub fn put_drop(out: &mut Vec<u8>, prev_ts: u64, ev: &DropEvent, ids: &DropStrings) {
    let mut b = 0u16;
    let mut set = |cond: bool, f: u16| {
        if cond {
            b |= f
        }
    };
    set(ev.netns.is_some(), bit::NETNS);
    set(ids.netns_name.is_some(), bit::NETNS_NAME);
    set(ev.ifindex.is_some(), bit::IFINDEX);
    set(ids.ifname.is_some(), bit::IFNAME);
    set(ev.flow.is_some(), bit::FLOW);
    set(
        matches!(
            ev.flow,
            Some(Flow {
                src: IpAddr::V6(_),
                ..
            })
        ),
        bit::V6,
    );
    set(ev.flow.as_ref().and_then(|f| f.ports).is_some(), bit::PORTS);
    set(ev.icmp.is_some(), bit::ICMP);
    set(ev.icmp.and_then(|i| i.echo).is_some(), bit::ECHO);
    set(ev.ct.is_some(), bit::CT);
    set(ev.ct.and_then(|c| c.status).is_some(), bit::CT_STATUS);
    set(ev.ct_fill.is_some(), bit::FILL);
    set(
        ev.ct_fill.map(|f| f.sampled).unwrap_or(false),
        bit::FILL_SAMPLED,
    );
    set(ev.truncated, bit::TRUNCATED);
    set(ev.header.is_some(), bit::HEADER);

    out.push(DROP);
    put_varint(out, b as u64);
    put_varint(out, zigzag(ev.ts_ns.wrapping_sub(prev_ts) as i64));
    put_varint(out, ids.cause as u64);
    put_varint(out, ev.reason as u64);
    out.push(ev.source);
    put_varint(out, ev.cpu as u64);
    put_varint(out, ev.skb_len as u64);
    put_varint(out, ids.location as u64);
    if let Some(ns) = ev.netns {
        put_varint(out, ns as u64);
    }
    if let Some(id) = ids.netns_name {
        put_varint(out, id as u64);
    }
    if let Some(i) = ev.ifindex {
        put_varint(out, i as u64);
    }
    if let Some(id) = ids.ifname {
        put_varint(out, id as u64);
    }
    if let Some(f) = &ev.flow {
        out.push(f.proto);
        match (f.src, f.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                out.extend_from_slice(&s.octets());
                out.extend_from_slice(&d.octets());
            }
            // A flow's two ends share a family; map a stray v4 end into v6.
            (s, d) => {
                out.extend_from_slice(&v6(s).octets());
                out.extend_from_slice(&v6(d).octets());
            }
        }
        if let Some((sp, dp)) = f.ports {
            out.extend_from_slice(&sp.to_le_bytes());
            out.extend_from_slice(&dp.to_le_bytes());
        }
    }
    if let Some(i) = ev.icmp {
        out.push(i.ty);
        out.push(i.code);
        if let Some((id, seq)) = i.echo {
            out.extend_from_slice(&id.to_le_bytes());
            out.extend_from_slice(&seq.to_le_bytes());
        }
    }
    if let Some(c) = ev.ct {
        out.push(c.info);
        put_varint(out, c.zone as u64);
        if let Some(s) = c.status {
            put_varint(out, s as u64);
        }
    }
    if let Some(f) = ev.ct_fill {
        put_varint(out, f.count);
        put_varint(out, f.max);
    }
    if let Some(h) = &ev.header {
        out.extend_from_slice(&h[..]);
    }
}

fn v6(a: IpAddr) -> Ipv6Addr {
    match a {
        IpAddr::V4(v) => v.to_ipv6_mapped(),
        IpAddr::V6(v) => v,
    }
}

/// Reads a drop body (after its kind byte) of a file in capture format
/// `format`. `cause_of` turns a string id into a cause; None when the id is
/// undefined or names no known cause.
pub fn get_drop(
    c: &mut Cursor,
    prev_ts: u64,
    format: u32,
    cause_of: impl Fn(u32) -> Option<Cause>,
) -> Result<CapturedDrop, CodecError> {
    let b = c.varint("drop field bits")?;
    let b = u16::try_from(b)
        .ok()
        .filter(|b| b & !bit::KNOWN == 0)
        .ok_or(CodecError("drop with unknown field bits"))?;
    let has = |f: u16| b & f != 0;
    let ts_ns = prev_ts.wrapping_add(unzigzag(c.varint("drop timestamp")?) as u64);
    let cause_id = c.varint_u32("drop cause")?;
    let cause = cause_of(cause_id).ok_or(CodecError("drop with an undefined or unknown cause"))?;
    let reason = c.varint_u32("drop reason")?;
    let source = c.u8("drop source")?;
    if format < 3 {
        // Formats 1 and 2 stored the record's `detail` byte, which no
        // kernel program ever set (always 0): skipped.
        c.u8("drop detail")?;
    }
    let cpu = c.varint_u32("drop cpu")?;
    let skb_len = c.varint_u32("drop length")?;
    let location = c.varint_u32("drop location")?;
    let netns = if has(bit::NETNS) {
        Some(c.varint_u32("drop netns")?)
    } else {
        None
    };
    let netns_name = if has(bit::NETNS_NAME) {
        Some(c.varint_u32("drop netns name")?)
    } else {
        None
    };
    let ifindex = if has(bit::IFINDEX) {
        Some(c.varint_u32("drop ifindex")?)
    } else {
        None
    };
    let ifname = if has(bit::IFNAME) {
        Some(c.varint_u32("drop interface name")?)
    } else {
        None
    };
    let flow = if has(bit::FLOW) {
        let proto = c.u8("drop protocol")?;
        let (src, dst) = if has(bit::V6) {
            (
                IpAddr::V6(Ipv6Addr::from(c.array::<16>("drop source address")?)),
                IpAddr::V6(Ipv6Addr::from(c.array::<16>("drop destination address")?)),
            )
        } else {
            (
                IpAddr::V4(Ipv4Addr::from(c.array::<4>("drop source address")?)),
                IpAddr::V4(Ipv4Addr::from(c.array::<4>("drop destination address")?)),
            )
        };
        let ports = if has(bit::PORTS) {
            Some((c.u16("drop source port")?, c.u16("drop destination port")?))
        } else {
            None
        };
        Some(Flow {
            src,
            dst,
            proto,
            ports,
        })
    } else {
        None
    };
    let icmp = if has(bit::ICMP) {
        let ty = c.u8("drop icmp type")?;
        let code = c.u8("drop icmp code")?;
        let echo = if has(bit::ECHO) {
            Some((c.u16("drop icmp id")?, c.u16("drop icmp seq")?))
        } else {
            None
        };
        Some(Icmp { ty, code, echo })
    } else {
        None
    };
    let ct = if has(bit::CT) {
        let info = c.u8("drop ct info")?;
        let zone =
            u16::try_from(c.varint("drop ct zone")?).map_err(|_| CodecError("drop ct zone"))?;
        let status = if has(bit::CT_STATUS) {
            Some(c.varint_u32("drop ct status")?)
        } else {
            None
        };
        Some(CtRef { info, status, zone })
    } else {
        None
    };
    let ct_fill = if has(bit::FILL) {
        Some(CtFill {
            count: c.varint("drop table count")?,
            max: c.varint("drop table max")?,
            sampled: has(bit::FILL_SAMPLED),
            counted_drop: None,
        })
    } else {
        None
    };
    let header = if has(bit::HEADER) {
        Some(Box::new(
            c.array::<HEADER_CAPTURE_LEN>("drop packet header")?,
        ))
    } else {
        None
    };
    let ev = DropEvent {
        ts_ns,
        cpu,
        reason,
        location: 0,
        skb: 0,
        source,
        netns,
        ifindex,
        skb_len,
        flow,
        icmp,
        ct,
        ct_fill,
        truncated: has(bit::TRUNCATED),
        header,
    };
    Ok(CapturedDrop {
        ev,
        cause,
        location,
        netns_name,
        ifname,
    })
}

pub fn get_string(c: &mut Cursor) -> Result<(u32, String), CodecError> {
    let id = c.varint_u32("string id")?;
    let len = c.varint("string length")?;
    let bytes = c.bytes(
        usize::try_from(len).map_err(|_| CodecError("string length"))?,
        "string bytes",
    )?;
    let s = std::str::from_utf8(bytes).map_err(|_| CodecError("string is not UTF-8"))?;
    Ok((id, s.to_string()))
}

/// A probe verdict of any format: formats 1 and 2 stored the `live --json`
/// probe line, which is the same object.
pub fn get_probe(c: &mut Cursor) -> Result<ProbeVerdict, CodecError> {
    let len = c.varint("probe length")?;
    let bytes = c.bytes(
        usize::try_from(len).map_err(|_| CodecError("probe length"))?,
        "probe bytes",
    )?;
    serde_json::from_slice(bytes).map_err(|_| CodecError("probe is not a valid probe verdict"))
}

pub fn get_checkpoint(c: &mut Cursor) -> Result<Checkpoint, CodecError> {
    Ok(Checkpoint {
        mono_ns: c.varint("checkpoint time")?,
        events_sent: c.varint("checkpoint events sent")?,
        events_lost: c.varint("checkpoint events lost")?,
        drops_seen: c.varint("checkpoint drops")?,
    })
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use crate::capture::FORMAT_VERSION;
    use tracer_common::source;

    /// A drop with every optional part present (or absent), for round trips.
    pub fn sample(full: bool, v6: bool) -> DropEvent {
        let (src, dst): (IpAddr, IpAddr) = if v6 {
            (
                "2001:db8::1".parse().unwrap(),
                "2001:db8::2".parse().unwrap(),
            )
        } else {
            ("198.18.0.1".parse().unwrap(), "198.18.0.2".parse().unwrap())
        };
        DropEvent {
            ts_ns: 1_234_567_890_123,
            cpu: 1,
            reason: 12,
            location: 0,
            skb: 0,
            source: source::KFREE_SKB,
            netns: full.then_some(4026532000),
            ifindex: full.then_some(7),
            skb_len: 84,
            flow: full.then_some(Flow {
                src,
                dst,
                proto: if v6 { 58 } else { 1 },
                ports: None,
            }),
            icmp: full.then_some(Icmp {
                ty: 8,
                code: 0,
                echo: Some((77, 65535)),
            }),
            ct: full.then_some(CtRef {
                info: 7,
                status: Some(0x188),
                zone: 3,
            }),
            ct_fill: full.then_some(CtFill {
                count: 64,
                max: 64,
                sampled: true,
                counted_drop: None,
            }),
            truncated: full,
            header: full.then(|| Box::new([0xab; HEADER_CAPTURE_LEN])),
        }
    }

    fn round_trip(ev: &DropEvent, prev: u64) -> CapturedDrop {
        let ids = DropStrings {
            cause: 0,
            location: 9,
            netns_name: Some(3),
            ifname: None,
        };
        let mut out = Vec::new();
        put_drop(&mut out, prev, ev, &ids);
        let mut c = Cursor::new(&out);
        assert_eq!(c.u8("kind").unwrap(), DROP);
        let d = get_drop(&mut c, prev, FORMAT_VERSION, |id| {
            (id == 0).then_some(Cause::ConntrackTableFull)
        })
        .unwrap();
        assert!(c.is_empty(), "trailing bytes");
        d
    }

    #[test]
    fn full_and_empty_drops_round_trip() {
        for (full, v6) in [(true, false), (true, true), (false, false)] {
            let ev = sample(full, v6);
            let d = round_trip(&ev, 0);
            assert_eq!(d.ev, ev);
            assert_eq!(
                (d.cause, d.location, d.netns_name, d.ifname),
                (Cause::ConntrackTableFull, 9, Some(3), None)
            );
        }
    }

    #[test]
    fn timestamps_going_backwards_survive() {
        let ev = sample(false, false);
        assert_eq!(round_trip(&ev, ev.ts_ns + 5_000).ev.ts_ns, ev.ts_ns);
    }

    #[test]
    fn udp_ports_round_trip() {
        let mut ev = sample(true, false);
        ev.icmp = None;
        ev.flow = Some(Flow {
            src: "198.18.0.1".parse().unwrap(),
            dst: "198.18.0.2".parse().unwrap(),
            proto: 17,
            ports: Some((40000, 53)),
        });
        assert_eq!(round_trip(&ev, 0).ev, ev);
    }

    #[test]
    fn every_cut_of_a_drop_is_an_error() {
        let ev = sample(true, true);
        let mut out = Vec::new();
        put_drop(
            &mut out,
            0,
            &ev,
            &DropStrings {
                cause: 0,
                location: 1,
                netns_name: Some(2),
                ifname: Some(3),
            },
        );
        for cut in 1..out.len() {
            let mut c = Cursor::new(&out[1..cut]);
            assert!(
                get_drop(&mut c, 0, FORMAT_VERSION, |_| Some(Cause::Other)).is_err(),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn unknown_cause_ids_and_bits_are_refused() {
        let mut out = Vec::new();
        put_drop(
            &mut out,
            0,
            &sample(false, false),
            &DropStrings {
                cause: 5,
                location: 1,
                netns_name: None,
                ifname: None,
            },
        );
        assert!(get_drop(&mut Cursor::new(&out[1..]), 0, FORMAT_VERSION, |_| None).is_err());
        let mut bad = vec![];
        put_varint(&mut bad, 1 << 15);
        assert_eq!(
            get_drop(&mut Cursor::new(&bad), 0, FORMAT_VERSION, |_| Some(
                Cause::Other
            )),
            Err(CodecError("drop with unknown field bits"))
        );
    }
}
