//! Draining the ring buffer: woken by epoll through tokio's `AsyncFd`, then
//! records are consumed in batches (no sleep loop, no allocation per
//! record).
//!
//! A batch is bounded: when the kernel writes as fast as we read, "drain
//! until empty" never ends, and Ctrl-C, SIGTERM, --duration and the
//! once-a-second loss warning would wait behind it forever.
//!
//! The ring is read through our own mappings of it, not aya's `RingBuf`,
//! for one reason: when to tell the kernel what we have read. aya stores
//! the consumer position after every record. The kernel reads that word on
//! every reserve (is there room?) and on every wakeup query, on the CPU
//! that drops the packet; a store per record from the reader's CPU takes
//! the cache line away from it each time, so every drop paid a cross-CPU
//! miss. Here the position is published once per [`Ring::publish_every`]
//! bytes and whenever the reader catches up or stops, so the dropping CPU
//! keeps the line for hundreds of records. The kernel sees the space we
//! freed a little later (at most 1/16 of the ring, 64 KiB at most), which
//! costs nothing but that much headroom.

use std::{
    os::fd::{AsFd, AsRawFd, RawFd},
    ptr::NonNull,
    sync::atomic::{fence, AtomicU32, AtomicUsize, Ordering},
};

use anyhow::{anyhow, Context, Result};
use aya::maps::MapData;
use tokio::io::unix::AsyncFd;

/// Records handled per wake-up before the session loop gets its turn.
pub const BATCH: usize = 4096;

// The kernel's ring record header (include/uapi/linux/bpf.h): a u32 length
// with these two bits, then a u32 page offset we do not need.
const BUSY_BIT: u32 = 1 << 31;
const DISCARD_BIT: u32 = 1 << 30;
const HDR_SZ: usize = 8;

/// Publish the consumer position every this fraction of the ring read...
const PUBLISH_FRACTION: usize = 16;
/// ...and at least this often (bytes read).
const PUBLISH_MAX: usize = 64 << 10;

pub struct RingReader {
    fd: AsyncFd<Ring>,
}

impl RingReader {
    pub fn new(map: MapData) -> Result<Self> {
        let ring = Ring::map(map)?;
        // SAFETY: the Ring owns the map and so its fd, and lives inside the
        // AsyncFd: the fd stays open for as long as it is registered.
        let fd = unsafe { AsyncFd::register(ring) }
            .map_err(|e| anyhow!("registering the ring buffer with epoll: {e}"))?;
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
    /// The batch is over: make what was read visible to the writer.
    fn finish(&mut self) {}
}

/// Takes up to `limit` records; (how many, whether it stopped at the limit).
pub fn drain_into(
    src: &mut impl Records,
    limit: usize,
    f: &mut impl FnMut(&[u8]),
) -> (usize, bool) {
    let mut n = 0;
    let more = loop {
        if n == limit {
            break true;
        }
        if !src.next_into(f) {
            break false;
        }
        n += 1;
    };
    src.finish();
    (n, more)
}

/// A memory mapping, unmapped when dropped.
struct Mapping {
    ptr: NonNull<libc::c_void>,
    len: usize,
}

impl Mapping {
    fn new(fd: RawFd, len: usize, prot: libc::c_int, offset: usize, what: &str) -> Result<Self> {
        // SAFETY: a fresh shared mapping of the map's fd; the kernel checks
        // length, offset and protection against the ring's layout.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                fd,
                offset as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(anyhow!(
                "mapping the ring buffer's {what}: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(Mapping {
            ptr: NonNull::new(ptr)
                .ok_or_else(|| anyhow!("mapping the ring buffer's {what}: null"))?,
            len,
        })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: our own mapping, unmapped once; nothing borrows into it
        // past the `Ring` that owns it.
        unsafe { libc::munmap(self.ptr.as_ptr(), self.len) };
    }
}

/// The kernel's ring buffer (kernel/bpf/ringbuf.c), mapped as the kernel
/// lays it out for user space: one writable page holding the consumer
/// position, then one read-only page holding the producer position,
/// followed by the data pages mapped twice in a row, so a record that
/// wraps around the end reads as one slice.
pub struct Ring {
    view: View,
    // After `view`, which points into them.
    _consumer: Mapping,
    _producer: Mapping,
    map: MapData,
}

// SAFETY: the mappings are owned by the Ring and only read or written
// through `&mut self`; nothing else in this process points into them.
unsafe impl Send for Ring {}

impl Ring {
    fn map(map: MapData) -> Result<Ring> {
        let size = map
            .info()
            .context("reading the ring buffer's size")?
            .max_entries() as usize;
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        if !size.is_power_of_two() || size < page {
            return Err(anyhow!(
                "the ring buffer's size {size} is not a power of two of pages"
            ));
        }
        let fd = map.fd().as_fd().as_raw_fd();
        let consumer = Mapping::new(
            fd,
            page,
            libc::PROT_READ | libc::PROT_WRITE,
            0,
            "consumer page",
        )?;
        let producer = Mapping::new(fd, page + 2 * size, libc::PROT_READ, page, "data pages")?;
        let base = producer.ptr.as_ptr() as *const u8;
        // SAFETY: both pages are mapped for as long as the Ring lives, and
        // the kernel only ever accesses the two positions atomically.
        let view = unsafe {
            View::new(
                &*(consumer.ptr.as_ptr() as *const AtomicUsize),
                &*(base as *const AtomicUsize),
                base.add(page),
                size,
            )
        };
        Ok(Ring {
            view,
            _consumer: consumer,
            _producer: producer,
            map,
        })
    }
}

impl AsRawFd for Ring {
    fn as_raw_fd(&self) -> RawFd {
        self.map.fd().as_fd().as_raw_fd()
    }
}

impl Records for Ring {
    fn next_into(&mut self, f: &mut dyn FnMut(&[u8])) -> bool {
        self.view.next_into(f)
    }
    fn finish(&mut self) {
        self.view.finish();
    }
}

/// The reading logic over raw memory (a test builds one over plain memory).
struct View {
    consumer_pos: *const AtomicUsize,
    producer_pos: *const AtomicUsize,
    /// `2 * (mask + 1)` readable bytes, the second half mirroring the first.
    data: *const u8,
    mask: usize,
    /// The next record to read.
    pos: usize,
    /// What the kernel was last told we read.
    published: usize,
    /// The producer position as last read: refreshed only when `pos`
    /// reaches it, so the reader does not pull that line on every record.
    producer_seen: usize,
    publish_every: usize,
}

impl View {
    /// # Safety
    /// For as long as the View is used, both positions must stay valid and
    /// `data` readable for `2 * size` bytes laid out as the kernel's double
    /// mapping: every later access relies on this.
    unsafe fn new(
        consumer_pos: &AtomicUsize,
        producer_pos: &AtomicUsize,
        data: *const u8,
        size: usize,
    ) -> View {
        let pos = consumer_pos.load(Ordering::Acquire);
        View {
            consumer_pos,
            producer_pos,
            data,
            mask: size - 1,
            pos,
            published: pos,
            producer_seen: producer_pos.load(Ordering::Acquire),
            publish_every: (size / PUBLISH_FRACTION).clamp(HDR_SZ, PUBLISH_MAX),
        }
    }

