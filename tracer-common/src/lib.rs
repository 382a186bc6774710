//! Record layouts shared by the kernel programs and the `ctdrop` collector.
//!
//! Every struct here crosses the kernel/user boundary as raw bytes, so each is
//! `#[repr(C)]`, has no implicit padding (bytemuck's `Pod` derive refuses it)
//! and has its size pinned by a compile-time assertion. Nothing else belongs
//! in this crate: policy lives in userspace.
#![no_std]

use bytemuck::{Pod, Zeroable};

/// Bytes of the dropped packet's network header copied after a record when
/// header capture is on (pcap export); a fixed size keeps the verifier happy.
pub const HEADER_CAPTURE_LEN: usize = 128;

/// Which kernel program produced a record.
pub mod source {
    /// `kfree_skb` tracepoint: the packet was freed as a drop.
    pub const KFREE_SKB: u8 = 1;
    /// conntrack allocation failed (table full, nothing evictable).
    pub const CT_ALLOC_FAIL: u8 = 2;
    /// `__nf_conntrack_confirm` returned NF_DROP (insert clash not resolved).
    pub const CT_CONFIRM_DROP: u8 = 3;
    /// `nf_conntrack_in` returned a drop verdict.
    pub const CT_IN_DROP: u8 = 4;
    /// `nf_conntrack_in` accepted the packet but gave it no entry
    /// (invalid); a rule that drops it later is a conntrack_invalid drop.
    pub const CT_INVALID: u8 = 5;
    /// Dropped inside conntrack's own netfilter hook (between ctdrop's
    /// hook marks at priority -201 and -199): `nf_conntrack_in` refused it.
    pub const CT_HOOK_IN: u8 = 6;
    /// Dropped at conntrack's confirm hook (marked at INT_MAX-2, same
    /// `_nfct`, still unconfirmed): the insert failed.
    pub const CT_HOOK_CONFIRM: u8 = 7;
    /// A hook mark was found but was older than [`crate::HOOK_MARK_MAX_AGE_NS`]:
    /// the marks cannot tell, the counters must.
    pub const CT_HOOK_STALE: u8 = 8;
    /// Set by userspace, never by a kernel program: hook marks covered the
    /// packet's namespace and none was left on it, so conntrack's hooks did
    /// not drop it.
    pub const HOOK_NOT_CONNTRACK: u8 = 9;
    /// Set by userspace: the cause was decided by the namespace's `drop`
    /// counter budget among candidates of both kinds (no mark could tell).
    pub const INFERRED_BY_BUDGET: u8 = 10;
    /// The namespace's per-CPU conntrack `drop` counter on the dropping CPU
    /// rose since the last netfilter drop there (and neither
    /// `insert_failed` nor `invalid` did): `nf_conntrack_in` refused the
    /// packet, the table-full path (witness.rs in tracer-ebpf).
    pub const CT_STAT_IN: u8 = 11;
    /// `drop` and `insert_failed` rose: the insert at confirm failed.
    pub const CT_STAT_CONFIRM: u8 = 12;
    /// `drop` and `invalid` rose: an l4 tracker returned `-NF_DROP`.
    pub const CT_STAT_INVALID: u8 = 13;
    /// `drop` did not rise: conntrack did not drop this packet, a rule did.
    pub const CT_STAT_NONE: u8 = 14;
    /// The first netfilter drop seen in that namespace on that CPU, with
    /// no seed and its counter past 1: conntrack drops there went unseen,
    /// the counter cannot tell, the namespace's totals must (userspace).
    pub const CT_STAT_UNSEEN: u8 = 15;

    /// A kernel program pinned this drop on conntrack (which failure is
    /// in the source itself). The stale-mark and unseen sources leave it
    /// to userspace's totals instead.
    pub const fn names_conntrack(src: u8) -> bool {
        matches!(
            src,
            CT_ALLOC_FAIL
                | CT_CONFIRM_DROP
                | CT_IN_DROP
                | CT_HOOK_IN
                | CT_HOOK_CONFIRM
                | CT_STAT_IN
                | CT_STAT_CONFIRM
                | CT_STAT_INVALID
        )
    }
}

/// `IPS_CONFIRMED` in `nf_conn.status` (a uapi bit, the same on every
/// kernel): the entry is in the table.
pub const IPS_CONFIRMED: u32 = 1 << 3;

