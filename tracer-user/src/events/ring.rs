//! Draining the ring buffer: woken by epoll through tokio's `AsyncFd`, then
//! records are consumed in batches (no sleep loop, no allocation per
//! record).
//!
//! A batch is bounded: when the kernel writes as fast as we read, "drain
//! until empty" never ends, and Ctrl-C, SIGTERM, --duration and the
//! once-a-second loss warning would wait behind it forever.

use anyhow::{Context, Result};

use aya::maps::{MapData, RingBuf};
use tokio::io::unix::AsyncFd;

/// Records handled per wake-up before the session loop gets its turn.
pub const BATCH: usize = 4096;

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

    /// Waits until records are available, then hands at most [`BATCH`] of
    /// them to `f`.
    pub async fn wait_and_drain(&mut self, mut f: impl FnMut(&[u8])) -> Result<usize> {
        let mut guard = self
            .fd
            .readable_mut()
            .await
            .context("waiting on the ring buffer")?;
        let (n, more) = drain_into(guard.get_inner_mut(), BATCH, &mut f);
        // Records left behind: stay ready, so the next wait returns at once
        // (epoll would not wake us for records already there).
        if !more {
            guard.clear_ready();
        }
        Ok(n)
    }

    /// Consumes what is there without waiting. Unbounded: call it only once
    /// the programs are detached (nothing more can arrive), or accept that
    /// it stops after `limit` records.
    pub fn drain(&mut self, limit: usize, mut f: impl FnMut(&[u8])) -> usize {
        drain_into(self.fd.get_mut(), limit, &mut f).0
    }
}

/// Something records can be taken from one at a time.
pub trait Records {
    /// Hands the next record to `f`; false when there is none.
    fn next_into(&mut self, f: &mut dyn FnMut(&[u8])) -> bool;
}

impl Records for RingBuf<MapData> {
    fn next_into(&mut self, f: &mut dyn FnMut(&[u8])) -> bool {
        match self.next() {
            Some(item) => {
                f(&item);
                true
            }
            None => false,
        }
    }
}

/// Takes up to `limit` records; (how many, whether it stopped at the limit).
pub fn drain_into(
    src: &mut impl Records,
    limit: usize,
    f: &mut impl FnMut(&[u8]),
) -> (usize, bool) {
    let mut n = 0;
    while n < limit {
        if !src.next_into(f) {
            return (n, false);
        }
        n += 1;
    }
    (n, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A producer that never runs dry, like a kernel outpacing us.
    struct Endless(u64);

    impl Records for Endless {
        fn next_into(&mut self, f: &mut dyn FnMut(&[u8])) -> bool {
            self.0 += 1;
            f(&self.0.to_le_bytes());
            true
        }
    }

    struct Finite(Vec<Vec<u8>>);

    impl Records for Finite {
        fn next_into(&mut self, f: &mut dyn FnMut(&[u8])) -> bool {
            match self.0.pop() {
                Some(r) => {
                    f(&r);
                    true
                }
                None => false,
            }
        }
    }

    #[test]
    fn a_producer_that_never_stops_cannot_hold_the_reader() {
        let mut seen = 0;
        assert_eq!(
            drain_into(&mut Endless(0), BATCH, &mut |_| seen += 1),
            (BATCH, true)
        );
        assert_eq!(seen, BATCH);
    }

    #[test]
    fn a_short_ring_is_emptied_and_says_so() {
        let mut seen = Vec::new();
        let mut src = Finite(vec![vec![1], vec![2], vec![3]]);
        assert_eq!(
            drain_into(&mut src, BATCH, &mut |r| seen.push(r[0])),
            (3, false)
        );
        assert_eq!(seen, [3, 2, 1]);
        // Exactly at the limit: it cannot know the ring is empty yet.
        let mut src = Finite(vec![vec![1], vec![2]]);
        assert_eq!(drain_into(&mut src, 2, &mut |_| {}), (2, true));
        assert_eq!(drain_into(&mut src, 2, &mut |_| {}), (0, false));
    }
}
