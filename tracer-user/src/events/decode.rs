//! Raw ring-buffer bytes to [`DropEvent`]. The layout is tracer-common's;
//! this module only interprets it, and never trusts a length it was given.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use tracer_common::{flags, DropRecord, HEADER_CAPTURE_LEN};

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Flow {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// IP protocol number.
    pub proto: u8,
    /// Ports for TCP/UDP when the L4 header was readable.
    pub ports: Option<(u16, u16)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Icmp {
    pub ty: u8,
    pub code: u8,
    /// (id, seq) of an echo request or reply.
    pub echo: Option<(u16, u16)>,
}

impl Icmp {
    pub fn is_echo_request(&self, proto: u8) -> bool {
        self.echo.is_some() && ((proto == 1 && self.ty == 8) || (proto == 58 && self.ty == 128))
    }
}

/// The conntrack reference an skb carried when it was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtRef {
    /// `ctinfo`; 7 is IP_CT_UNTRACKED (a NOTRACK'ed packet).
    pub info: u8,
    pub status: Option<u32>,
    pub zone: u16,
}

impl CtRef {
    pub fn untracked(&self) -> bool {
        self.info == 7
    }
}

/// Table fill of the packet's namespace, and how close to the drop it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtFill {
    pub count: u64,
    pub max: u64,
    /// true: read by userspace near the drop, not by the kernel at it.
    pub sampled: bool,
    /// Whether the namespace's `drop` counter rose around this drop with
    /// room left for it (see `conntrack::FillSampler::judge`); None when
    /// there is no counter history to tell.
    pub counted_drop: Option<bool>,
}

