//! The bench's world, built with ctlab (the scenes the tests and the demo
//! use too): two namespaces joined by a veth pair, the receiver's
//! conntrack switched on, and the global `nf_conntrack_max` shrunk under
//! the one shared guard so its table is full. Each piece undoes itself on
//! drop, also when the bench fails or is interrupted.

use std::{net::Ipv4Addr, path::PathBuf, sync::atomic::Ordering};

use anyhow::{anyhow, Result};

pub use ctlab::LOCK_PATH;

pub const SENDER: &str = "ctdb-tx";
pub const RECEIVER: &str = "ctdb-rx";
pub const SENDER_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 60, 1);
pub const RECEIVER_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 60, 2);

/// Exclusive hold on the lock and on `nf_conntrack_max` (ctlab's guard:
/// its wait policy, its refusal to lower the limit under another
/// namespace's entries, its repair of a killed holder's value).
pub struct ConntrackMax(ctlab::MaxGuard);

impl ConntrackMax {
    /// Waits for the lock (until SIGINT/SIGTERM), then sets the limit.
    pub fn set(value: u64) -> Result<ConntrackMax> {
        let mut guard = ctlab::MaxGuard::lock(&|| super::STOP.load(Ordering::Relaxed))?;
        // The bench's own namespaces are leftovers at this point: created
        // afterwards, or removed by Topology::create.
        guard.set(value, &|n| {
            n.name.as_deref().is_some_and(|n| n.starts_with("ctdb-"))
        })?;
        Ok(ConntrackMax(guard))
    }

    pub fn previous(&self) -> u64 {
        self.0.previous()
    }
}

/// Sender and receiver namespaces; deleted on drop.
pub struct Topology {
    _pair: ctlab::Topology,
}

impl Topology {
    pub fn create() -> Result<Topology> {
        // A previous bench that was SIGKILLed may have left these behind.
        for ns in [SENDER, RECEIVER] {
            ctlab::remove_leftover(ns)?;
        }
        let t = ctlab::Topology::build(&ctlab::PairSpec {
            sender: SENDER,
            receiver: RECEIVER,
            sender_if: "ctdb-a",
            receiver_if: "ctdb-b",
            sender_addr: SENDER_ADDR,
            receiver_addr: RECEIVER_ADDR,
        })?;
        t.pin_receiver_neighbour()?;
        t.track_receiver()?;
        Ok(Topology { _pair: t })
    }

    pub fn netns_path(name: &str) -> PathBuf {
        ctlab::netns_path(name)
    }
}

/// The receiver's `/proc/net/stat/nf_conntrack`, opened once from inside it.
pub struct DropCounter(ctlab::StatFile);

impl DropCounter {
    pub fn open(ns: &str) -> Result<DropCounter> {
        Ok(DropCounter(ctlab::StatFile::open(&ctlab::netns_path(ns))?))
    }

    /// (`drop` summed over CPUs, `entries`).
    pub fn read(&mut self) -> Result<(u64, u64)> {
        let s = self.0.read()?;
        let col = |name: &str| {
            s.get(name)
                .copied()
                .ok_or_else(|| anyhow!("no {name:?} column in conntrack stats"))
        };
        Ok((col("drop")?, col("entries")?))
    }
}