/// Bits of [`FilterConfig::ct_probes`]: which conntrack signal sources the
/// `kfree_skb` program consults.
pub mod ct_signal {
    /// kprobes leave verdicts in `VERDICTS`.
    pub const PROBES: u8 = 1;
    /// Netfilter hook programs leave marks in `HOOK_MARKS`.
    pub const HOOKS: u8 = 2;
    /// `kfree_skb` reads the namespace's per-CPU conntrack counters itself
    /// (no producer: the drop path only).
    pub const CPU_STAT: u8 = 4;
}

/// What `kfree_skb` remembers of one namespace's per-CPU conntrack
/// counters on one CPU (a way of a [`CpuStatSet`] in the `CPU_STAT_LEDGER`
/// map, a per-CPU array of [`CPU_STAT_SETS`] sets).
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable, PartialEq, Eq, Default)]
pub struct CpuStatWay {
    /// The namespace's `net_cookie`: unique for the life of the system,
    /// where inode numbers are reused as soon as a namespace is freed.
    pub cookie: u64,
    /// This CPU's `struct ip_conntrack_stat` of that namespace; 0 until a
    /// drop computed it.
    pub stat: u64,
    /// Namespace inode; 0 marks a free way.
    pub inum: u32,
    pub drop: u32,
    pub insert_failed: u32,
    pub invalid: u32,
    /// One of [`cpu_stat_way`].
    pub state: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<CpuStatWay>() == 40);

/// [`CpuStatWay::state`].
pub mod cpu_stat_way {
    /// Written by userspace before `kfree_skb` was attached, from the
    /// namespace's `/proc/net/stat/nf_conntrack` line for this CPU.
    pub const SEEDED: u32 = 1;
    /// Written by `kfree_skb` at a drop.
    pub const LIVE: u32 = 2;
}

/// One set of the ledger: a namespace lives in way 0 or 1 of its set
/// ([`cpu_stat_set`]); one map lookup reaches both.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable, PartialEq, Eq, Default)]
pub struct CpuStatSet {
    pub ways: [CpuStatWay; 2],
}

/// Sets of the ledger (per CPU): 1,024 namespaces per CPU before two that
/// drop on the same CPU may share a set and evict each other (each
/// eviction costs one record decided by the totals).
pub const CPU_STAT_SETS: u32 = 512;

/// The set of a namespace in the ledger: kernel and userspace must agree.
pub fn cpu_stat_set(inum: u32) -> u32 {
    (inum.wrapping_mul(0x9e37_79b1) >> 23) & (CPU_STAT_SETS - 1)
}

/// Kinds of [`HookMark`].
pub mod hook_mark {
    /// Set at priority -201 (before `nf_conntrack_in`), cleared at -199.
    pub const IN: u64 = 1;
    /// Set at INT_MAX-2 on an unconfirmed entry (just before confirm).
    pub const CONFIRM: u64 = 2;
}

/// What a netfilter hook program leaves on an skb (keyed by its address)
/// for the `kfree_skb` program. Written by hand-assembled programs
/// (tracer-user/src/kernel/nfhook.rs): keep the layout plain u64s.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable, PartialEq, Eq)]
pub struct HookMark {
    pub ts_ns: u64,
    /// One of [`hook_mark`].
    pub kind: u64,
    /// `skb->_nfct` when marked (CONFIRM only; 0 otherwise).
    pub nfct: u64,
}
const _: () = assert!(core::mem::size_of::<HookMark>() == 24);

/// A mark older than this at `kfree_skb` is not trusted: a conntrack drop
/// frees the skb microseconds after the mark, inside the same hook call;
/// an older mark is one the skb's address kept from an earlier life.
pub const HOOK_MARK_MAX_AGE_NS: u64 = 5_000_000;