impl CtFill {
    pub fn full(&self) -> bool {
        self.max > 0 && self.count >= self.max
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DropEvent {
    pub ts_ns: u64,
    pub cpu: u32,
    pub reason: u32,
    pub location: u64,
    pub skb: u64,
    pub source: u8,
    pub netns: Option<u32>,
    pub ifindex: Option<u32>,
    pub skb_len: u32,
    pub flow: Option<Flow>,
    pub icmp: Option<Icmp>,
    pub ct: Option<CtRef>,
    pub ct_fill: Option<CtFill>,
    pub truncated: bool,
    pub header: Option<Box<[u8; HEADER_CAPTURE_LEN]>>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum DecodeError {
    Short { len: usize, need: usize },
    BadAddressFamily(u16),
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::Short { len, need } => write!(f, "record of {len} bytes, need {need}"),
            DecodeError::BadAddressFamily(p) => write!(f, "record claims L3 protocol {p:#06x}"),
        }
    }
}

impl std::error::Error for DecodeError {}

pub const RECORD_LEN: usize = std::mem::size_of::<DropRecord>();

pub fn decode(bytes: &[u8]) -> Result<DropEvent, DecodeError> {
    if bytes.len() < RECORD_LEN {
        return Err(DecodeError::Short {
            len: bytes.len(),
            need: RECORD_LEN,
        });
    }
    let r: DropRecord = bytemuck::pod_read_unaligned(&bytes[..RECORD_LEN]);
    let mut ev = from_record(&r)?;
    if r.flags & flags::HAS_HEADER != 0 {
        let need = RECORD_LEN + HEADER_CAPTURE_LEN;
        if bytes.len() < need {
            return Err(DecodeError::Short {
                len: bytes.len(),
                need,
            });
        }
        let mut h = Box::new([0u8; HEADER_CAPTURE_LEN]);
        h.copy_from_slice(&bytes[RECORD_LEN..need]);
        ev.header = Some(h);
    }
    Ok(ev)
}

/// The `flags` of a raw record (0 when too short to hold them).
pub fn record_flags(bytes: &[u8]) -> u16 {
    let at = std::mem::offset_of!(DropRecord, flags);
    bytes
        .get(at..at + 2)
        .map_or(0, |b| u16::from_ne_bytes([b[0], b[1]]))
}

pub fn from_record(r: &DropRecord) -> Result<DropEvent, DecodeError> {
    let has = |f: u16| r.flags & f != 0;
    let flow = if has(flags::HAS_L3) {
        let (src, dst) = match r.l3_proto {
            ETH_P_IP => (
                IpAddr::V4(Ipv4Addr::new(
                    r.saddr[0], r.saddr[1], r.saddr[2], r.saddr[3],
                )),
                IpAddr::V4(Ipv4Addr::new(
                    r.daddr[0], r.daddr[1], r.daddr[2], r.daddr[3],
                )),
            ),
            ETH_P_IPV6 => (
                IpAddr::V6(Ipv6Addr::from(r.saddr)),
                IpAddr::V6(Ipv6Addr::from(r.daddr)),
            ),
            other => return Err(DecodeError::BadAddressFamily(other)),
        };
        let l4 = has(flags::HAS_L4);
        let ports = (l4 && (r.l4_proto == 6 || r.l4_proto == 17)).then_some((r.sport, r.dport));
        Some(Flow {
            src,
            dst,
            proto: r.l4_proto,
            ports,
        })
    } else {
        None
    };
    let icmp = (has(flags::HAS_L4) && (r.l4_proto == 1 || r.l4_proto == 58)).then(|| Icmp {
        ty: r.icmp_type,
        code: r.icmp_code,
        echo: has(flags::ICMP_ECHO).then_some((r.icmp_id, r.icmp_seq)),
    });
    let ct = has(flags::HAS_CT).then(|| CtRef {
        info: r.ct_info,
        status: has(flags::HAS_CT_STATUS).then_some(r.ct_status),
        zone: r.zone,
    });
    Ok(DropEvent {
        ts_ns: r.ts_ns,
        cpu: r.cpu,
        reason: r.reason,
        location: r.location,
        skb: r.skb,
        source: r.source,
        netns: has(flags::HAS_NETNS).then_some(r.netns),
        ifindex: has(flags::HAS_DEV).then_some(r.ifindex),
        skb_len: r.skb_len,
        flow,
        icmp,
        ct,
        // The kernel does not read the table fill; the collector samples
        // it and joins it to the event (conntrack::FillSampler).
        ct_fill: None,
        truncated: has(flags::TRUNCATED),
        header: None,
    })
}

pub fn proto_name(p: u8) -> String {
    match p {
        1 => "icmp".into(),
        6 => "tcp".into(),
        17 => "udp".into(),
        58 => "icmpv6".into(),
        132 => "sctp".into(),
        n => format!("proto{n}"),
    }
}

/// The inverse of [`proto_name`]: a protocol number from a name as typed
/// (`UDP`, `47`) or as [`proto_name`] writes it (`proto33`), so a stored
/// snapshot's protocol reads back as the number it was.
pub fn parse_proto(s: &str) -> anyhow::Result<u8> {
    Ok(match s.to_ascii_lowercase().as_str() {
        "icmp" => 1,
        "tcp" => 6,
        "udp" => 17,
        "icmpv6" | "ipv6-icmp" => 58,
        "sctp" => 132,
        other => other
            .strip_prefix("proto")
            .unwrap_or(other)
            .parse::<u8>()
            .ok()
            .filter(|n| *n != 0)
            .ok_or_else(|| {
                anyhow::anyhow!("unknown protocol {s:?} (tcp, udp, icmp, icmpv6, sctp or 1-255)")
            })?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracer_common::source;

    fn base() -> DropRecord {
        DropRecord {
            ts_ns: 5,
            reason: 12,
            source: source::KFREE_SKB,
            ..bytemuck::Zeroable::zeroed()
        }
    }

    #[test]
    fn ipv4_udp() {
        let mut r = base();
        r.flags = flags::HAS_L3 | flags::HAS_L4 | flags::HAS_NETNS | flags::HAS_DEV;
        r.l3_proto = ETH_P_IP;
        r.saddr[..4].copy_from_slice(&[198, 18, 0, 1]);
        r.daddr[..4].copy_from_slice(&[198, 18, 0, 2]);
        r.l4_proto = 17;
        r.sport = 4000;
        r.dport = 53;
        r.netns = 4026532000;
        r.ifindex = 3;
        let ev = decode(bytemuck::bytes_of(&r)).unwrap();
        let f = ev.flow.unwrap();
        assert_eq!(f.src.to_string(), "198.18.0.1");
        assert_eq!(f.dst.to_string(), "198.18.0.2");
        assert_eq!(f.ports, Some((4000, 53)));
        assert_eq!(ev.netns, Some(4026532000));
        assert_eq!(ev.ifindex, Some(3));
        assert!(ev.icmp.is_none() && ev.ct.is_none() && ev.ct_fill.is_none());
    }

    #[test]
    fn ipv6_echo_request() {
        let mut r = base();
        r.flags = flags::HAS_L3 | flags::HAS_L4 | flags::ICMP_ECHO;
        r.l3_proto = ETH_P_IPV6;
        r.saddr = "2001:db8::1".parse::<Ipv6Addr>().unwrap().octets();
        r.daddr = "2001:db8::2".parse::<Ipv6Addr>().unwrap().octets();
        r.l4_proto = 58;
        r.icmp_type = 128;
        r.icmp_id = 77;
        r.icmp_seq = 65535;
        let ev = decode(bytemuck::bytes_of(&r)).unwrap();
        assert_eq!(ev.flow.as_ref().unwrap().src.to_string(), "2001:db8::1");
        assert_eq!(ev.flow.as_ref().unwrap().ports, None);
        let icmp = ev.icmp.unwrap();
        assert_eq!(icmp.echo, Some((77, 65535)));
        assert!(icmp.is_echo_request(58));
    }

    #[test]
    fn truncated_headers_keep_what_was_read() {
        let mut r = base();
        r.flags = flags::HAS_L3 | flags::TRUNCATED;
        r.l3_proto = ETH_P_IP;
        r.l4_proto = 6;
        r.sport = 1; // not valid without HAS_L4
        let ev = decode(bytemuck::bytes_of(&r)).unwrap();
        assert!(ev.truncated);
        assert_eq!(ev.flow.unwrap().ports, None);
    }

    #[test]
    fn short_and_garbled_records_are_errors() {
        let r = base();
        let b = bytemuck::bytes_of(&r);
        assert_eq!(
            decode(&b[..RECORD_LEN - 1]),
            Err(DecodeError::Short {
                len: RECORD_LEN - 1,
                need: RECORD_LEN
            })
        );
        let mut bad = r;
        bad.flags = flags::HAS_L3;
        bad.l3_proto = 0x1234;
        assert_eq!(
            decode(bytemuck::bytes_of(&bad)),
            Err(DecodeError::BadAddressFamily(0x1234))
        );
        let mut hdr = r;
        hdr.flags = flags::HAS_HEADER;
        assert!(matches!(
            decode(bytemuck::bytes_of(&hdr)),
            Err(DecodeError::Short { .. })
        ));
    }

    #[test]
    fn conntrack_reference_and_untracked() {
        let mut r = base();
        r.flags = flags::HAS_CT | flags::HAS_CT_STATUS;
        r.ct_info = 7;
        r.ct_status = 0x8;
        let ev = decode(bytemuck::bytes_of(&r)).unwrap();
        assert!(ev.ct.unwrap().untracked());
        assert_eq!(ev.ct.unwrap().status, Some(8));
    }

    #[test]
    fn hand_made_broken_records() {
        // Nothing at all.
        assert_eq!(
            decode(&[]),
            Err(DecodeError::Short {
                len: 0,
                need: RECORD_LEN
            })
        );
        // Every bit set: flags claim everything, the address family is junk.
        assert_eq!(
            decode(&[0xff; RECORD_LEN + HEADER_CAPTURE_LEN]),
            Err(DecodeError::BadAddressFamily(0xffff))
        );
        // A header promised and cut in half.
        let mut r = base();
        r.flags = flags::HAS_HEADER;
        let mut b = bytemuck::bytes_of(&r).to_vec();
        b.extend_from_slice(&[7; HEADER_CAPTURE_LEN / 2]);
        assert_eq!(
            decode(&b),
            Err(DecodeError::Short {
                len: b.len(),
                need: RECORD_LEN + HEADER_CAPTURE_LEN
            })
        );
        // L4 claimed without L3: ICMP fields but no flow, and no panic downstream.
        let mut r = base();
        r.flags = flags::HAS_L4 | flags::ICMP_ECHO;
        r.l4_proto = 1;
        r.icmp_type = 8;
        let ev = decode(bytemuck::bytes_of(&r)).unwrap();
        assert!(ev.flow.is_none());
        assert_eq!(ev.icmp.unwrap().echo, Some((0, 0)));
        // IPv4 with garbage in the unused tail of the address fields.
        let mut r = base();
        r.flags = flags::HAS_L3;
        r.l3_proto = ETH_P_IP;
        r.saddr = [10, 0, 0, 1, 0xde, 0xad, 0xbe, 0xef, 1, 2, 3, 4, 5, 6, 7, 8];
        assert_eq!(
            decode(bytemuck::bytes_of(&r))
                .unwrap()
                .flow
                .unwrap()
                .src
                .to_string(),
            "10.0.0.1"
        );
    }

    /// A stored snapshot names ports' protocols with `proto_name`; reading
    /// one back must give the number it was written from, for every number.
    #[test]
    fn every_protocol_name_parses_back_to_its_number() {
        for n in 1..=255u8 {
            assert_eq!(parse_proto(&proto_name(n)).unwrap(), n, "{}", proto_name(n));
        }
    }
}

/// Decoding is fed whatever the ring holds: arbitrary bytes must never
/// panic, anywhere from decode to the outputs, and a valid record must come
/// back as it was written. Case counts are fixed and small so CI stays fast.
#[cfg(test)]
mod fuzz {
    use super::*;
    use crate::{cause::Classifier, flows::Tally, model::DropLine, output::Shown};
    use proptest::prelude::*;

    const CASES: u32 = 512;

    /// Runs a decoded event through everything downstream of decode.
    fn downstream(ev: &DropEvent) {
        let cause = Classifier {
            netfilter_drop: Some(12),
            reinject: None,
            probes: false,
        }
        .classify(ev);
        let mut t = Tally::new(4);
        t.record(ev, cause);
        let _ = t.top_flows(10);
        let shown = Shown {
            ev,
            cause,
            wall_ns: ev.ts_ns,
            reason: "R",
            netns_name: None,
            ifname: None,
            location: "",
        };
        serde_json::to_string(&DropLine::from_shown(&shown)).unwrap();
        let _ = proto_name(ev.flow.as_ref().map_or(0, |f| f.proto));
    }

    fn record() -> impl Strategy<Value = DropRecord> {
        (
            prop::collection::vec(any::<u8>(), RECORD_LEN),
            prop::sample::select(vec![ETH_P_IP, ETH_P_IPV6, 0]),
        )
            .prop_map(|(bytes, l3)| {
                let mut r: DropRecord = bytemuck::pod_read_unaligned(&bytes);
                r.l3_proto = l3;
                if l3 == 0 {
                    r.flags &= !flags::HAS_L3;
                }
                r
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: CASES, ..ProptestConfig::default() })]

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..(RECORD_LEN + HEADER_CAPTURE_LEN) * 2)) {
            match decode(&bytes) {
                Ok(ev) => {
                    prop_assert!(bytes.len() >= RECORD_LEN);
                    prop_assert_eq!(ev.header.is_some(), ev.header.is_some() && bytes.len() >= RECORD_LEN + HEADER_CAPTURE_LEN);
                    downstream(&ev);
                }
                Err(DecodeError::Short { len, need }) => prop_assert!(len == bytes.len() && len < need),
                Err(DecodeError::BadAddressFamily(p)) => prop_assert!(p != ETH_P_IP && p != ETH_P_IPV6),
            }
        }

        #[test]
        fn valid_records_round_trip(r in record(), header in prop::collection::vec(any::<u8>(), HEADER_CAPTURE_LEN), tail in prop::collection::vec(any::<u8>(), 0..16)) {
            let mut bytes = bytemuck::bytes_of(&r).to_vec();
            if r.flags & flags::HAS_HEADER != 0 {
                bytes.extend_from_slice(&header);
            }
            // Bytes past what the flags promise are ignored.
            bytes.extend_from_slice(&tail);
            let ev = decode(&bytes).unwrap();
            let has = |f: u16| r.flags & f != 0;
            prop_assert_eq!((ev.ts_ns, ev.cpu, ev.reason, ev.location, ev.skb), (r.ts_ns, r.cpu, r.reason, r.location, r.skb));
            prop_assert_eq!((ev.source, ev.skb_len), (r.source, r.skb_len));
            prop_assert_eq!(ev.netns, has(flags::HAS_NETNS).then_some(r.netns));
            prop_assert_eq!(ev.ifindex, has(flags::HAS_DEV).then_some(r.ifindex));
            prop_assert_eq!(ev.truncated, has(flags::TRUNCATED));
            match &ev.flow {
                None => prop_assert!(!has(flags::HAS_L3)),
                Some(f) => {
                    prop_assert!(has(flags::HAS_L3));
                    prop_assert_eq!(f.proto, r.l4_proto);
                    let (s, d) = match (f.src, f.dst) {
                        (IpAddr::V4(s), IpAddr::V4(d)) => {
                            prop_assert_eq!(r.l3_proto, ETH_P_IP);
                            (s.octets().to_vec(), d.octets().to_vec())
                        }
                        (IpAddr::V6(s), IpAddr::V6(d)) => {
                            prop_assert_eq!(r.l3_proto, ETH_P_IPV6);
                            (s.octets().to_vec(), d.octets().to_vec())
                        }
                        _ => return Err(TestCaseError::fail("mixed address families")),
                    };
                    prop_assert_eq!(&s[..], &r.saddr[..s.len()]);
                    prop_assert_eq!(&d[..], &r.daddr[..d.len()]);
                    let ports = has(flags::HAS_L4) && (r.l4_proto == 6 || r.l4_proto == 17);
                    prop_assert_eq!(f.ports, ports.then_some((r.sport, r.dport)));
                }
            }
            let icmp = has(flags::HAS_L4) && (r.l4_proto == 1 || r.l4_proto == 58);
            prop_assert_eq!(ev.icmp.is_some(), icmp);
            if let Some(i) = ev.icmp {
                prop_assert_eq!((i.ty, i.code), (r.icmp_type, r.icmp_code));
                prop_assert_eq!(i.echo, has(flags::ICMP_ECHO).then_some((r.icmp_id, r.icmp_seq)));
            }
            prop_assert_eq!(ev.ct.map(|c| (c.info, c.zone)), has(flags::HAS_CT).then_some((r.ct_info, r.zone)));
            prop_assert_eq!(ev.ct.and_then(|c| c.status), (has(flags::HAS_CT) && has(flags::HAS_CT_STATUS)).then_some(r.ct_status));
            // No record carries a table fill: whatever its bits say, none is made up.
            prop_assert_eq!(ev.ct_fill, None);
            prop_assert_eq!(ev.header.as_deref().map(|h| &h[..]), has(flags::HAS_HEADER).then_some(&header[..]));
            downstream(&ev);
        }

        #[test]
        fn any_cut_of_a_valid_record_is_a_short_error(r in record(), cut in 0usize..RECORD_LEN + HEADER_CAPTURE_LEN) {
            let mut bytes = bytemuck::bytes_of(&r).to_vec();
            bytes.extend_from_slice(&[0u8; HEADER_CAPTURE_LEN]);
            let need = if r.flags & flags::HAS_HEADER != 0 { RECORD_LEN + HEADER_CAPTURE_LEN } else { RECORD_LEN };
            if cut < RECORD_LEN {
                prop_assert_eq!(decode(&bytes[..cut]), Err(DecodeError::Short { len: cut, need: RECORD_LEN }));
            } else if cut < need {
                prop_assert_eq!(decode(&bytes[..cut]), Err(DecodeError::Short { len: cut, need }));
            } else {
                prop_assert!(decode(&bytes[..cut]).is_ok());
            }
        }
    }
}
