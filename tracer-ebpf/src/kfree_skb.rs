//! `tp_btf/kfree_skb`: every freed-as-dropped skb, with its drop reason.

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP, BPF_RB_RING_SIZE},
    helpers::{bpf_get_smp_processor_id, bpf_ktime_get_ns},
    macros::btf_tracepoint,
    programs::BtfTracePointContext,
};
use tracer_common::{flags, source, stat, DropRecord, DropRecordWithHeader, FlowCount, FlowKey, GroupKey};

use crate::{bump, filter::matches, skb, EVENTS, FLOWS, GROUPS, SCRATCH, STATS};

#[btf_tracepoint(function = "kfree_skb")]
pub fn kfree_skb(ctx: BtfTracePointContext) -> i32 {
    unsafe { handle(&ctx) };
    0
}

#[inline(always)]
unsafe fn handle(ctx: &BtfTracePointContext) {
    bump(stat::SEEN);
    let reason: u32 = ctx.arg::<u64>(2) as u32;
    // Cheapest test first: most drops on a busy host are not netfilter's.
    if filt!(all_reasons) == 0 && reason != filt!(netfilter_drop_reason) {
        return;
    }
    let skb_ptr: *const u8 = ctx.arg(0);
    let Some(rec) = SCRATCH.get_ptr_mut(0) else { return };
    let rec = &mut *rec;
    *rec = bytemuck_zeroed();
    rec.ts_ns = bpf_ktime_get_ns();
    rec.location = ctx.arg::<u64>(1);
    rec.reason = reason;
    rec.cpu = bpf_get_smp_processor_id();
    rec.source = source::KFREE_SKB;
    skb::fill(skb_ptr, rec, true);
    if !matches(rec) {
        return;
    }
    if filt!(ct_probes) != 0 {
        if let Some(src) = crate::conntrack::take_verdict(skb_ptr as u64, rec.ts_ns) {
            rec.source = src;
        }
    }
    if filt!(count_only) != 0 {
        count(rec);
        return;
    }
    if filt!(capture_headers) != 0 {
        let wake = wakeup_flags(core::mem::size_of::<DropRecordWithHeader>() as u64);
        match EVENTS.reserve::<DropRecordWithHeader>(0) {
            Some(mut entry) => {
                let out = entry.as_mut_ptr();
                rec.flags |= flags::HAS_HEADER;
                (*out).rec = *rec;
                if !skb::copy_header(skb_ptr, &mut (*out).header) {
                    (*out).rec.flags &= !flags::HAS_HEADER;
                }
                entry.submit(wake);
                bump(stat::SENT);
            }
            None => bump(stat::LOST),
        }
        return;
    }
    match EVENTS.output::<DropRecord>(&*rec, wakeup_flags(core::mem::size_of::<DropRecord>() as u64)) {
        Ok(()) => bump(stat::SENT),
        Err(_) => bump(stat::LOST),
    }
}

/// The reader is woken each time the ring's unread data crosses a multiple
/// of this fraction of its size.
const WAKEUP_FRACTION: u64 = 16;
/// Ring-buffer header in front of every record.
const RINGBUF_HDR: u64 = 8;

/// Waking the reader costs the dropping CPU an irq_work and a cross-CPU
/// wakeup; done per record (the kernel's default while the reader keeps up)
/// it cut the drop path to 0.3-0.4 of its untraced rate in `cargo xtask
/// bench`. So records go in silently and the reader is woken once per
/// 1/16 of the ring; userspace also drains every 50 ms, which bounds the
/// delay when drops are rare. Waking at every multiple, not only the first,
/// means a crossing missed by two CPUs racing is caught at the next one.
#[inline(always)]
fn wakeup_flags(len: u64) -> u64 {
    let mark = EVENTS.query(BPF_RB_RING_SIZE as u64) / WAKEUP_FRACTION;
    let avail = EVENTS.query(BPF_RB_AVAIL_DATA as u64);
    let after = avail + ((len + RINGBUF_HDR + 7) & !7);
    if mark != 0 && avail / mark != after / mark {
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        BPF_RB_NO_WAKEUP as u64
    }
}

#[inline(always)]
fn bytemuck_zeroed() -> DropRecord {
    // SAFETY: DropRecord is Pod; all-zero is a valid value.
    unsafe { core::mem::zeroed() }
}

// Not inlined: its keys get their own stack frame instead of pushing
// handle()'s past the 512-byte limit.
#[inline(never)]
unsafe fn count(rec: &DropRecord) {
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
    bump(stat::COUNTED);
    let group = GroupKey {
        netns: rec.netns,
        reason: rec.reason,
        l4_proto: rec.l4_proto,
        has_ct: key.has_ct,
        icmp_type: rec.icmp_type,
        icmp_code: rec.icmp_code,
    };
    // Per-CPU values: no atomics, no shared cache lines; userspace sums.
    match GROUPS.get_ptr_mut(&group) {
        Some(n) => *n += 1,
        None => {
            if GROUPS.insert(&group, &1u64, 0).is_err() {
                bump(stat::GROUP_MAP_FULL);
            }
        }
    }
    if let Some(v) = FLOWS.get_ptr_mut(&key) {
        (*v).packets += 1;
        (*v).bytes += rec.skb_len as u64;
        (*v).last_ns = rec.ts_ns;
        return;
    }
    // Nothing is ever deleted from FLOWS, so once an insert on this CPU
    // failed for lack of room every later one would too: skip the attempt
    // (it takes the bucket lock) and only count. Under a flood of new flows
    // this is every packet after the first 65536 flows.
    if let Some(full) = STATS.get_ptr_mut(stat::FLOW_MAP_FULL) {
        if *full != 0 {
            *full += 1;
            return;
        }
    }
    let v = FlowCount { packets: 1, bytes: rec.skb_len as u64, first_ns: rec.ts_ns, last_ns: rec.ts_ns };
    if FLOWS.insert(&key, &v, 0).is_err() {
        bump(stat::FLOW_MAP_FULL);
    }
}
