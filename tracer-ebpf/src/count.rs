//! Count mode's per-drop work: every drop in its group's counter (namespace,
//! reason, protocol, conntrack reference, ICMP type/code), and a sample of
//! drops, 1 in `COUNT_CONFIG.flow_sample` on average, also in its flow's
//! counter. No hash map and no insert on the common path.
//!
//! Why sampled: the group needs only a few skb fields and the first
//! header bytes; a flow needs the addresses and ports parsed into a
//! 48-byte key, hashed, compared and timestamped, which cost as much again
//! (`cargo xtask bench` (c), README "Performance"). Totals come only from
//! the groups, so they stay exact; per-flow counts are estimates that
//! userspace scales by the sampling rate and labels as such.
//!
//! Both counters live in per-CPU arrays of 4-way sets: hash the key, look
//! up its set (one array lookup), compare with up to four slots. A new key
//! takes the set's first free slot and keeps it (slots are never freed, so
//! a key is always found before the first free slot). Under a flood of new
//! flows the flow sets fill up and every later sampled new flow costs one
//! lookup and four compares, then is counted only in the totals. Groups are
//! few; a group whose set is full falls back to the per-CPU group hash, so
//! group totals stay exact whatever the flood.

use aya_ebpf::{
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns},
    macros::map,
    maps::{PerCpuArray, PerCpuHashMap},
};
use tracer_common::{
    flags, stat, DropRecord, FlowKey, FlowSet, GroupKey, GroupSet, FLOW_SETS, GROUP_MAP_ENTRIES,
    GROUP_SETS, SET_WAYS,
};

use crate::{
    bump,
    skb::{self, Via},
};

/// Drops left on this CPU until the next one sampled for per-flow detail.
#[map]
static FLOW_COUNTDOWN: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

#[map]
static GROUP_SET_ARRAY: PerCpuArray<GroupSet> = PerCpuArray::with_max_entries(GROUP_SETS, 0);

/// Groups whose set in `GROUP_SET_ARRAY` was full (rare: > 4 groups
/// hashing to one of 256 sets on one CPU).
#[map]
static GROUPS: PerCpuHashMap<GroupKey, u64> = PerCpuHashMap::with_max_entries(GROUP_MAP_ENTRIES, 0);

#[map]
static FLOW_SET_ARRAY: PerCpuArray<FlowSet> = PerCpuArray::with_max_entries(FLOW_SETS, 0);

/// A 32-bit tag of each slot's key (0 = free), 16 bytes per set: a flood of
/// new flows then reads 64 KiB per CPU, which stays in cache, instead of a
/// random 320-byte set of the 1.25 MiB slot array per packet (in `cargo
/// xtask bench` (c) that miss was most of the per-drop cost).
#[map]
static FLOW_TAG_ARRAY: PerCpuArray<[u32; SET_WAYS]> = PerCpuArray::with_max_entries(FLOW_SETS, 0);

const _: () = assert!(GROUP_SETS.is_power_of_two() && FLOW_SETS.is_power_of_two());

/// Multilinear hash (each word times its own odd constant, summed) with a
/// murmur-style finish so the low bits (the tag) depend on every input
/// bit too: two instructions per word where a multiply-xor chain took
/// eight, which made hashing the 12-word flow key most of count mode's
/// per-drop cost. Spread well enough for set selection, not against
/// adversaries: a colliding flood only loses per-flow detail, never counts.
#[inline(always)]
fn mix<const N: usize>(w: &[u32; N]) -> u32 {
    const ODD: [u32; 12] = [
        0x9e37_79b1,
        0x85eb_ca77,
        0xc2b2_ae3d,
        0x27d4_eb2f,
        0x1656_67b1,
        0xd3a2_646d,
        0xfd70_46c5,
        0xb55a_4f09,
        0x8cb9_2ba7,
        0x68e3_1da5,
        0x5bd1_e995,
        0xcc9e_2d51,
    ];
    const _: () = assert!(core::mem::size_of::<FlowKey>() / 4 <= ODD.len());
    let mut h: u32 = 0;
    for i in 0..N {
        h = h.wrapping_add(w[i].wrapping_mul(ODD[i]));
    }
    h ^= h >> 16;
    h = h.wrapping_mul(0x7feb_352d);
    h ^ (h >> 15)
}

/// Word-wise equality without an early exit (a byte compare of arrays
/// would become a call to the linker's byte-wise `bcmp`).
#[inline(always)]
fn same<const N: usize>(a: &[u32; N], b: &[u32; N]) -> bool {
    let mut diff = 0;
    for i in 0..N {
        diff |= a[i] ^ b[i];
    }
    diff == 0
}

/// Word-wise copy (a struct assignment can become a `memcpy` call).
#[inline(always)]
unsafe fn put<const N: usize>(dst: *mut [u32; N], src: &[u32; N]) {
    let d = dst as *mut u32;
    for (i, w) in src.iter().enumerate() {
        // SAFETY: i < N, inside the destination array.
        core::ptr::write_volatile(d.add(i), *w);
    }
}

