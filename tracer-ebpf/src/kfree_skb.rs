//! `tp_btf/kfree_skb`: every freed-as-dropped skb, with its drop reason.

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{bpf_get_smp_processor_id, bpf_ktime_get_ns},
    macros::btf_tracepoint,
    programs::BtfTracePointContext,
};
use tracer_common::{ct_signal, flags, source, stat, DropRecord, DropRecordWithHeader};

use crate::{bump, count, filter, filter::matches, skb, EVENTS, SCRATCH};

// Inlined into the entry point the macro wraps it in: otherwise every
// drop paid a BPF-to-BPF call into it.
#[btf_tracepoint(function = "kfree_skb")]
#[inline(always)]
pub fn kfree_skb(ctx: BtfTracePointContext) -> i32 {
    // SAFETY: `ctx` is this tp_btf program's own context; `handle` reads kernel memory only through BTF-checked loads and helpers.
    unsafe { handle(&ctx) };
    0
}

#[inline(always)]
unsafe fn handle(ctx: &BtfTracePointContext) {
    let reason: u32 = ctx.arg::<u64>(2) as u32;
    // Cheapest test first, before even a counter: most drops on a busy
    // host are not netfilter's, and they should cost no more than this.
    if ro!(FILTER.all_reasons) == 0
        && reason != ro!(FILTER.netfilter_drop_reason)
        && !(ro!(FILTER.count_only) == 0 && reinjected(ctx, reason))
    {
        return;
    }
    if ro!(FILTER.count_only) != 0 {
        // No SEEN here: count mode's groups already count what passed
        // the filter, and every counter is a map update per drop.
        count_drop(ctx, reason);
        return;
    }
    // The clock first, before any other memory is touched. Reading it waits
    // for every load already under way (the TSC read is ordered), so after
    // the ring reserve and the skb reads it cost ~20 ns more per drop
    // (`cargo xtask bench`, same run: 145 -> 126 ns per drop).
    let ts = bpf_ktime_get_ns();
    // The record is built where it is sent: reserved in the ring and filled
    // in place, no scratch copy. A drop the filter rejects gives its slot
    // back (discarded slots are skipped by the reader).
    if ro!(FILTER.capture_headers) != 0 {
        let wake = wakeup_flags(core::mem::size_of::<DropRecordWithHeader>() as u64);
        let Some(mut entry) = EVENTS.reserve::<DropRecordWithHeader>(0) else {
            no_room(ctx, reason, ts);
            return;
        };
        let out = entry.as_mut_ptr();
        if !build(ctx, reason, &mut (*out).rec, Detail::Record(ts)) {
            entry.discard(BPF_RB_NO_WAKEUP as u64);
            return;
        }
        crate::log::unparsed(&(*out).rec);
        (*out).rec.flags |= flags::HAS_HEADER;
        if !skb::copy_header(ctx.arg(0), &mut (*out).header) {
            (*out).rec.flags &= !flags::HAS_HEADER;
        }
        entry.submit(wake);
        bump(stat::SENT);
        return;
    }
    let wake = wakeup_flags(core::mem::size_of::<DropRecord>() as u64);
    let Some(mut entry) = EVENTS.reserve::<DropRecord>(0) else {
        no_room(ctx, reason, ts);
        return;
    };
    if !build(ctx, reason, &mut *entry.as_mut_ptr(), Detail::Record(ts)) {
        entry.discard(BPF_RB_NO_WAKEUP as u64);
        return;
    }
    // Here, not in build(): there, a possible use of the record changed how
    // the parser's registers were allocated (29 more instructions per drop
    // with logging off, against 3 here).
    crate::log::unparsed(&*entry.as_ptr());
    entry.submit(wake);
    bump(stat::SENT);
}