    /// Tells the kernel everything before `pos` is read (its space free).
    fn publish(&mut self) {
        if self.published != self.pos {
            // SAFETY: points into the live consumer page (see `new`).
            // Release: our reads of those records happen before the kernel
            // may reuse their space (it loads this with acquire).
            unsafe { &*self.consumer_pos }.store(self.pos, Ordering::Release);
            self.published = self.pos;
        }
    }
}

impl Records for View {
    fn next_into(&mut self, f: &mut dyn FnMut(&[u8])) -> bool {
        loop {
            if self.pos == self.producer_seen {
                // Caught up: publish, then look again. The full fence pairs
                // with the kernel's commit: either we see its new producer
                // position, or it sees our consumer position.
                self.publish();
                fence(Ordering::SeqCst);
                // SAFETY: the producer position, valid per `View::new`.
                self.producer_seen = unsafe { &*self.producer_pos }.load(Ordering::Acquire);
                if self.pos == self.producer_seen {
                    return false;
                }
            }
            let off = self.pos & self.mask;
            // Acquire pairs with the kernel's commit (an xchg clearing the
            // busy bit): the record's bytes are visible once it is clear.
            // SAFETY: `off` is below the ring's size, inside the mapping.
            let hdr = unsafe { &*(self.data.add(off) as *const AtomicU32) }.load(Ordering::Acquire);
            if hdr & BUSY_BIT != 0 {
                // Reserved, not yet committed: the next wakeup or poll
                // reads it. What we did read is released meanwhile.
                self.publish();
                return false;
            }
            let len = (hdr & !(BUSY_BIT | DISCARD_BIT)) as usize;
            if len > self.mask + 1 - HDR_SZ {
                // Cannot happen with the kernel's layout; never read past
                // the double mapping on a torn header.
                return false;
            }
            if hdr & DISCARD_BIT == 0 {
                // SAFETY: `len` fits the ring (checked above) and the data is
                // mapped twice, so `off + HDR_SZ + len` stays inside it.
                f(unsafe { std::slice::from_raw_parts(self.data.add(off + HDR_SZ), len) });
            }
            self.pos += (HDR_SZ + len).next_multiple_of(8);
            if self.pos - self.published >= self.publish_every {
                self.publish();
            }
            if hdr & DISCARD_BIT == 0 {
                return true;
            }
        }
    }

