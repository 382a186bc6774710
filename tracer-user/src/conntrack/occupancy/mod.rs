//! Who holds a namespace's conntrack table: a snapshot of its entries,
//! summarized by protocol and state, by liveness (UNREPLIED entries are the
//! ones the kernel may evict, ASSURED ones never are), and by the sources,
//! destinations and destination ports that hold the most entries.
//!
//! The snapshot is a ctnetlink dump, the request `conntrack -L` makes,
//! through the rust-netlink `netlink-packet-netfilter` crate. Not
//! `/proc/net/nf_conntrack`: that file only exists on kernels built with
//! CONFIG_NF_CONNTRACK_PROCFS (not this one, and not most distribution
//! kernels since 5.x), and it is text the kernel formats per entry, slower
//! to produce and to parse than the binary dump. ctnetlink answers for the
//! namespace of the socket, so the dump runs on a thread inside it.
//!
//! One job a module:
//! - [`entry`]: one dumped entry (its tuple, TCP state, status bits).
//! - [`dump`]: the ctnetlink dump of the calling thread's namespace.
//! - [`nat`]: whether the namespace has NAT rules (nf_tables, iptables).
//! - [`model`]: the builder that folds entries into the summary (`Occupancy`,
//!   defined in `crate::model::occupancy`).
//! - [`render`]: the summary as text for an operator.
//! - [`schedule`]: when snapshots are taken (one per namespace per gap, off
//!   the tracing loop) and of which namespace.

pub mod dump;
pub mod entry;
pub mod model;
pub mod nat;
pub mod render;
pub mod schedule;
#[cfg(test)]
mod tests;

pub use dump::dump;
pub use entry::{tcp_state_name, CtEntry, Liveness};
pub use model::{AddrRow, Occupancy, OccupancyBuilder, PortRow, StateRow, TOP_N};
pub use nat::nat_rules_here;
pub use schedule::{
    snapshot, snapshot_arg, snapshot_here, SnapshotLimiter, Snapshots, SNAPSHOT_GAP,
};
