//! One conntrack entry of a dump, read from its netlink attributes.

use std::net::IpAddr;

use netlink_packet_core::{NlaBuffer, NlasIterator};
use netlink_packet_netfilter::conntrack::Status;

/// One conntrack entry as far as occupancy cares: its original direction,
/// its TCP state and its status bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtEntry {
    pub proto: u8,
    pub src: IpAddr,
    pub dst: IpAddr,
    /// TCP/UDP/SCTP ports of the original direction; 0 otherwise.
    pub sport: u16,
    pub dport: u16,
    pub tcp_state: Option<u8>,
    pub status: u32,
}

/// Whether an entry has seen its peer answer, and whether it is protected
/// from early eviction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Liveness {
    /// One direction only: evictable when the table is full.
    Unreplied,
    /// Answered but not (yet) assured.
    Replied,
    /// Both directions seen long enough: never evicted early.
    Assured,
}

impl Liveness {
    pub fn as_str(self) -> &'static str {
        match self {
            Liveness::Unreplied => "UNREPLIED",
            Liveness::Replied => "REPLIED",
            Liveness::Assured => "ASSURED",
        }
    }
}

impl CtEntry {
    pub fn liveness(&self) -> Liveness {
        let s = Status::from_bits_retain(self.status);
        if s.contains(Status::Assured) {
            Liveness::Assured
        } else if s.contains(Status::SeenReply) {
            Liveness::Replied
        } else {
            Liveness::Unreplied
        }
    }

    pub fn natted(&self) -> bool {
        Status::from_bits_retain(self.status).intersects(Status::NatMask)
    }

    /// What `conntrack -L` shows as the state: the TCP state for TCP,
    /// the liveness for protocols without states.
    pub fn state_label(&self) -> &'static str {
        match self.tcp_state {
            Some(s) => tcp_state_name(s),
            None => self.liveness().as_str(),
        }
    }

    /// Reads the fields we need out of one dumped entry's attributes (the
    /// payload after the netfilter header), without allocating: a full
    /// table is 262144 of these.
    pub fn from_nlas(attrs: &[u8]) -> Option<CtEntry> {
        let (mut orig, mut status, mut tcp_state) = (None, 0u32, None);
        for nla in NlasIterator::new(attrs) {
            let nla = nla.ok()?;
            match nla.kind() {
                CTA_TUPLE_ORIG => orig = Some(owned_value(nla)),
                CTA_STATUS => status = u32::from_be_bytes(nla.value().get(..4)?.try_into().ok()?),
                CTA_PROTOINFO => {
                    for info in NlasIterator::new(nla.value()).flatten() {
                        if info.kind() != CTA_PROTOINFO_TCP {
                            continue;
                        }
                        for t in NlasIterator::new(info.value()).flatten() {
                            if t.kind() == CTA_PROTOINFO_TCP_STATE {
                                tcp_state = t.value().first().copied();
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        let (mut src, mut dst, mut proto, mut sport, mut dport) = (None, None, None, 0, 0);
        for part in NlasIterator::new(orig?) {
            let part = part.ok()?;
            match part.kind() {
                CTA_TUPLE_IP => {
                    for ip in NlasIterator::new(part.value()) {
                        let ip = ip.ok()?;
                        let v = ip.value();
                        let addr = match ip.kind() {
                            CTA_IP_V4_SRC | CTA_IP_V4_DST => {
                                IpAddr::from(<[u8; 4]>::try_from(v.get(..4)?).ok()?)
                            }
                            CTA_IP_V6_SRC | CTA_IP_V6_DST => {
                                IpAddr::from(<[u8; 16]>::try_from(v.get(..16)?).ok()?)
                            }
                            _ => continue,
                        };
                        if matches!(ip.kind(), CTA_IP_V4_SRC | CTA_IP_V6_SRC) {
                            src = Some(addr);
                        } else {
                            dst = Some(addr);
                        }
                    }
                }
                CTA_TUPLE_PROTO => {
                    for p in NlasIterator::new(part.value()) {
                        let p = p.ok()?;
                        let v = p.value();
                        match p.kind() {
                            CTA_PROTO_NUM => proto = v.first().copied(),
                            CTA_PROTO_SRC_PORT => {
                                sport = u16::from_be_bytes(v.get(..2)?.try_into().ok()?)
                            }
                            CTA_PROTO_DST_PORT => {
                                dport = u16::from_be_bytes(v.get(..2)?.try_into().ok()?)
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        let proto = proto?;
        Some(CtEntry {
            proto,
            src: src?,
            dst: dst?,
            sport,
            dport,
            tcp_state: if proto == 6 { tcp_state } else { None },
            status,
        })
    }
}

/// The value of an attribute, borrowed from the dump buffer rather than
/// from the attribute view.
fn owned_value(nla: NlaBuffer<&[u8]>) -> &[u8] {
    let len = nla.length() as usize;
    let b = nla.into_inner();
    b.get(4..len).unwrap_or(&[])
}

// Attribute numbers from uapi/linux/netfilter/nfnetlink_conntrack.h.
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_STATUS: u16 = 3;
const CTA_PROTOINFO: u16 = 4;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
const CTA_PROTOINFO_TCP: u16 = 1;
const CTA_PROTOINFO_TCP_STATE: u16 = 1;

/// Names from the kernel's `enum tcp_conntrack`, as `conntrack -L` prints them.
pub fn tcp_state_name(s: u8) -> &'static str {
    match s {
        0 => "NONE",
        1 => "SYN_SENT",
        2 => "SYN_RECV",
        3 => "ESTABLISHED",
        4 => "FIN_WAIT",
        5 => "CLOSE_WAIT",
        6 => "LAST_ACK",
        7 => "TIME_WAIT",
        8 => "CLOSE",
        9 => "SYN_SENT2",
        _ => "UNKNOWN",
    }
}