/// Count mode: every drop into its group's counter, a sample of them also
/// into their flow's (count.rs). The group needs a few skb fields and the
/// header bytes, not a record: the record is built only for a sampled drop,
/// or for every drop when the filter looks at ports, addresses or devices
/// or every drop is sampled (`--flow-sample 1`: one header read, not two).
#[inline(always)]
unsafe fn count_drop(ctx: &BtfTracePointContext, reason: u32) {
    if !filter::needs_flow_fields() && ro!(COUNT_CONFIG.flow_sample) > 1 {
        if let Some(group) = count::skb_group(ctx.arg(0), reason) {
            if !filter::netns_matches(group.netns != 0, group.netns)
                || !filter::proto_matches(group.l4_proto)
            {
                return;
            }
            count::count_group(&group);
            if count::sampled() {
                count_by_record(ctx, reason, true);
            }
            return;
        }
    }
    count_by_record(ctx, reason, false);
}

/// Count mode through a record of the drop, built in the per-CPU scratch
/// slot: its flow counted, and unless `grouped` (the caller counted its
/// group and sampled it) its group counted and the drop offered to the
/// sampling first. Not inlined: one copy of `build` for both callers (a
/// smaller program for older verifiers to walk), and the common path
/// calls it only for a sampled drop.
#[inline(never)]
unsafe fn count_by_record(ctx: &BtfTracePointContext, reason: u32, grouped: bool) {
    let Some(rec) = SCRATCH.get_ptr_mut(0) else {
        crate::log::no_scratch();
        return;
    };
    let rec = &mut *rec;
    if !build(ctx, reason, rec, Detail::Count) {
        return;
    }
    crate::log::unparsed(rec);
    if !grouped {
        count::count_group(&count::group_of(rec));
        if !count::sampled() {
            return;
        }
    }
    count::count_flow(rec);
}

/// A free `nf_reinject` may have made for conntrack: NOT_SPECIFIED (see
/// `FilterConfig::reinject_reason`) and the packet still holds an entry
/// that never reached the table. Packets die with an unconfirmed entry
/// only between conntrack's first hook and confirm, so the two reads this
/// costs are paid by few of a host's NOT_SPECIFIED frees; `build` then
/// keeps only those a conntrack signal names.
#[inline(always)]
unsafe fn reinjected(ctx: &BtfTracePointContext, reason: u32) -> bool {
    reinject_reason(reason) && skb::unconfirmed_ct(ctx.arg(0))
}

/// `reason` is the one `nf_reinject` frees with (and looking is on).
#[inline(always)]
fn reinject_reason(reason: u32) -> bool {
    let r = ro!(FILTER.reinject_reason);
    r != 0 && reason == r as u32
}

/// How much of a record a drop needs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Detail {
    /// A record for the ring: everything, stamped with this time.
    Record(u64),
    /// Count mode: only what the group and flow keys and the filter use.
    /// No clock read (`bpf_ktime_get_ns` is ~25 ns of a ~70 ns budget on
    /// the bench machine; count.rs reads it only when a flow slot is
    /// written), no `nf_conn` reads, no conntrack verdicts (count mode
    /// runs without producers).
    Count,
}

