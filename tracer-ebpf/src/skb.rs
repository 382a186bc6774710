//! Readers for `struct sk_buff` and the packet headers it points at.
//!
//! Two ways to read a kernel struct field:
//! - [`read`]: `bpf_probe_read_kernel`, a helper call per field; works on
//!   any address, so the kprobe programs (untyped arguments) use it.
//! - [`load`]: a plain load. In a `tp_btf` program the skb argument is a
//!   BTF-typed pointer, and so is every pointer field loaded through it
//!   (`skb->dev`, `dev->nd_net.net`, `skb->sk`, ...): the verifier checks
//!   each load against BTF and turns it into a fault-tolerant load, so no
//!   helper is needed. The offset must be a constant the verifier knows:
//!   it is, because `OFFSETS` lives in the frozen, program-read-only
//!   `.rodata` map. In `cargo xtask bench` this took the drop path from
//!   ~240 to ~?? ns per drop.
//! Packet bytes (`skb->head` is an `unsigned char *`, a plain number to
//! the verifier) and anything reached through `_nfct` (a tagged integer)
//! are not BTF-typed, so they still go through `bpf_probe_read_kernel`.

use aya_ebpf::helpers::{bpf_probe_read_kernel, bpf_probe_read_kernel_buf};
use tracer_common::{flags, DropRecord, OFFSET_ABSENT};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ICMPV6: u8 = 58;

#[inline(always)]
pub unsafe fn read<T>(base: *const u8, off: u32) -> Option<T> {
    if off == OFFSET_ABSENT || base.is_null() {
        return None;
    }
    bpf_probe_read_kernel(base.add(off as usize) as *const T).ok()
}

/// A field of a BTF-typed kernel object (see the module comment): only for
/// pointers that came from a `tp_btf` argument or from a `load` of a
/// pointer field of one.
#[inline(always)]
pub unsafe fn load<T: Copy>(base: *const u8, off: u32) -> Option<T> {
    if off == OFFSET_ABSENT || base.is_null() {
        return None;
    }
    // SAFETY: the verifier checks this load against the BTF type of `base`
    // and makes it fault-tolerant (a bad address reads as zero).
    Some(core::ptr::read_volatile(base.add(off as usize) as *const T))
}

/// Network namespace inode of a `struct net *`.
#[inline(always)]
pub unsafe fn net_inum(net: *const u8) -> Option<u32> {
    read::<u32>(net, off!(net_inum))
}

/// Fills device, namespace, conntrack and header fields of `rec` from
/// `skb`, a BTF-typed `struct sk_buff *` (tp_btf argument).
#[inline(always)]
pub unsafe fn fill(skb: *const u8, rec: &mut DropRecord, conn_status: bool) {
    rec.skb = skb as u64;
    if let Some(len) = load::<u32>(skb, off!(skb_len)) {
        rec.skb_len = len;
    }
    let dev: *const u8 = load::<*const u8>(skb, off!(skb_dev)).unwrap_or(core::ptr::null());
    if !dev.is_null() {
        if let Some(ifindex) = load::<u32>(dev, off!(dev_ifindex)) {
            rec.ifindex = ifindex;
            rec.flags |= flags::HAS_DEV;
        }
        let net = load::<*const u8>(dev, off!(dev_nd_net)).unwrap_or(core::ptr::null());
        if let Some(inum) = load::<u32>(net, off!(net_inum)) {
            rec.netns = inum;
            rec.flags |= flags::HAS_NETNS;
        }
    }
    if rec.flags & flags::HAS_NETNS == 0 {
        let sk = load::<*const u8>(skb, off!(skb_sk)).unwrap_or(core::ptr::null());
        let net = load::<*const u8>(sk, off!(sk_net)).unwrap_or(core::ptr::null());
        if let Some(inum) = load::<u32>(net, off!(net_inum)) {
            rec.netns = inum;
            rec.flags |= flags::HAS_NETNS;
        }
    }
    let nfct = load::<u64>(skb, off!(skb_nfct)).unwrap_or(0);
    if nfct != 0 {
        rec.flags |= flags::HAS_CT;
        rec.ct_info = (nfct & 7) as u8;
        // `_nfct` is an integer to the verifier: the entry is read with the helper.
        let ct = (nfct & !7) as *const u8;
        if conn_status && rec.ct_info != 7 {
            if let Some(status) = read::<u64>(ct, off!(conn_status)) {
                rec.ct_status = status as u32;
                rec.flags |= flags::HAS_CT_STATUS;
            }
            if let Some(zone) = read::<u16>(ct, off!(conn_zone_id)) {
                rec.zone = zone;
            }
        }
    }
    rec.l3_proto = u16::from_be(load::<u16>(skb, off!(skb_protocol)).unwrap_or(0));
    let Some(l3) = network_header(skb) else { return };
    parse_l3(l3, rec);
}

