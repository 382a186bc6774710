//! Which netfilter drops conntrack made, told by conntrack's own counters:
//! the drop path only, nothing on packets that live.
//!
//! Every NF_DROP conntrack returns is counted first, on the CPU that runs
//! it, in the namespace's per-CPU `struct ip_conntrack_stat`: `drop`
//! (table full, an l4 tracker's `-NF_DROP`, which also counts `invalid`,
//! and a failed insert at confirm, which also counts `insert_failed`).
//! `nf_hook_slow` then frees the skb with NETFILTER_DROP on that same CPU
//! (after an NFQUEUE verdict, `nf_reinject` frees it as NOT_SPECIFIED:
//! kfree_skb.rs asks here for those too, and takes only "conntrack").
//! A rule's NF_DROP counts nothing there. So at each NETFILTER_DROP, the
//! namespace's `drop` on this CPU either moved since the last one we saw
//! there (conntrack dropped this packet) or did not (a rule did).
//!
//! The ledger keeps, per CPU and namespace (keyed by `net_cookie`, never
//! reused, unlike inode numbers), the counters at the last netfilter drop.
//! Userspace seeds it before attaching (from `/proc/net/stat/nf_conntrack`)
//! and knows which seeds held through the attach. A namespace met without
//! a seed is decided against zero: at 0 no conntrack drop ever happened
//! there; at 1, if the namespace was born after the attach (userspace
//! knows), this drop made it (`flags::CT_STAT_BASELINE` asks userspace to
//! check); past 1, drops went unseen and the totals decide
//! (`CT_STAT_UNSEEN`).
//!
//! Where this can be wrong, and only by swapping the causes of two records
//! (totals stay exact): a task's conntrack drop in LOCAL_OUT or at confirm
//! interrupted between the counter increment and the free (a few dozen
//! instructions) by a softirq that makes a rule drop in the same namespace
//! on that CPU, or preempted and migrated there; and conntrack run by
//! Open vSwitch or tc `act_ct`, whose drops count `drop` too but are freed
//! with another reason. Said in the README.

use aya_ebpf::{helpers::bpf_probe_read_kernel, macros::map, maps::PerCpuArray};
use tracer_common::{cpu_stat_set, cpu_stat_way, source, CpuStatSet, CpuStatWay, CPU_STAT_SETS};

use crate::skb::{self, read};

#[map]
pub static CPU_STAT_LEDGER: PerCpuArray<CpuStatSet> =
    PerCpuArray::with_max_entries(CPU_STAT_SETS, 0);

/// [0]: this CPU's per-CPU offset (what `per_cpu_ptr` adds), once learnt.
#[map]
static CPU_OFFSET: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// This CPU's per-CPU offset. Learnt from our own per-CPU array: its
/// element here is at `pptrs[0]` (the kernel's per-CPU pointer, read from
/// the map's `struct bpf_array`) plus this offset. Kernels without
/// CONFIG_KALLSYMS_ALL (this one) do not show `__per_cpu_offset`, and
/// `bpf_this_cpu_ptr` takes only BTF-typed per-CPU pointers, which a
/// kernel built without per-CPU type tags never hands out.
#[inline(always)]
unsafe fn this_cpu_offset() -> Option<u64> {
    let slot = CPU_OFFSET.get_ptr_mut(0)?;
    if *slot != 0 {
        return Some(*slot);
    }
    let here = address_of(slot as *const u8)?;
    let map = address_of(&CPU_OFFSET as *const PerCpuArray<u64> as *const u8)?;
    let base = read::<u64>(map as *const u8, ro!(OFFSETS.array_pptrs))?;
    if base == 0 {
        return None;
    }
    // Wrapping: on arm64 the offset can be "negative" (a per-CPU pointer
    // above the area it is resolved into). 0 (a one-CPU kernel) is simply
    // learnt again next time.
    let off = here.wrapping_sub(base);
    *slot = off;
    Some(off)
}

/// A pointer's value as a plain number: copied through memory with the
/// helper, so the verifier sees a number it may do arithmetic on (it
/// refuses arithmetic on a map pointer, and loading a map value pointer
/// back from the stack would keep its type).
#[inline(always)]
unsafe fn address_of(p: *const u8) -> Option<u64> {
    let held: u64 = p as u64;
    bpf_probe_read_kernel(core::ptr::addr_of!(held)).ok()
}