/// Fills `rec` for this drop (all of it: ring memory is not zeroed) and
/// decides whether it is reported: the filter, then the conntrack verdict.
#[inline(always)]
unsafe fn build(
    ctx: &BtfTracePointContext,
    reason: u32,
    rec: &mut DropRecord,
    detail: Detail,
) -> bool {
    let skb_ptr: *const u8 = ctx.arg(0);
    zero(rec);
    rec.reason = reason;
    rec.source = source::KFREE_SKB;
    let record = detail != Detail::Count;
    if let Detail::Record(ts) = detail {
        rec.ts_ns = ts;
        rec.location = ctx.arg::<u64>(1);
        rec.cpu = bpf_get_smp_processor_id();
    }
    let net = skb::fill(skb_ptr, rec, record);
    if !record {
        return matches(rec);
    }
    // Before the filter: a verdict or mark left on a filtered-out packet
    // would otherwise outlive it and be read for the next skb at its
    // address. A .rodata flag: with no producer of a kind attached the
    // verifier sees its branch is never taken and removes the lookup.
    let signals = ro!(FILTER.ct_probes);
    if signals & ct_signal::PROBES != 0 {
        if let Some(src) = crate::conntrack::take_verdict(skb_ptr as u64, rec.ts_ns) {
            rec.source = src;
        }
    }
    if signals & ct_signal::HOOKS != 0 {
        if let Some(src) = crate::hooks::take_mark(skb_ptr, rec.ts_ns) {
            rec.source = src;
        }
    }
    let nf = reason == ro!(FILTER.netfilter_drop_reason);
    // Freed by nf_reinject (NOT_SPECIFIED) with an entry never confirmed:
    // confirm may have refused it after an NFQUEUE verdict.
    let reinject = !nf
        && reinject_reason(reason)
        && rec.flags & flags::HAS_CT_STATUS != 0
        && rec.ct_status & tracer_common::IPS_CONFIRMED == 0;
    // Also before the filter: a conntrack drop the filter hides must
    // still be claimed, or the next rule drop there would take it.
    if signals & ct_signal::CPU_STAT != 0 && (nf || reinject) {
        if let Some((src, baseline)) = crate::witness::decide(net, rec.netns) {
            // At a reinject free, counters that did not move say only that
            // conntrack did not drop it, not that a rule did (a queue
            // verdict drop frees the same way).
            if nf || source::names_conntrack(src) {
                rec.source = src;
                if baseline {
                    rec.flags |= flags::CT_STAT_BASELINE;
                }
            }
        }
    }
    // Let through by `reinjected` alone: reported only as conntrack's.
    if !nf && ro!(FILTER.all_reasons) == 0 && !source::names_conntrack(rec.source) {
        return false;
    }
    matches(rec)
}

/// The ring is full: the record is built aside only to learn whether the
/// filter wanted it, so that only wanted drops count as lost (records +
/// lost == matching drops, exactly).
#[inline(never)]
unsafe fn no_room(ctx: &BtfTracePointContext, reason: u32, ts: u64) {
    let Some(rec) = SCRATCH.get_ptr_mut(0) else {
        crate::log::no_scratch();
        return;
    };
    if build(ctx, reason, &mut *rec, Detail::Record(ts)) {
        bump(stat::LOST);
    }
}

/// Ring-buffer header in front of every record.
const RINGBUF_HDR: u64 = 8;

/// Waking the reader costs the dropping CPU an irq_work and a cross-CPU
/// wakeup; done per record (the kernel's default while the reader keeps up)
/// it cut the drop path to 0.3-0.4 of its untraced rate in `cargo xtask
/// bench`. So records go in silently and the reader is woken each time the
/// ring's unread data crosses a multiple of 1/RING_WAKEUP_FRACTION of its
/// size; userspace also drains every 50 ms, which bounds the delay when
/// drops are rare. Waking at every multiple, not only the first, means a
/// crossing missed by two CPUs racing is caught at the next one. The mark
/// is a power of two known at load (`FILTER.wake_shift`): one ring query
/// and two shifts per record, where asking the ring its size and dividing
/// by the mark took a second helper call and two 64-bit divisions.
#[inline(always)]
fn wakeup_flags(len: u64) -> u64 {
    let shift = ro!(FILTER.wake_shift) as u64;
    let avail = EVENTS.query(BPF_RB_AVAIL_DATA as u64);
    let after = avail + ((len + RINGBUF_HDR + 7) & !7);
    if shift != 0 && (avail >> shift) != (after >> shift) {
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        BPF_RB_NO_WAKEUP as u64
    }
}

/// Zeroes a record with word stores. `*rec = zeroed()` became a call to
/// the byte-at-a-time `memset` the linker supplies (~560 instructions per
/// drop, nearly as much as the rest of the program); volatile stores keep
/// LLVM from turning the loop back into that call.
#[inline(always)]
fn zero(rec: &mut DropRecord) {
    const WORDS: usize = core::mem::size_of::<DropRecord>() / 8;
    const _: () = assert!(
        core::mem::size_of::<DropRecord>().is_multiple_of(8)
            && core::mem::align_of::<DropRecord>() == 8
    );
    let w = rec as *mut DropRecord as *mut u64;
    for i in 0..WORDS {
        // SAFETY: in bounds (WORDS words of an 8-aligned record); all-zero
        // is a valid DropRecord (Pod).
        unsafe { core::ptr::write_volatile(w.add(i), 0) };
    }
}
