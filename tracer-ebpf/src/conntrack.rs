//! Probes on the nf_conntrack insertion and drop paths (kprobe tier).
//!
//! Every conntrack failure reaches `kfree_skb` as the same NETFILTER_DROP,
//! so these probes leave a verdict per skb (keyed by its address) that the
//! `kfree_skb` program picks up: one record per dropped packet, with the
//! precise cause. Outcomes that are not drops (insertions, evictions,
//! resolved clashes) are only counted, per namespace.
//!
//! kretprobes cannot see arguments, so entry probes stash them on a small
//! per-CPU stack per function (a softirq can nest inside process context on
//! the same CPU, so one slot is not enough).

use aya_ebpf::{
    helpers::bpf_ktime_get_ns,
    macros::{kprobe, kretprobe, map},
    maps::{LruHashMap, PerCpuArray, PerCpuHashMap},
    programs::{ProbeContext, RetProbeContext},
};
use tracer_common::{source, stash, CtEventCounts, SkbVerdict};

use crate::skb::{self, net_inum, read, Via};

const NF_DROP: u32 = 0;
const NF_ACCEPT: u32 = 1;
const MAX_ERRNO: u64 = 4095;
/// Nesting depth kept per function (a softirq inside process context).
const DEPTH: u32 = 4;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Frame {
    pub arg: u64,
    pub alloc_failed: u64,
}

/// Stack depth per stashed function. Frames live in their own array and are
/// reached through map lookups: the helper bounds-checks the index, where a
/// computed index into an array value is one the optimizer can reshape
/// past the verifier's understanding.
#[map]
static STASH_DEPTH: PerCpuArray<u32> = PerCpuArray::with_max_entries(stash::LEN, 0);

#[map]
static STASH_FRAMES: PerCpuArray<Frame> = PerCpuArray::with_max_entries(stash::LEN * DEPTH, 0);

/// skb address → conntrack verdict, consumed by the kfree_skb program.
#[map]
pub static VERDICTS: LruHashMap<u64, SkbVerdict> = LruHashMap::with_max_entries(16384, 0);

/// Namespace inode → counts.
#[map]
static CT_EVENTS: PerCpuHashMap<u32, CtEventCounts> = PerCpuHashMap::with_max_entries(4096, 0);

#[inline(always)]
fn push(which: u32, arg: u64) {
    let Some(depth) = STASH_DEPTH.get_ptr_mut(which) else {
        return;
    };
    // SAFETY: a per-CPU slot from the map; programs run with migration disabled.
    let mut d = unsafe { *depth };
    // Far deeper than any nesting: pushes without pops (a missed kretprobe
    // instance) piled up. Start over rather than lose every later verdict.
    if d >= DEPTH * 4 {
        d = 0;
    }
    if d < DEPTH {
        if let Some(f) = STASH_FRAMES.get_ptr_mut(which * DEPTH + d) {
            // SAFETY: `f` is a per-CPU frame slot returned by the map lookup.
            unsafe {
                *f = Frame {
                    arg,
                    alloc_failed: 0,
                }
            };
        }
    }
    // Past the bottom we still count, so pops stay paired with pushes.
    // SAFETY: as above: this CPU's depth slot.
    unsafe { *depth = d.saturating_add(1) };
}

#[inline(always)]
fn pop(which: u32) -> Option<Frame> {
    let depth = STASH_DEPTH.get_ptr_mut(which)?;
    // SAFETY: a per-CPU slot from the map; programs run with migration disabled.
    let d = unsafe { *depth };
    if d == 0 {
        return None;
    }
    // SAFETY: as above: this CPU's depth slot.
    unsafe { *depth = d - 1 };
    if d - 1 < DEPTH {
        STASH_FRAMES.get(which * DEPTH + d - 1).copied()
    } else {
        None
    }
}

/// The innermost frame of `which`, if any.
#[inline(always)]
fn top(which: u32) -> Option<*mut Frame> {
    let d = *STASH_DEPTH.get(which)?;
    if d == 0 || d > DEPTH {
        return None;
    }
    STASH_FRAMES.get_ptr_mut(which * DEPTH + d - 1)
}

#[inline(always)]
fn mark_alloc_failed() {
    if let Some(f) = top(stash::CONNTRACK_IN) {
        // SAFETY: `f` is this CPU's innermost frame slot (from `top`).
        unsafe { (*f).alloc_failed = 1 };
    }
}

#[inline(always)]
unsafe fn skb_netns(skb: u64) -> u32 {
    let skb = skb as *const u8;
    skb::skb_netns(skb, skb::skb_dev(skb, Via::Helper), Via::Helper).unwrap_or(0)
}

#[inline(always)]
unsafe fn net_netns(net: u64) -> u32 {
    net_inum(net as *const u8).unwrap_or(0)
}

#[inline(always)]
fn count(netns: u32, f: impl FnOnce(&mut CtEventCounts)) {
    if let Some(c) = CT_EVENTS.get_ptr_mut(&netns) {
        // SAFETY: `c` points into this CPU's map value, valid for the program run.
        f(unsafe { &mut *c });
        return;
    }
    let mut c = CtEventCounts::default();
    f(&mut c);
    let _ = CT_EVENTS.insert(&netns, &c, 0);
}

#[inline(always)]
fn verdict(skb: u64, src: u8) {
    let v = SkbVerdict {
        // SAFETY: a helper without preconditions.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        source: src,
        _pad: [0; 7],
    };
    let _ = VERDICTS.insert(&skb, &v, 0);
}