/// Bits of [`DropRecord::flags`]: which optional parts of a record are valid.
pub mod flags {
    pub const HAS_DEV: u16 = 1 << 0;
    pub const HAS_NETNS: u16 = 1 << 1;
    pub const HAS_L3: u16 = 1 << 2;
    pub const HAS_L4: u16 = 1 << 3;
    /// The skb carried a conntrack reference (`_nfct != 0`).
    pub const HAS_CT: u16 = 1 << 4;
    /// `icmp_id`/`icmp_seq` hold an echo request/reply's identifiers.
    pub const ICMP_ECHO: u16 = 1 << 5;
    // Bit 6 is free: it meant "table fill read in the kernel", which no
    // program ever did (the fill is sampled in userspace).
    /// The L3/L4 headers could not be read completely.
    pub const TRUNCATED: u16 = 1 << 7;
    /// `ct_status` holds the entry's status bits.
    pub const HAS_CT_STATUS: u16 = 1 << 8;
    /// The record is followed by [`crate::HEADER_CAPTURE_LEN`] header bytes.
    pub const HAS_HEADER: u16 = 1 << 9;
    /// A `CT_STAT_*` source decided at the first netfilter drop in that
    /// namespace on that CPU, against a baseline: the seed userspace read
    /// before the attach, or, for a namespace without one, zero (its
    /// counter stood at 1). Exact only where userspace knows the baseline
    /// held at the attach; elsewhere the totals decide.
    pub const CT_STAT_BASELINE: u16 = 1 << 10;
}

/// One dropped packet (or one conntrack-path event) as seen in the kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable, PartialEq, Eq)]
pub struct DropRecord {
    /// `bpf_ktime_get_ns`: CLOCK_MONOTONIC nanoseconds.
    pub ts_ns: u64,
    /// Kernel address of the code that dropped the packet.
    pub location: u64,
    /// The skb's kernel address: joins conntrack-path records to the
    /// `kfree_skb` record of the same packet.
    pub skb: u64,
    /// Source address; IPv4 uses the first four bytes.
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// Network namespace inode number (`ns.inum`).
    pub netns: u32,
    pub ifindex: u32,
    /// Raw `enum skb_drop_reason` value of the running kernel.
    pub reason: u32,
    /// `nf_conn.status` bits when `HAS_CT_STATUS`.
    pub ct_status: u32,
    pub skb_len: u32,
    pub cpu: u32,
    /// Ethertype in host order (0x0800, 0x86dd), 0 when unknown.
    pub l3_proto: u16,
    pub sport: u16,
    pub dport: u16,
    pub icmp_id: u16,
    pub icmp_seq: u16,
    /// Conntrack zone id (0 when zones are not in use or unknown).
    pub zone: u16,
    pub flags: u16,
    /// IP protocol number (6 tcp, 17 udp, 1 icmp, 58 icmpv6).
    pub l4_proto: u8,
    pub icmp_type: u8,
    pub icmp_code: u8,
    /// One of [`source`].
    pub source: u8,
    /// `ctinfo` (low three bits of `_nfct`); 7 is IP_CT_UNTRACKED (NOTRACK).
    pub ct_info: u8,
    pub _pad: [u8; 5],
}
// Every field above is written by `kfree_skb` (tracer-ebpf): a field no
// program sets does not belong here (the table fill, for one, is sampled
// in userspace and joined to the event there).
const _: () = assert!(core::mem::size_of::<DropRecord>() == 104);

/// A record followed by the first bytes of the packet's network header.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct DropRecordWithHeader {
    pub rec: DropRecord,
    pub header: [u8; HEADER_CAPTURE_LEN],
}

/// Key of the in-kernel per-flow counters (count mode: exact counts, no
/// per-packet ring-buffer traffic).
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub netns: u32,
    pub reason: u32,
    pub sport: u16,
    pub dport: u16,
    pub l3_proto: u16,
    pub l4_proto: u8,
    /// 1 when the skb had a conntrack reference.
    pub has_ct: u8,
}
const _: () = assert!(core::mem::size_of::<FlowKey>() == 48);

/// Key of the in-kernel per-group counters (count mode): everything the
/// cause of a drop depends on except the table fill, which userspace
/// samples. Few keys (namespaces x reasons), so unlike the per-flow map it
/// does not fill up under a flood of new flows, and per-cause totals stay
/// exact.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct GroupKey {
    pub netns: u32,
    pub reason: u32,
    pub l4_proto: u8,
    pub has_ct: u8,
    /// ICMP type and code (0 for other protocols): a blocked PMTU error is
    /// its own cause.
    pub icmp_type: u8,
    pub icmp_code: u8,
}
const _: () = assert!(core::mem::size_of::<GroupKey>() == 12);