    fn finish(&mut self) {
        self.publish();
    }
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

    /// The kernel's side of a ring, in plain memory: the data doubled the
    /// way the kernel maps it, records written the way it commits them.
    struct Fake {
        consumer: Box<AtomicUsize>,
        producer: Box<AtomicUsize>,
        data: Vec<u64>,
        size: usize,
    }

    impl Fake {
        fn new(size: usize, start: usize) -> Fake {
            Fake {
                consumer: Box::new(AtomicUsize::new(start)),
                producer: Box::new(AtomicUsize::new(start)),
                data: vec![0; 2 * size / 8],
                size,
            }
        }
        fn put(&mut self, pos: usize, bytes: &[u8]) {
            let raw = self.data.as_mut_ptr() as *mut u8;
            for (i, b) in bytes.iter().enumerate() {
                let at = (pos + i) % self.size;
                // SAFETY: both indexes are below 2 * size, the Vec's length in bytes.
                unsafe {
                    *raw.add(at) = *b;
                    *raw.add(at + self.size) = *b;
                }
            }
        }
        /// Appends a record whose header has `extra` bits (busy, discard).
        fn push(&mut self, payload: &[u8], extra: u32) {
            let pos = self.producer.load(Ordering::Relaxed);
            self.put(pos, &(payload.len() as u32 | extra).to_le_bytes());
            self.put(pos + HDR_SZ, payload);
            self.producer.store(
                pos + (HDR_SZ + payload.len()).next_multiple_of(8),
                Ordering::Release,
            );
        }
        fn view(&self) -> View {
            // SAFETY: the Fake outlives every view a test makes of it.
            unsafe {
                View::new(
                    &self.consumer,
                    &self.producer,
                    self.data.as_ptr() as *const u8,
                    self.size,
                )
            }
        }
        fn consumer(&self) -> usize {
            self.consumer.load(Ordering::Relaxed)
        }
    }

    fn next(v: &mut View) -> Option<Vec<u8>> {
        let mut got = None;
        v.next_into(&mut |r| got = Some(r.to_vec()));
        got
    }

    #[test]
    fn records_come_in_order_and_discarded_ones_are_skipped() {
        let mut k = Fake::new(4096, 0);
        k.push(b"one", 0);
        k.push(b"gone", DISCARD_BIT);
        k.push(b"three", 0);
        let mut v = k.view();
        assert_eq!(next(&mut v).as_deref(), Some(&b"one"[..]));
        assert_eq!(next(&mut v).as_deref(), Some(&b"three"[..]));
        assert_eq!(next(&mut v), None);
        // Caught up: everything read is handed back to the kernel.
        assert_eq!(k.consumer(), k.producer.load(Ordering::Relaxed));
    }

    #[test]
    fn the_consumer_position_moves_in_steps_not_per_record() {
        // 4 KiB ring: published every 256 bytes; 24-byte records take 32.
        let mut k = Fake::new(4096, 0);
        for i in 0..20u8 {
            k.push(&[i; 24], 0);
        }
        let mut v = k.view();
        for i in 0..7u8 {
            assert_eq!(next(&mut v), Some(vec![i; 24]));
            assert_eq!(k.consumer(), 0, "published after {} records", i + 1);
        }
        assert_eq!(next(&mut v), Some(vec![7; 24]));
        assert_eq!(k.consumer(), 256);
        // A batch that ends early still hands back what it read.
        let (n, more) = drain_into(&mut v, 3, &mut |_| {});
        assert_eq!((n, more), (3, true));
        assert_eq!(k.consumer(), 256 + 3 * 32);
    }

    #[test]
    fn a_record_still_being_written_ends_the_batch_and_is_read_later() {
        let mut k = Fake::new(4096, 0);
        k.push(b"done", 0);
        let busy_at = k.producer.load(Ordering::Relaxed);
        k.push(b"half", BUSY_BIT);
        let mut v = k.view();
        assert_eq!(next(&mut v).as_deref(), Some(&b"done"[..]));
        assert_eq!(next(&mut v), None);
        assert_eq!(k.consumer(), busy_at, "what was read is released");
        k.put(busy_at, &4u32.to_le_bytes()); // committed
        assert_eq!(next(&mut v).as_deref(), Some(&b"half"[..]));
    }

    #[test]
    fn a_record_across_the_end_of_the_ring_reads_whole() {
        let mut k = Fake::new(4096, 4096 - 16);
        k.push(&[7; 40], 0);
        k.push(b"after", 0);
        let mut v = k.view();
        assert_eq!(next(&mut v), Some(vec![7; 40]));
        assert_eq!(next(&mut v).as_deref(), Some(&b"after"[..]));
        assert_eq!(next(&mut v), None);
    }
}
