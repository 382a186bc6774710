//! Kernel programs of ctdrop. They report; userspace decides. Every struct
//! offset comes from the `OFFSETS` global that userspace resolves from BTF.
#![no_std]
#![no_main]
// Map keys and values are passed by reference as the kernel's map API
// takes them, and loops index bounded arrays by a counter the verifier can
// follow: both are kept on purpose, as what the verifier accepted on 6.1.
#![allow(clippy::needless_borrows_for_generic_args, clippy::needless_range_loop)]

/// One field (or element) of a `.rodata` global, `OFFSETS` or `FILTER`:
/// `ro!(OFFSETS.skb_len)`, `ro!(FILTER.nets[i].mask[k])`. Volatile so the
/// compiler cannot fold the placeholder values in; per field so no copy of
/// the struct lands on the stack (6.1's verifier caps the stack of a
/// program and its callees).
macro_rules! ro {
    ($($place:tt)*) => {{
        #[allow(unused_unsafe)]
        // SAFETY: a read of a field of an immutable static; indices are
        // below the array lengths by their loop bounds.
        unsafe {
            core::ptr::read_volatile(&crate::$($place)*)
        }
    }};
}

mod conntrack;
mod count;
mod filter;
mod hooks;
mod kfree_skb;
mod log;
mod skb;
mod witness;

use aya_ebpf::{
    macros::map,
    maps::{PerCpuArray, RingBuf},
};
use tracer_common::{
    stat, CountConfig, FilterConfig, FilterIf, FilterNet, Offsets, FILTER_MAX, OFFSET_ABSENT,
};

/// Filled in by userspace at load time (`EbpfLoader::set_global`); the
/// verifier then sees the values as constants.
#[no_mangle]
static OFFSETS: Offsets = Offsets {
    skb_dev: OFFSET_ABSENT,
    skb_nfct: OFFSET_ABSENT,
    skb_len: OFFSET_ABSENT,
    skb_protocol: OFFSET_ABSENT,
    skb_head: OFFSET_ABSENT,
    skb_network_header: OFFSET_ABSENT,
    skb_transport_header: OFFSET_ABSENT,
    skb_sk: OFFSET_ABSENT,
    sk_net: OFFSET_ABSENT,
    dev_ifindex: OFFSET_ABSENT,
    dev_nd_net: OFFSET_ABSENT,
    net_inum: OFFSET_ABSENT,
    conn_status: OFFSET_ABSENT,
    conn_net: OFFSET_ABSENT,
    conn_zone_id: OFFSET_ABSENT,
    net_ct_stat: OFFSET_ABSENT,
    stat_drop: OFFSET_ABSENT,
    stat_insert_failed: OFFSET_ABSENT,
    stat_invalid: OFFSET_ABSENT,
    net_cookie: OFFSET_ABSENT,
    array_pptrs: OFFSET_ABSENT,
};

#[no_mangle]
static FILTER: FilterConfig = FilterConfig {
    nets: [FilterNet {
        addr: [0; 4],
        mask: [0; 4],
    }; FILTER_MAX],
    netns: [0; FILTER_MAX],
    ifs: [FilterIf {
        netns: 0,
        ifindex: 0,
    }; FILTER_MAX],
    ports: [0; FILTER_MAX],
    netfilter_drop_reason: 0,
    n_nets: 0,
    nets_v6: 0,
    n_netns: 0,
    n_ifs: 0,
    n_ports: 0,
    l4_proto: 0,
    all_reasons: 0,
    capture_headers: 0,
    count_only: 0,
    ct_probes: 0,
    wake_shift: 0,
    reinject_reason: 0,
};

/// Count mode's settings (`--flow-sample`), set at load like `FILTER`.
#[no_mangle]
static COUNT_CONFIG: CountConfig = CountConfig {
    flow_sample: 1,
    _pad: 0,
};

/// Userspace resizes this at load (`--ring-size`).
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::LEN, 0);

/// The record under construction lives here, not on the stack.
#[map]
static SCRATCH: PerCpuArray<tracer_common::DropRecord> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
fn bump(index: u32) {
    if let Some(p) = STATS.get_ptr_mut(index) {
        // SAFETY: this CPU's counter slot; programs run with migration disabled and do not re-enter on a CPU.
        unsafe { *p += 1 };
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