/// Entries of the per-group map; a full map is counted in
/// [`stat::GROUP_MAP_FULL`].
pub const GROUP_MAP_ENTRIES: u32 = 4096;

#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable, PartialEq, Eq, Default)]
pub struct FlowCount {
    pub packets: u64,
    pub bytes: u64,
    pub first_ns: u64,
    pub last_ns: u64,
}

/// Count mode's cheap per-packet path: counters live in per-CPU arrays of
/// small sets (one array lookup per packet, a few key compares, no hash map
/// and no insert). A key takes the first free slot of its set and keeps it;
/// slots are never freed. Userspace sums equal keys over slots and CPUs.
pub const SET_WAYS: usize = 4;

/// One group's counter in [`GroupSet`]; `drops == 0` marks a free slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable, PartialEq, Eq, Default)]
pub struct GroupSlot {
    pub key: GroupKey,
    pub _pad: u32,
    pub drops: u64,
}
const _: () = assert!(core::mem::size_of::<GroupSlot>() == 24);

#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable, PartialEq, Eq, Default)]
pub struct GroupSet {
    pub slots: [GroupSlot; SET_WAYS],
}

/// Sets of the per-CPU group array. A group whose set is full is counted
/// in the per-CPU group hash map instead (exact, just slower).
pub const GROUP_SETS: u32 = 256;

/// One flow's counters in [`FlowSet`]; `count.packets == 0` marks a free slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable, PartialEq, Eq, Default)]
pub struct FlowSlot {
    pub key: FlowKey,
    pub count: FlowCount,
}
const _: () = assert!(core::mem::size_of::<FlowSlot>() == 80);

#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable, PartialEq, Eq, Default)]
pub struct FlowSet {
    pub slots: [FlowSlot; SET_WAYS],
}

/// Sets of the per-CPU flow array: per-flow detail is bounded to
/// `FLOW_SETS * SET_WAYS` flows per CPU (1.25 MiB per CPU); drops of flows
/// that find their set taken are counted in [`stat::FLOW_MAP_FULL`] and in
/// every total, not per flow.
pub const FLOW_SETS: u32 = 4096;

/// Indices of the per-CPU statistics array.
pub mod stat {
    /// Drops with a wanted reason seen in record mode. No longer written:
    /// nothing reported it, and it was a map update on every drop.
    pub const SEEN: u32 = 0;
    /// Records written to the ring buffer.
    pub const SENT: u32 = 1;
    /// Records that matched the filter but found no room in the ring buffer.
    pub const LOST: u32 = 2;
    /// Drops counted in the per-flow map (count mode). No longer written:
    /// count mode's total is the sum of its groups (one counter per drop,
    /// not two).
    pub const COUNTED: u32 = 3;
    /// Count-mode flows that found the map full.
    pub const FLOW_MAP_FULL: u32 = 4;
    /// Count-mode drops whose group found the group map full.
    pub const GROUP_MAP_FULL: u32 = 5;
    /// Count-mode drops chosen for per-flow detail (1 in
    /// [`crate::CountConfig::flow_sample`] on average; every one at 1).
    pub const FLOW_SAMPLED: u32 = 6;
    pub const LEN: u32 = 8;
}

/// Kernel struct field offsets, resolved from the running kernel's BTF in
/// userspace and handed to the programs as a read-only global (Rust eBPF has
/// no CO-RE). A field of `u32::MAX` means "not present on this kernel".
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable, PartialEq, Eq)]
pub struct Offsets {
    pub skb_dev: u32,
    pub skb_nfct: u32,
    pub skb_len: u32,
    pub skb_protocol: u32,
    pub skb_head: u32,
    pub skb_network_header: u32,
    pub skb_transport_header: u32,
    /// Fallback for the namespace when `skb->dev` is not yet set (locally
    /// generated packets dropped in OUTPUT): `skb->sk->__sk_common.skc_net`.
    pub skb_sk: u32,
    pub sk_net: u32,
    pub dev_ifindex: u32,
    pub dev_nd_net: u32,
    /// Offset of `ns.inum` inside `struct net`.
    pub net_inum: u32,
    pub conn_status: u32,
    /// `nf_conn.ct_net` (a `possible_net_t`: the `struct net *` itself).
    pub conn_net: u32,
    /// Offset of `zone.id` inside `struct nf_conn` (u32::MAX without zones).
    pub conn_zone_id: u32,
    /// `net.ct.stat`: the namespace's per-CPU `struct ip_conntrack_stat *`.
    pub net_ct_stat: u32,
    /// Fields of `struct ip_conntrack_stat`; all below 32 (read in one go).
    pub stat_drop: u32,
    pub stat_insert_failed: u32,
    pub stat_invalid: u32,
    /// `net.net_cookie`.
    pub net_cookie: u32,
    /// `bpf_array.pptrs`: where a per-CPU array map keeps its per-CPU
    /// pointers; the program learns its CPU's per-CPU offset from one of
    /// its own maps (no `__per_cpu_offset` symbol is needed).
    pub array_pptrs: u32,
}

