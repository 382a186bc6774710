//! Marks left by ctdrop's netfilter hook programs around conntrack's own
//! hooks, read by `kfree_skb` (tracepoint tier on kernels with
//! BPF_PROG_TYPE_NETFILTER, 6.4+).
//!
//! The hook programs themselves are a dozen instructions each, assembled
//! in userspace (tracer-user/src/kernel/nfhook.rs): aya 0.14 has no
//! netfilter program type, so it could neither load nor attach them. They
//! write into the map below, which aya creates and whose fd they embed.

use aya_ebpf::{
    bindings::BPF_F_NO_COMMON_LRU,
    macros::map,
    maps::{Array, LruHashMap},
};
use tracer_common::{hook_mark, source, HookMark, HOOK_MARK_MAX_AGE_NS};

use crate::skb::read;

/// skb address -> mark. Keyed by address, not by CPU: a softirq that
/// handles another packet on this CPU between two marks, or a task that
/// migrates inside LOCAL_OUT, cannot mix two packets' marks up. LRU:
/// confirm marks are never cleared by a later hook (nothing may run after
/// confirm's INT_MAX), so they must age out on their own. Per-CPU LRU lists
/// (BPF_F_NO_COMMON_LRU): the update in `ct_hook_enter` then takes no
/// shared lock, which halved its run time (221 -> 117 ns, xtask/hook_cost.py).
/// Each CPU's list holds max_entries / CPUs; userspace sizes the map per
/// CPU so an in-flight mark is never the least recently used.
#[map]
pub static HOOK_MARKS: LruHashMap<u64, HookMark> =
    LruHashMap::with_max_entries(65536, BPF_F_NO_COMMON_LRU);

/// [0]: monotonic ns once `kfree_skb` is attached. A mark older than that
/// may have been left while no one consumed marks; it proves nothing.
#[map]
pub static HOOK_EPOCH: Array<u64> = Array::with_max_entries(1, 0);

/// The conntrack-hook verdict on a dropped skb, consuming its mark.
#[inline(always)]
pub fn take_mark(skb: *const u8, now: u64) -> Option<u8> {
    let key = skb as u64;
    // SAFETY: the value is copied out before the entry is removed.
    let m = unsafe { HOOK_MARKS.get(&key) }.copied()?;
    let _ = HOOK_MARKS.remove(&key);
    if m.kind == hook_mark::CONFIRM {
        // A confirm mark names one entry: a packet with another (or none)
        // is a later skb at the same address, dropped elsewhere. It never
        // reached our -201/-199 marks either, or they would have replaced
        // this one, so conntrack's hooks did not drop it.
        // SAFETY: skb is the tracepoint's sk_buff pointer; read() goes
        // through bpf_probe_read_kernel.
        let nfct = unsafe { read::<u64>(skb, ro!(OFFSETS.skb_nfct)) }.unwrap_or(0);
        if nfct != m.nfct {
            return None;
        }
    }
    let epoch = HOOK_EPOCH.get(0).copied().unwrap_or(0);
    if m.ts_ns < epoch || now.wrapping_sub(m.ts_ns) > HOOK_MARK_MAX_AGE_NS {
        return Some(source::CT_HOOK_STALE);
    }
    match m.kind {
        hook_mark::IN => Some(source::CT_HOOK_IN),
        hook_mark::CONFIRM => Some(source::CT_HOOK_CONFIRM),
        _ => Some(source::CT_HOOK_STALE),
    }
}
