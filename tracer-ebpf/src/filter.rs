//! The in-kernel filter (`--host`, `--port`, `--netns`, `--ifname`,
//! `--proto`): runs on every netfilter drop before anything is sent, so a
//! filtered-out flood costs no ring space and no userspace time.
//!
//! Values come from the read-only `FILTER` global; the verifier sees them
//! as constants and prunes the kinds that are unused. Each kind is a loop
//! over a fixed-size array with a constant bound, which the compiler
//! unrolls: no loop for older verifiers to walk, and nothing on the stack
//! beyond a few words (6.1 caps the whole program at 512 bytes).

use tracer_common::{flags, DropRecord, FILTER_MAX};

/// Address words as the filter holds them (native-endian reads of the bytes).
#[inline(always)]
fn words(a: &[u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
        u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
        u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
        u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
    ]
}

#[inline(always)]
fn in_net(w: &[u32; 4], i: usize, v6: bool) -> bool {
    let mut eq = true;
    for k in 0..4 {
        if k == 0 || v6 {
            eq &= (w[k] & ro!(FILTER.nets[i].mask[k])) == ro!(FILTER.nets[i].addr[k]);
        }
    }
    eq
}

/// `--netns`: whether a drop in `netns` (`known`: the namespace was read)
/// passes.
#[inline(always)]
pub fn netns_matches(known: bool, netns: u32) -> bool {
    let n = ro!(FILTER.n_netns) as usize;
    if n == 0 {
        return true;
    }
    let mut hit = false;
    for i in 0..FILTER_MAX {
        if i < n {
            hit |= known && ro!(FILTER.netns[i]) == netns;
        }
    }
    hit
}

/// `--proto`: whether a drop of IP protocol `l4_proto` passes.
#[inline(always)]
pub fn proto_matches(l4_proto: u8) -> bool {
    let proto = ro!(FILTER.l4_proto);
    proto == 0 || l4_proto == proto
}

/// Whether the filter needs more of a drop than count mode's group key
/// (namespace, protocol): the device, ports or addresses.
#[inline(always)]
pub fn needs_flow_fields() -> bool {
    ro!(FILTER.n_ifs) != 0 || ro!(FILTER.n_ports) != 0 || ro!(FILTER.n_nets) != 0
}

/// Whether a drop passes every filter the user set.
#[inline(always)]
pub fn matches(r: &DropRecord) -> bool {
    if !netns_matches(r.flags & flags::HAS_NETNS != 0, r.netns) {
        return false;
    }
    let n = ro!(FILTER.n_ifs) as usize;
    if n != 0 {
        let mut hit = false;
        for i in 0..FILTER_MAX {
            if i < n {
                hit |= r.flags & flags::HAS_DEV != 0
                    && ro!(FILTER.ifs[i].netns) == r.netns
                    && ro!(FILTER.ifs[i].ifindex) == r.ifindex;
            }
        }
        if !hit {
            return false;
        }
    }
    if !proto_matches(r.l4_proto) {
        return false;
    }
    let n = ro!(FILTER.n_ports) as usize;
    if n != 0 {
        let mut hit = false;
        for i in 0..FILTER_MAX {
            if i < n {
                let p = ro!(FILTER.ports[i]);
                hit |= r.sport == p || r.dport == p;
            }
        }
        if !hit {
            return false;
        }
    }
    let n = ro!(FILTER.n_nets) as usize;
    if n != 0 {
        let v6_bits = ro!(FILTER.nets_v6);
        let is_v6 = r.l3_proto == 0x86dd;
        if !is_v6 && r.l3_proto != 0x0800 {
            return false;
        }
        let (s, d) = (words(&r.saddr), words(&r.daddr));
        let mut hit = false;
        for i in 0..FILTER_MAX {
            if i < n && ((v6_bits >> i) & 1 != 0) == is_v6 {
                hit |= in_net(&s, i, is_v6) || in_net(&d, i, is_v6);
            }
        }
        if !hit {
            return false;
        }
    }
    true
}