pub const OFFSET_ABSENT: u32 = u32::MAX;

/// Most values per filter kind (`--host`, `--port`, `--netns`, `--ifname`):
/// the kernel checks them in bounded, unrolled loops.
pub const FILTER_MAX: usize = 8;

/// One `--host` prefix. Words are the address bytes read as native-endian
/// u32s, as the kernel side reads `DropRecord::saddr`/`daddr`; `addr` is
/// already masked. IPv4 uses word 0 only.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable, PartialEq, Eq)]
pub struct FilterNet {
    pub addr: [u32; 4],
    pub mask: [u32; 4],
}

/// One `--ifname`, resolved to its index in one namespace.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable, PartialEq, Eq)]
pub struct FilterIf {
    pub netns: u32,
    pub ifindex: u32,
}

/// What the kernel side sends and which packets it considers; set once at
/// load time as a read-only global so the verifier prunes what is unused.
/// Within a kind the values are alternatives (any may match); kinds given
/// together must all match.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable, PartialEq, Eq)]
pub struct FilterConfig {
    /// Prefixes matched at either end; the first `n_nets` count.
    pub nets: [FilterNet; FILTER_MAX],
    /// Namespace inodes; the first `n_netns` count.
    pub netns: [u32; FILTER_MAX],
    /// (namespace, ifindex) of the packet's device; the first `n_ifs` count.
    pub ifs: [FilterIf; FILTER_MAX],
    /// Ports matched at either end; the first `n_ports` count.
    pub ports: [u16; FILTER_MAX],
    /// Only drops with this reason, unless `all_reasons` is set.
    pub netfilter_drop_reason: u32,
    pub n_nets: u8,
    /// Bit i set: `nets[i]` is IPv6.
    pub nets_v6: u8,
    pub n_netns: u8,
    pub n_ifs: u8,
    pub n_ports: u8,
    /// 0 = any protocol.
    pub l4_proto: u8,
    pub all_reasons: u8,
    /// 1 = copy header bytes after each record.
    pub capture_headers: u8,
    /// 1 = count in the per-flow map instead of sending records.
    pub count_only: u8,
    /// Bits of [`ct_signal`]: which conntrack signal maps to consult.
    pub ct_probes: u8,
    /// log2 of the ring's wakeup mark (its size / [`RING_WAKEUP_FRACTION`]),
    /// set where the ring is sized: the program compares shifted byte
    /// counts instead of asking the ring its size and dividing by it.
    pub wake_shift: u8,
    /// This kernel's SKB_DROP_REASON_NOT_SPECIFIED (0: off). A packet an
    /// NFQUEUE reader let go runs its remaining hooks in `nf_reinject`,
    /// which frees it with this reason when one of them drops it: confirm's
    /// failed insert among them (NFQUEUE in mangle or filter POSTROUTING,
    /// as inline IPS setups use). Such frees whose packet still holds an
    /// unconfirmed entry are looked at too, and reported only where a
    /// conntrack signal names them (see `tracer-ebpf/src/kfree_skb.rs`).
    pub reinject_reason: u8,
}

/// The reader is woken each time the ring's unread data crosses a multiple
/// of this fraction of its size (see `tracer-ebpf/src/kfree_skb.rs`).
pub const RING_WAKEUP_FRACTION: u32 = 16;