#[kprobe]
pub fn ct_in_entry(ctx: ProbeContext) -> u32 {
    push(stash::CONNTRACK_IN, ctx.arg::<u64>(0).unwrap_or(0));
    0
}

#[kretprobe]
pub fn ct_in_return(ctx: RetProbeContext) -> u32 {
    let Some(f) = pop(stash::CONNTRACK_IN) else {
        return 0;
    };
    let ret: u64 = ctx.ret();
    let skb = f.arg;
    // SAFETY: `skb` is the kprobe's sk_buff argument; read only through bpf_probe_read_kernel.
    let ns = unsafe { skb_netns(skb) };
    if (ret as u32) & 0xff == NF_DROP {
        if f.alloc_failed != 0 {
            verdict(skb, source::CT_ALLOC_FAIL);
        } else {
            verdict(skb, source::CT_IN_DROP);
        }
        count(ns, |c| c.in_dropped += 1);
    } else if (ret as u32) & 0xff == NF_ACCEPT {
        // SAFETY: as above: a helper read of the skb's `_nfct`.
        let nfct = unsafe { read::<u64>(skb as *const u8, ro!(OFFSETS.skb_nfct)) }.unwrap_or(1);
        if nfct == 0 {
            verdict(skb, source::CT_INVALID);
            count(ns, |c| c.invalid += 1);
        }
    }
    0
}

#[kretprobe]
pub fn ct_alloc_return(ctx: RetProbeContext) -> u32 {
    let ret: u64 = ctx.ret();
    if ret >= 0u64.wrapping_sub(MAX_ERRNO) {
        mark_alloc_failed();
        let skb = top(stash::CONNTRACK_IN)
            // SAFETY: `f` is this CPU's innermost frame slot (from `top`).
            .map(|f| unsafe { (*f).arg })
            .unwrap_or(0);
        // SAFETY: `skb` was stashed from nf_conntrack_in's argument; helper reads only.
        let ns = unsafe { skb_netns(skb) };
        count(ns, |c| c.alloc_failed += 1);
    }
    0
}

#[kprobe]
pub fn ct_confirm_entry(ctx: ProbeContext) -> u32 {
    push(stash::CONFIRM, ctx.arg::<u64>(0).unwrap_or(0));
    0
}

#[kretprobe]
pub fn ct_confirm_return(ctx: RetProbeContext) -> u32 {
    let Some(f) = pop(stash::CONFIRM) else {
        return 0;
    };
    let ret: u64 = ctx.ret();
    if (ret as u32) & 0xff == NF_DROP {
        verdict(f.arg, source::CT_CONFIRM_DROP);
        // SAFETY: `f.arg` is the stashed skb argument; helper reads only.
        let ns = unsafe { skb_netns(f.arg) };
        count(ns, |c| c.confirm_dropped += 1);
    }
    0
}

#[kprobe]
pub fn ct_early_drop_entry(ctx: ProbeContext) -> u32 {
    push(stash::EARLY_DROP, ctx.arg::<u64>(0).unwrap_or(0));
    0
}

#[kretprobe]
pub fn ct_early_drop_return(ctx: RetProbeContext) -> u32 {
    let Some(f) = pop(stash::EARLY_DROP) else {
        return 0;
    };
    let ret: u64 = ctx.ret();
    // SAFETY: `f.arg` is the stashed `struct net *`; helper reads only.
    let ns = unsafe { net_netns(f.arg) };
    if ret as u32 != 0 {
        count(ns, |c| c.early_drop_evicted += 1);
    } else {
        count(ns, |c| c.early_drop_failed += 1);
    }
    0
}

#[kprobe]
pub fn ct_clash_entry(ctx: ProbeContext) -> u32 {
    push(stash::RESOLVE_CLASH, ctx.arg::<u64>(0).unwrap_or(0));
    0
}

#[kretprobe]
pub fn ct_clash_return(ctx: RetProbeContext) -> u32 {
    let Some(f) = pop(stash::RESOLVE_CLASH) else {
        return 0;
    };
    let ret: u64 = ctx.ret();
    if (ret as u32) & 0xff == NF_ACCEPT {
        // SAFETY: `f.arg` is the stashed skb argument; helper reads only.
        let ns = unsafe { skb_netns(f.arg) };
        count(ns, |c| c.clash_resolved += 1);
    }
    0
}

#[kprobe]
pub fn ct_hash_insert(ctx: ProbeContext) -> u32 {
    let ct: u64 = ctx.arg(0).unwrap_or(0);
    // SAFETY: `ct` is the kprobe's nf_conn argument; helper read only.
    let net = unsafe { read::<u64>(ct as *const u8, ro!(OFFSETS.conn_net)) }.unwrap_or(0);
    // SAFETY: `net` came from a helper read; helper reads only.
    let ns = unsafe { net_netns(net) };
    count(ns, |c| c.inserts += 1);
    0
}

/// The conntrack verdict left for this skb, if fresh.
#[inline(always)]
pub fn take_verdict(skb: u64, now: u64) -> Option<u8> {
    // SAFETY: the value is copied out before the entry is removed.
    let v = unsafe { VERDICTS.get(&skb) }.copied()?;
    let _ = VERDICTS.remove(&skb);
    if now.wrapping_sub(v.ts_ns) > tracer_common::VERDICT_MAX_AGE_NS {
        return None;
    }
    Some(v.source)
}

/// Never attached: `ctdrop check` loads it to learn whether this kernel
/// accepts fentry programs at all.
#[aya_ebpf::macros::fentry(function = "nf_hook_slow")]
pub fn fentry_probe(_ctx: aya_ebpf::programs::FEntryContext) -> i32 {
    0
}