/// `skb->head + skb->network_header`, when set.
#[inline(always)]
unsafe fn network_header(skb: *const u8) -> Option<*const u8> {
    let head = load::<*const u8>(skb, off!(skb_head)).unwrap_or(core::ptr::null());
    let nh = load::<u16>(skb, off!(skb_network_header)).unwrap_or(0xffff);
    if head.is_null() || nh == 0xffff {
        return None;
    }
    Some(head.add(nh as usize))
}

/// Header bytes of an IPv6 header, the longer of the two.
const L3_READ: usize = 40;

#[inline(always)]
unsafe fn parse_l3(l3: *const u8, rec: &mut DropRecord) {
    let mut h = [0u8; L3_READ];
    if bpf_probe_read_kernel_buf(l3, &mut h).is_err() {
        rec.flags |= flags::TRUNCATED;
        return;
    }
    let version = h[0] >> 4;
    let l4: *const u8;
    if version == 4 {
        rec.l3_proto = ETH_P_IP;
        rec.saddr[..4].copy_from_slice(&h[12..16]);
        rec.daddr[..4].copy_from_slice(&h[16..20]);
        rec.l4_proto = h[9];
        rec.flags |= flags::HAS_L3;
        // Fragments after the first carry no L4 header.
        let frag_off = u16::from_be_bytes([h[6], h[7]]) & 0x1fff;
        if frag_off != 0 {
            return;
        }
        let ihl = ((h[0] & 0x0f) as usize) * 4;
        if ihl < 20 {
            rec.flags |= flags::TRUNCATED;
            return;
        }
        l4 = l3.add(ihl);
    } else if version == 6 {
        rec.l3_proto = ETH_P_IPV6;
        rec.saddr.copy_from_slice(&h[8..24]);
        rec.daddr.copy_from_slice(&h[24..40]);
        rec.l4_proto = h[6];
        rec.flags |= flags::HAS_L3;
        l4 = l3.add(40);
    } else {
        return;
    }
    parse_l4(l4, rec);
}

#[inline(always)]
unsafe fn parse_l4(l4: *const u8, rec: &mut DropRecord) {
    let proto = rec.l4_proto;
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP && proto != IPPROTO_ICMP && proto != IPPROTO_ICMPV6 {
        return;
    }
    let mut h = [0u8; 8];
    if bpf_probe_read_kernel_buf(l4, &mut h).is_err() {
        rec.flags |= flags::TRUNCATED;
        return;
    }
    rec.flags |= flags::HAS_L4;
    if proto == IPPROTO_TCP || proto == IPPROTO_UDP {
        rec.sport = u16::from_be_bytes([h[0], h[1]]);
        rec.dport = u16::from_be_bytes([h[2], h[3]]);
        return;
    }
    rec.icmp_type = h[0];
    rec.icmp_code = h[1];
    let echo = if proto == IPPROTO_ICMP {
        h[0] == 8 || h[0] == 0
    } else {
        h[0] == 128 || h[0] == 129
    };
    if echo {
        rec.icmp_id = u16::from_be_bytes([h[4], h[5]]);
        rec.icmp_seq = u16::from_be_bytes([h[6], h[7]]);
        rec.flags |= flags::ICMP_ECHO;
    }
}

/// Copies the first bytes of the network header for pcap export.
#[inline(always)]
pub unsafe fn copy_header(skb: *const u8, out: &mut [u8; tracer_common::HEADER_CAPTURE_LEN]) -> bool {
    match network_header(skb) {
        Some(l3) => bpf_probe_read_kernel_buf(l3, out).is_ok(),
        None => false,
    }
}