/// [`FilterConfig::wake_shift`] for a ring of `ring_size` bytes (a power
/// of two, as the kernel requires).
pub const fn wake_shift(ring_size: u32) -> u8 {
    (ring_size / RING_WAKEUP_FRACTION).trailing_zeros() as u8
}
// The default 4 MiB ring wakes the reader every 256 KiB; the smallest
// (one 4 KiB page) every 256 bytes.
const _: () = assert!(wake_shift(4 << 20) == 18 && wake_shift(4096) == 8);
const _: () = assert!(core::mem::size_of::<FilterConfig>() == 384);

/// Per-namespace conntrack path events counted by the probe tier (keyed
/// by namespace inode in a per-CPU hash): the table-fill timeline and the
/// outcomes that are not drops.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable, PartialEq, Eq, Default)]
// Serialized as is in the summary's `conntrack_events` (user side only).
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct CtEventCounts {
    /// Entries confirmed into the table (`__nf_conntrack_hash_insert`).
    pub inserts: u64,
    /// `early_drop` evicted an entry to make room.
    pub early_drop_evicted: u64,
    /// `early_drop` found nothing evictable.
    pub early_drop_failed: u64,
    /// `__nf_conntrack_alloc` failed: table full.
    pub alloc_failed: u64,
    /// `__nf_conntrack_confirm` returned NF_DROP: insert clash.
    pub confirm_dropped: u64,
    /// `nf_ct_resolve_clash` resolved a clash (the packet lives on).
    pub clash_resolved: u64,
    /// `nf_conntrack_in` returned NF_DROP.
    pub in_dropped: u64,
    /// `nf_conntrack_in` accepted the packet without an entry (invalid).
    pub invalid: u64,
}

/// A conntrack-path verdict on one skb, waiting for its `kfree_skb`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable, PartialEq, Eq)]
pub struct SkbVerdict {
    pub ts_ns: u64,
    /// One of [`source`].
    pub source: u8,
    pub _pad: [u8; 7],
}

/// Longest time between a conntrack verdict and the kfree_skb it explains;
/// beyond it the skb address may have been reused.
pub const VERDICT_MAX_AGE_NS: u64 = 50_000_000;

/// Indices of the functions whose entry arguments are stashed for their
/// return probes.
pub mod stash {
    pub const CONNTRACK_IN: u32 = 0;
    pub const CONFIRM: u32 = 1;
    pub const EARLY_DROP: u32 = 2;
    pub const RESOLVE_CLASH: u32 = 3;
    pub const LEN: u32 = 4;
}

/// Count mode's settings: a read-only global of the kernel programs
/// (`COUNT_CONFIG`), set by userspace at load time.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable, PartialEq, Eq)]
pub struct CountConfig {
    /// Per-flow detail comes from 1 in this many counted drops on average
    /// (the gaps between sampled drops are random, mean `flow_sample`);
    /// 1 = every drop. Group totals count every drop whatever this is.
    pub flow_sample: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<CountConfig>() == 8);

impl CountConfig {
    /// Per-flow detail from every drop (and what the other modes load).
    pub const EVERY_DROP: CountConfig = CountConfig {
        flow_sample: 1,
        _pad: 0,
    };
}

/// Default of `--flow-sample`: per-flow detail from 1 drop in 16.
pub const DEFAULT_FLOW_SAMPLE: u32 = 16;

/// Largest `--flow-sample` (the gap drawn in the kernel is below 2x this).
pub const MAX_FLOW_SAMPLE: u32 = 1 << 20;

#[cfg(feature = "user")]
mod user_pod {
    // aya's own marker trait is separate from bytemuck's: both are needed.
    unsafe impl aya::Pod for super::DropRecord {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowCount {}
    unsafe impl aya::Pod for super::GroupKey {}
    unsafe impl aya::Pod for super::GroupSet {}
    unsafe impl aya::Pod for super::FlowSet {}
    unsafe impl aya::Pod for super::Offsets {}
    unsafe impl aya::Pod for super::FilterConfig {}
    unsafe impl aya::Pod for super::CtEventCounts {}
    unsafe impl aya::Pod for super::SkbVerdict {}
    unsafe impl aya::Pod for super::HookMark {}
    unsafe impl aya::Pod for super::CountConfig {}
    unsafe impl aya::Pod for super::CpuStatSet {}
}