/// The group of a drop read straight from the skb, without building a
/// record: `None` where the headers are not the common kind (see
/// [`skb::group_l4`]); the caller then builds the record and takes the
/// group from it ([`group_of`]), which gives the same key.
#[inline(always)]
pub unsafe fn skb_group(skb_ptr: *const u8, reason: u32) -> Option<GroupKey> {
    let (l4_proto, icmp_type, icmp_code) = skb::group_l4(skb_ptr)?;
    let dev = skb::skb_dev(skb_ptr, Via::Btf);
    let netns = skb::skb_netns(skb_ptr, dev, Via::Btf).unwrap_or(0);
    let nfct = skb::load::<u64>(skb_ptr, ro!(OFFSETS.skb_nfct)).unwrap_or(0);
    Some(GroupKey {
        netns,
        reason,
        l4_proto,
        has_ct: (nfct != 0) as u8,
        icmp_type,
        icmp_code,
    })
}

/// The group of a built record.
#[inline(always)]
pub fn group_of(rec: &DropRecord) -> GroupKey {
    GroupKey {
        netns: rec.netns,
        reason: rec.reason,
        l4_proto: rec.l4_proto,
        has_ct: (rec.flags & flags::HAS_CT != 0) as u8,
        icmp_type: rec.icmp_type,
        icmp_code: rec.icmp_code,
    }
}

/// Whether this drop goes into the per-flow counters too. The gap to the
/// next sampled drop on this CPU is drawn uniformly from 1..=2N-1 (mean
/// N): a fixed period could line up with a periodic traffic pattern and
/// see only some flows. The draw is paid once per sampled drop.
#[inline(always)]
pub unsafe fn sampled() -> bool {
    let n = ro!(COUNT_CONFIG.flow_sample);
    if n <= 1 {
        return true;
    }
    let Some(left) = FLOW_COUNTDOWN.get_ptr_mut(0) else {
        return false;
    };
    if *left > 1 {
        *left -= 1;
        return false;
    }
    *left = bpf_get_prandom_u32() % (2 * n - 1) + 1;
    bump(stat::FLOW_SAMPLED);
    true
}

// Not inlined: its key gets its own stack frame instead of pushing
// handle()'s past 6.1's 512-byte limit.
#[inline(never)]
pub unsafe fn count_flow(rec: &DropRecord) {
    let key = FlowKey {
        saddr: rec.saddr,
        daddr: rec.daddr,
        netns: rec.netns,
        reason: rec.reason,
        sport: rec.sport,
        dport: rec.dport,
        l3_proto: rec.l3_proto,
        l4_proto: rec.l4_proto,
        has_ct: (rec.flags & flags::HAS_CT != 0) as u8,
    };
    count_flow_key(&key, rec);
}

/// One more drop in `group`'s counter. No `COUNTED` total besides: it
/// would be a second per-CPU update per drop for a number userspace gets
/// by summing the groups (plus `GROUP_MAP_FULL`, the drops no group took).
#[inline(always)]
pub unsafe fn count_group(group: &GroupKey) {
    // SAFETY: GroupKey is Pod, 12 bytes, 4-aligned: exactly three words.
    let k: [u32; 3] = core::mem::transmute(*group);
    let set = mix(&k) & (GROUP_SETS - 1);
    if let Some(s) = GROUP_SET_ARRAY.get_ptr_mut(set) {
        for i in 0..SET_WAYS {
            let slot = &mut (*s).slots[i];
            let slot_key = &mut slot.key as *mut GroupKey as *mut [u32; 3];
            if slot.drops == 0 {
                put(slot_key, &k);
                slot.drops = 1;
                return;
            }
            if same(&*slot_key, &k) {
                slot.drops += 1;
                return;
            }
        }
    }
    match GROUPS.get_ptr_mut(group) {
        Some(n) => *n += 1,
        None => {
            if GROUPS.insert(group, &1u64, 0).is_err() {
                bump(stat::GROUP_MAP_FULL);
            }
        }
    }
}

#[inline(always)]
unsafe fn count_flow_key(key: &FlowKey, rec: &DropRecord) {
    // SAFETY: FlowKey is Pod, 48 bytes, 4-aligned: exactly twelve words.
    let k: [u32; 12] = core::mem::transmute(*key);
    let h = mix(&k);
    let set = h & (FLOW_SETS - 1);
    // The bits above the set index; never 0, which marks a free slot.
    let tag = (h >> FLOW_SETS.trailing_zeros()) | 0x8000_0000;
    // Only the tags are read for a key that is not there (a flood of new
    // flows once the sets are full): the slot array is looked up only
    // when a slot is taken or its tag matches.
    if let Some(tags) = FLOW_TAG_ARRAY.get_ptr_mut(set) {
        for i in 0..SET_WAYS {
            let t = (*tags)[i];
            if t != 0 && t != tag {
                continue;
            }
            let Some(s) = FLOW_SET_ARRAY.get_ptr_mut(set) else {
                break;
            };
            let slot = &mut (*s).slots[i];
            let slot_key = &mut slot.key as *mut FlowKey as *mut [u32; 12];
            // The clock only here: a drop that writes no slot needs no time.
            if t == 0 {
                let now = bpf_ktime_get_ns();
                (*tags)[i] = tag;
                put(slot_key, &k);
                slot.count.packets = 1;
                slot.count.bytes = rec.skb_len as u64;
                slot.count.first_ns = now;
                slot.count.last_ns = now;
                return;
            }
            if same(&*slot_key, &k) {
                slot.count.packets += 1;
                slot.count.bytes += rec.skb_len as u64;
                slot.count.last_ns = bpf_ktime_get_ns();
                return;
            }
        }
    }
    bump(stat::FLOW_MAP_FULL);
}
