//! Scenes for ctdrop's demo, integration tests and `cargo xtask bench`:
//! namespaces joined by veths, the rules that turn conntrack on, the one
//! guard around the global `nf_conntrack_max`, the kernel's conntrack
//! counters, and traffic (UDP flows, ICMP probes, floods) sent from inside
//! a namespace. The tracer itself never builds a scene and does not use
//! this crate; only its `demo` module does.
//!
//! - [`ns`]: entering a namespace (the one `setns`), named namespaces.
//! - [`topo`]: two namespaces joined by a veth pair.
//! - [`max`]: the `nf_conntrack_max` guard (one lock, one wait policy).
//! - [`stats`]: `/proc/net/stat/nf_conntrack` parsing and reading.
//! - [`traffic`]: UDP flows and sinks, ICMP echo probes.
//! - [`flood`]: `sendmmsg` floods that out-run a tracer.

pub mod flood;
pub mod max;
pub mod ns;
pub mod stats;
pub mod topo;
pub mod traffic;

pub use flood::{Flood, FloodKind};
pub use max::{
    namespaces_with_entries, read_max, write_max, MaxGuard, NsEntries, LOCK_PATH, MAX_SYSCTL,
};
pub use ns::{
    accept_ct_rule, enter, enter_file, in_netns, netns_path, next_id, remove_leftover, run,
    spawn_in, Netns,
};
pub use stats::{
    ct_stats, ct_stats_at, parse_ct_stats, parse_entries, settled_ct_stats,
    settled_ct_stats_within, CtStats, StatFile,
};
pub use topo::{PairSpec, Topology, VethPair};
pub use traffic::{
    echo_request, ping, send_arp_requests, send_udp, send_udp_flows, set_icmp_checksum, EchoProbe,
    UdpSink,
};