/// A counter of the struct read in one go (offsets are below 32, checked
/// in userspace).
#[inline(always)]
fn field(c: &[u32; 8], off: u32) -> u32 {
    c[((off / 4) & 7) as usize]
}

/// The source a move of the counters from `then` to `now` makes
/// (`drop`, `insert_failed`, `invalid`): `drop` unmoved is a rule's drop.
#[inline(always)]
fn moved(now: [u32; 3], then: [u32; 3]) -> u8 {
    if now[0] == then[0] {
        source::CT_STAT_NONE
    } else if now[1] != then[1] {
        source::CT_STAT_CONFIRM
    } else if now[2] != then[2] {
        source::CT_STAT_INVALID
    } else {
        source::CT_STAT_IN
    }
}

/// The source for a NETFILTER_DROP in namespace `net` (a BTF-typed
/// `struct net *`, inode `inum`), and whether it rests on a baseline (see
/// `flags::CT_STAT_BASELINE`). None when the namespace or the counters
/// cannot be read.
#[inline(always)]
pub unsafe fn decide(net: *const u8, inum: u32) -> Option<(u8, bool)> {
    if net.is_null() || inum == 0 {
        return None;
    }
    let cookie = skb::load::<u64>(net, ro!(OFFSETS.net_cookie))?;
    if cookie == 0 {
        return None;
    }
    let set = &mut *CPU_STAT_LEDGER.get_ptr_mut(cpu_stat_set(inum))?;
    let matches = |w: &CpuStatWay| w.cookie == cookie;
    // The way holding this namespace, or NONE. A plain number, not an
    // Option: LLVM left an Option's payload undefined on the None path
    // and the verifier refused the read of that register.
    const NONE: usize = 2;
    let hit = if matches(&set.ways[0]) {
        0
    } else if matches(&set.ways[1]) {
        1
    } else {
        NONE
    };
    // This CPU's counters: cached in the way, else net->ct.stat plus this
    // CPU's per-CPU offset (both plain numbers: read with the helper).
    let cached = if hit == NONE {
        0
    } else {
        set.ways[hit & 1].stat
    };
    let stat = if cached != 0 {
        cached
    } else {
        let base = read::<u64>(net, ro!(OFFSETS.net_ct_stat)).unwrap_or(0);
        if base == 0 {
            // No conntrack in that namespace: it cannot have dropped.
            return Some((source::CT_STAT_NONE, false));
        }
        base.wrapping_add(this_cpu_offset()?)
    };
    let c: [u32; 8] = bpf_probe_read_kernel(stat as *const [u32; 8]).ok()?;
    let now = [
        field(&c, ro!(OFFSETS.stat_drop)),
        field(&c, ro!(OFFSETS.stat_insert_failed)),
        field(&c, ro!(OFFSETS.stat_invalid)),
    ];
    let (i, src, baseline) = if hit != NONE {
        let w = &set.ways[hit & 1];
        let src = moved(now, [w.drop, w.insert_failed, w.invalid]);
        let seeded = w.state == cpu_stat_way::SEEDED && src != source::CT_STAT_NONE;
        (hit, src, seeded)
    } else {
        // A free way, else the one this namespace's inode picks.
        let i = if set.ways[0].inum == 0 {
            0
        } else if set.ways[1].inum == 0 {
            1
        } else {
            (inum & 1) as usize
        };
        // Against zero. Counter at 0: no conntrack drop ever happened here
        // on this CPU. At 1, with no seed: if the namespace was born after
        // the attach (userspace knows), this drop made it. Past 1: drops
        // went unseen.
        if now[0] > 1 {
            (i, source::CT_STAT_UNSEEN, false)
        } else {
            let src = moved(now, [0; 3]);
            (i, src, src != source::CT_STAT_NONE)
        }
    };
    // All of it claimed: an increment nobody freed with NETFILTER_DROP
    // (see the module comment) then misleads one record, not every later one.
    set.ways[i & 1] = CpuStatWay {
        cookie,
        stat,
        inum,
        drop: now[0],
        insert_failed: now[1],
        invalid: now[2],
        state: cpu_stat_way::LIVE,
        _pad: 0,
    };
    Some((src, baseline))
}
