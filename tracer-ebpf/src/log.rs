//! The programs' own diagnostics (aya-log), for what they otherwise skip in
//! silence: a drop whose packet the parser gave up on, a failed map lookup.
//!
//! Off unless userspace asks (`--bpf-log`, `-vv`, `RUST_LOG=debug`; see
//! tracer-user/src/logging.rs), and then free: `BPF_LOG` lives in `.rodata`,
//! which userspace sets before load and the kernel freezes, so with it 0
//! the verifier knows every `if on(..)` below is never taken and removes
//! the logging code; the drop path runs what it ran without it. Each call
//! site tests `on` first, before it reads anything for the message.
//!
//! aya-log's macros take a program context and ignore it: they get `&()`,
//! so a call site needs none.
//!
//! Records go out with target `bpf`, printed `ctdrop: debug: bpf: ...`.
//! When on, a flood of them is bounded by aya-log's own ring (a record
//! that finds it full is not written).

use aya_ebpf::Global;
use aya_log_ebpf::{debug, warn};
use tracer_common::{flags, DropRecord};

/// The most detailed level on, in aya-log's numbering (1 error .. 5
/// trace); 0: off. Userspace writes the same value to aya-log's own
/// `AYA_LOG_LEVEL`, which defaults to everything on.
#[no_mangle]
static BPF_LOG: Global<u8> = Global::new(0);

const WARN: u8 = 2;
const DEBUG: u8 = 4;

#[inline(always)]
fn on(level: u8) -> bool {
    BPF_LOG.load() >= level
}

/// A drop the filter kept whose skb gave the parser no IP header (none
/// set, not IPv4/IPv6: ARP, say) or a cut one: its record has no flow.
#[inline(always)]
pub fn unparsed(rec: &DropRecord) {
    if on(DEBUG) {
        unparsed_log(rec);
    }
}

// Out of line: the drop path holds only the test of `on`.
#[inline(never)]
fn unparsed_log(rec: &DropRecord) {
    let truncated = rec.flags & flags::TRUNCATED != 0;
    if rec.flags & flags::HAS_L3 != 0 && !truncated {
        return;
    }
    debug!(
        &(),
        target: "bpf",
        "kfree_skb: skb 0x{:x} in netns {} ifindex {}, protocol 0x{:x}, reason {}: {}",
        rec.skb,
        rec.netns,
        rec.ifindex,
        rec.l3_proto,
        rec.reason,
        if truncated {
            "IP header cut short, no flow"
        } else {
            "no IPv4/IPv6 header, no flow"
        }
    );
}

/// The per-CPU scratch record was not found (the lookup of index 0 of a
/// one-entry array: never, unless the map is broken): the drop was neither
/// counted nor, for a full ring, counted as lost.
#[inline(always)]
pub fn no_scratch() {
    if !on(WARN) {
        return;
    }
    warn!(
        &(),
        target: "bpf",
        "kfree_skb: SCRATCH lookup failed: a drop went uncounted"
    );
}
