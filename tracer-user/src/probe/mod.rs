//! The built-in prober (ICMP echo, TCP SYN, UDP) and the matcher that ties
//! lost probes to the drops that ate them.
pub mod matcher;
pub mod order;
pub mod sender;
pub mod target;

pub use matcher::{Matcher, Outcome, SeenDrop, Status, Wire};
pub use target::{Target, TargetSpec};

/// CLOCK_MONOTONIC in ns: the clock of `bpf_ktime_get_ns`, so probe times
/// and drop times compare directly.
pub fn mono_ns() -> u64 {
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
