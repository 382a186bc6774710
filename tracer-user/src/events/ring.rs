//! Draining the ring buffer: woken by epoll through tokio's `AsyncFd`, then
//! everything available is consumed in one batch (no sleep loop, no
//! allocation per record).

use anyhow::{Context, Result};

use aya::maps::{MapData, RingBuf};
use tokio::io::unix::AsyncFd;

pub struct RingReader {
    fd: AsyncFd<RingBuf<MapData>>,
}

impl RingReader {
    pub fn new(ring: RingBuf<MapData>) -> Result<Self> {
        // SAFETY: the RingBuf owns its fd and lives inside the AsyncFd, so the
        // fd stays open for as long as it is registered.
        let fd = unsafe { AsyncFd::register(ring) }
            .map_err(|e| anyhow::anyhow!("registering the ring buffer with epoll: {e}"))?;
        Ok(RingReader { fd })
    }

    /// Waits until records are available, then hands each to `f`.
    pub async fn wait_and_drain(&mut self, mut f: impl FnMut(&[u8])) -> Result<usize> {
        let mut guard = self.fd.readable_mut().await.context("waiting on the ring buffer")?;
        let n = drain_into(guard.get_inner_mut(), &mut f);
        guard.clear_ready();
        Ok(n)
    }

    /// Consumes what is there without waiting (used at shutdown).
    pub fn drain(&mut self, mut f: impl FnMut(&[u8])) -> usize {
        drain_into(self.fd.get_mut(), &mut f)
    }
}

fn drain_into(ring: &mut RingBuf<MapData>, f: &mut impl FnMut(&[u8])) -> usize {
    let mut n = 0;
    while let Some(item) = ring.next() {
        f(&item);
        n += 1;
    }
    n
}
