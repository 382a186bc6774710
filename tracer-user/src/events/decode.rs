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
    pub detail: u8,
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
        return Err(DecodeError::Short { len: bytes.len(), need: RECORD_LEN });
    }
    let r: DropRecord = bytemuck::pod_read_unaligned(&bytes[..RECORD_LEN]);
    let mut ev = from_record(&r)?;
    if r.flags & flags::HAS_HEADER != 0 {
        let need = RECORD_LEN + HEADER_CAPTURE_LEN;
        if bytes.len() < need {
            return Err(DecodeError::Short { len: bytes.len(), need });
        }
        let mut h = Box::new([0u8; HEADER_CAPTURE_LEN]);
        h.copy_from_slice(&bytes[RECORD_LEN..need]);
        ev.header = Some(h);
    }
    Ok(ev)
}

pub fn from_record(r: &DropRecord) -> Result<DropEvent, DecodeError> {
    let has = |f: u16| r.flags & f != 0;
    let flow = if has(flags::HAS_L3) {
        let (src, dst) = match r.l3_proto {
            ETH_P_IP => (
                IpAddr::V4(Ipv4Addr::new(r.saddr[0], r.saddr[1], r.saddr[2], r.saddr[3])),
                IpAddr::V4(Ipv4Addr::new(r.daddr[0], r.daddr[1], r.daddr[2], r.daddr[3])),
            ),
            ETH_P_IPV6 => (IpAddr::V6(Ipv6Addr::from(r.saddr)), IpAddr::V6(Ipv6Addr::from(r.daddr))),
            other => return Err(DecodeError::BadAddressFamily(other)),
        };
        let l4 = has(flags::HAS_L4);
        let ports = (l4 && (r.l4_proto == 6 || r.l4_proto == 17)).then_some((r.sport, r.dport));
        Some(Flow { src, dst, proto: r.l4_proto, ports })
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
    let ct_fill = has(flags::CT_FILL_KERNEL).then_some(CtFill { count: r.ct_count as u64, max: r.ct_max as u64, sampled: false, counted_drop: None });
    Ok(DropEvent {
        ts_ns: r.ts_ns,
        cpu: r.cpu,
        reason: r.reason,
        location: r.location,
        skb: r.skb,
        source: r.source,
        detail: r.detail,
        netns: has(flags::HAS_NETNS).then_some(r.netns),
        ifindex: has(flags::HAS_DEV).then_some(r.ifindex),
        skb_len: r.skb_len,
        flow,
        icmp,
        ct,
        ct_fill,
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

#[cfg(test)]
mod tests {
    use super::*;
    use tracer_common::source;

    fn base() -> DropRecord {
        DropRecord { ts_ns: 5, reason: 12, source: source::KFREE_SKB, ..bytemuck::Zeroable::zeroed() }
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
        assert_eq!(decode(&b[..RECORD_LEN - 1]), Err(DecodeError::Short { len: RECORD_LEN - 1, need: RECORD_LEN }));
        let mut bad = r;
        bad.flags = flags::HAS_L3;
        bad.l3_proto = 0x1234;
        assert_eq!(decode(bytemuck::bytes_of(&bad)), Err(DecodeError::BadAddressFamily(0x1234)));
        let mut hdr = r;
        hdr.flags = flags::HAS_HEADER;
        assert!(matches!(decode(bytemuck::bytes_of(&hdr)), Err(DecodeError::Short { .. })));
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
}
