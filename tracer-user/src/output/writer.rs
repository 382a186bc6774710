//! stdout that never holds up tracing.
//!
//! A reader that stops reading but keeps the pipe open (a paused `less`, a
//! stuck log shipper) would block a plain `write` once the pipe's 64 KiB
//! are full, and with it the loop that drains the ring buffer, answers
//! signals and ends `--duration`. So sinks write into a [`QueuedOut`]: it
//! fills a buffer in memory (as a `BufWriter` would) and hands whole
//! chunks to a writer thread that does the blocking writes. What the
//! reader does not take piles up to [`MAX_QUEUED_BYTES`]; past that, chunks
//! are dropped and their lines counted, with a warning on stderr at most
//! once a second, and the count at the end ([`OutHandle::finish`]).
//!
//! The queue is made of fixed-size chunks that go back to a free list once
//! written, never of buffers that grow: its memory is at most
//! [`MAX_QUEUED_BYTES`] plus two chunks, reached once and then reused. (One
//! growing `Vec` per hand-over slot used to cost up to three 4 MiB buffers,
//! each touched for the first time whenever the reader happened to fall
//! behind while it was the pending one, and a `realloc` copy on top: RSS
//! stepped up by 4 MiB at random moments of a flood.)

use std::{
    io::{self, Write},
    os::fd::FromRawFd,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Condvar, Mutex,
    },
    time::{Duration, Instant},
};

/// The buffer goes to the writer thread once the next write would take it
/// past this (and at every flush); the size of every chunk of the queue.
const CHUNK: usize = 1 << 16;
/// Output held for a slow reader before lines are dropped: a few seconds
/// of a flood's JSON, and a bound on the memory a stalled reader costs.
pub const MAX_QUEUED_BYTES: u64 = 4 << 20;

/// Between the tracing thread and the writer thread. Lines are counted
/// only where some are lost (dropped, or still queued at the end), never
/// on the way through: that keeps the tracing thread's cost per line a
/// copy, as with a `BufWriter`.
#[derive(Default)]
struct Queue {
    /// Handed over, not yet taken by the writer, oldest first; each ends
    /// with a whole line.
    full: std::collections::VecDeque<Vec<u8>>,
    /// Written chunks (capacity [`CHUNK`], empty) for the next hand-overs.
    free: Vec<Vec<u8>>,
}

#[derive(Default)]
struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
    /// The writer waits on `wake`: only then is a notify worth a syscall.
    writer_idle: AtomicBool,
    /// What the writer is writing, and how far it got.
    in_flight: Mutex<(Option<Arc<Vec<u8>>>, usize)>,
    /// Bytes handed over and not yet written.
    queued_bytes: AtomicU64,
    /// Lines dropped because the queue was full or the reader went away.
    dropped_lines: AtomicU64,
    /// The reader went away (EPIPE) or stdout failed for good.
    closed: AtomicBool,
}

/// The sinks' end: a `Write` that never blocks.
pub struct QueuedOut {
    buf: Vec<u8>,
    shared: Arc<Shared>,
    max_queued: u64,
    /// Chunks the queue may hold: `max_queued` in whole chunks, so that
    /// small hand-overs (a flush per line) cannot multiply its memory.
    max_chunks: usize,
    warned_at: Option<Instant>,
}

/// The session's end: how much could not be written, and the final wait.
pub struct OutHandle {
    shared: Arc<Shared>,
}

fn lines_in(b: &[u8]) -> u64 {
    b.iter().filter(|c| **c == b'\n').count() as u64
}

/// A [`QueuedOut`] writing to stdout (fd 1) from its own thread.
pub fn stdout() -> (QueuedOut, OutHandle) {
    // SAFETY: fd 1 stays open for the life of the process; ManuallyDrop
    // keeps this File from closing it.
    let fd1 = std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(1) });
    // SAFETY: fstat on fd 1 into a zeroed struct we own.
    let pipe = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        libc::fstat(1, &mut st) == 0 && st.st_mode & libc::S_IFMT == libc::S_IFIFO
    };
    queued_pieces(
        Fd1(fd1),
        MAX_QUEUED_BYTES,
        if pipe { PIPE_BUF } else { usize::MAX },
    )
}

/// A pipe write of at most this many bytes is atomic: all or nothing.
const PIPE_BUF: usize = 4096;

/// fd 1 written directly: std's `Stdout` would add a lock and line buffering.
struct Fd1(std::mem::ManuallyDrop<std::fs::File>);

impl Write for Fd1 {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        (&*self.0 as &std::fs::File).write(b)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A [`QueuedOut`] over any blocking writer (tests use a stalled one).
pub fn queued<W: Write + Send + 'static>(out: W, max_queued: u64) -> (QueuedOut, OutHandle) {
    queued_pieces(out, max_queued, usize::MAX)
}

/// The end of the first piece of `b`: whole lines, at most `max` bytes
/// (a longer line goes alone).
fn piece_end(b: &[u8], max: usize) -> usize {
    if b.len() <= max {
        return b.len();
    }
    match b[..max].iter().rposition(|c| *c == b'\n') {
        Some(i) => i + 1,
        None => b[max..]
            .iter()
            .position(|c| *c == b'\n')
            .map(|i| max + i + 1)
            .unwrap_or(b.len()),
    }
}

/// `piece`: the most written at once, in whole lines. On a pipe, writes of
/// at most PIPE_BUF are atomic, so a reader that stalls (and a ctdrop that
/// ends meanwhile) leaves whole lines in the pipe, never half of one.
fn queued_pieces<W: Write + Send + 'static>(
    mut out: W,
    max_queued: u64,
    piece: usize,
) -> (QueuedOut, OutHandle) {
    let shared = Arc::new(Shared::default());
    let s = shared.clone();
    std::thread::Builder::new()
        .name("ctdrop-stdout".into())
        .spawn(move || loop {
            let data = {
                let mut q = s.queue.lock().unwrap();
                loop {
                    if let Some(c) = q.full.pop_front() {
                        break c;
                    }
                    s.writer_idle.store(true, Ordering::SeqCst);
                    q = s.wake.wait(q).unwrap();
                }
            };
            s.writer_idle.store(false, Ordering::SeqCst);
            let data = Arc::new(data);
            *s.in_flight.lock().unwrap() = (Some(data.clone()), 0);
            let mut pos = 0;
            while pos < data.len() && !s.closed.load(Ordering::Relaxed) {
                let end = pos + piece_end(&data[pos..], piece);
                match out.write(&data[pos..end]) {
                    Ok(0) => s.closed.store(true, Ordering::Relaxed),
                    Ok(n) => {
                        pos += n;
                        s.in_flight.lock().unwrap().1 = pos;
                        s.queued_bytes.fetch_sub(n as u64, Ordering::Relaxed);
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => s.closed.store(true, Ordering::Relaxed),
                }
            }
            *s.in_flight.lock().unwrap() = (None, 0);
            if pos < data.len() {
                s.dropped_lines
                    .fetch_add(lines_in(&data[pos..]), Ordering::Relaxed);
                s.queued_bytes
                    .fetch_sub((data.len() - pos) as u64, Ordering::Relaxed);
            }
            // Back to the free list; one that a line longer than a chunk
            // made grow is let go, so every pooled chunk stays CHUNK.
            if let Ok(mut v) = Arc::try_unwrap(data) {
                if v.capacity() <= CHUNK {
                    v.clear();
                    s.queue.lock().unwrap().free.push(v);
                }
            }
        })
        .expect("starting the stdout writer thread");
    let q = QueuedOut {
        buf: Vec::with_capacity(CHUNK),
        shared: shared.clone(),
        max_queued,
        max_chunks: (max_queued as usize / CHUNK).max(1),
        warned_at: None,
    };
    (q, OutHandle { shared })
}

impl QueuedOut {
    /// Queues `buf[..cut]` for the writer (or drops and counts its lines
    /// when the queue is full); what follows `cut` stays in `buf`.
    fn hand_over(&mut self, cut: usize) {
        if cut == 0 {
            return;
        }
        let s = &self.shared;
        let closed = s.closed.load(Ordering::Relaxed);
        let mut queued = false;
        if !closed && s.queued_bytes.load(Ordering::Relaxed) + cut as u64 <= self.max_queued {
            let mut q = s.queue.lock().unwrap();
            // Counted before the writer can see it, so its subtraction
            // never comes first.
            let count = || s.queued_bytes.fetch_add(cut as u64, Ordering::Relaxed);
            let chunks = q.full.len();
            match q.full.back_mut() {
                Some(last) if last.len() + cut <= CHUNK => {
                    count();
                    last.extend_from_slice(&self.buf[..cut]);
                    self.buf.drain(..cut);
                    queued = true;
                }
                _ if chunks < self.max_chunks => {
                    count();
                    let mut next = q.free.pop().unwrap_or_else(|| Vec::with_capacity(CHUNK));
                    next.extend_from_slice(&self.buf[cut..]);
                    let mut full = std::mem::replace(&mut self.buf, next);
                    full.truncate(cut);
                    q.full.push_back(full);
                    queued = true;
                }
                _ => {}
            }
        }
        if queued {
            if s.writer_idle.load(Ordering::SeqCst) {
                s.wake.notify_one();
            }
            return;
        }
        let n = lines_in(&self.buf[..cut]);
        let total = s.dropped_lines.fetch_add(n, Ordering::Relaxed) + n;
        self.buf.drain(..cut);
        if !closed
            && self
                .warned_at
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
        {
            self.warned_at = Some(Instant::now());
            eprintln!("ctdrop: warning: stdout is not being read: {total} lines not written so far (tracing and counting go on)");
        }
    }
}

impl Write for QueuedOut {
    #[inline]
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.buf.len() + data.len() > CHUNK {
            // Whole lines go; a line being written (a JSON value written
            // piece by piece) moves on to the next chunk.
            let cut = self
                .buf
                .iter()
                .rposition(|c| *c == b'\n')
                .map_or(self.buf.len(), |i| i + 1);
            self.hand_over(cut);
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    #[inline]
    fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        self.write(data).map(|_| ())
    }

    /// Hands what is buffered to the writer thread; never waits for it.
    /// Fails with `BrokenPipe` once the reader has gone away.
    fn flush(&mut self) -> io::Result<()> {
        self.hand_over(self.buf.len());
        if self.shared.closed.load(Ordering::Relaxed) {
            return Err(io::Error::from(io::ErrorKind::BrokenPipe));
        }
        Ok(())
    }
}

impl OutHandle {
    /// Waits up to `grace` for the writer to catch up, then returns the
    /// lines that were not written: dropped ones plus those still queued.
    /// Call after the sinks' last flush.
    pub fn finish(&self, grace: Duration) -> u64 {
        let s = &self.shared;
        let until = Instant::now() + grace;
        while s.queued_bytes.load(Ordering::Relaxed) > 0
            && !s.closed.load(Ordering::Relaxed)
            && Instant::now() < until
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        let queued: u64 = s
            .queue
            .lock()
            .unwrap()
            .full
            .iter()
            .map(|c| lines_in(c))
            .sum();
        let in_flight = match &*s.in_flight.lock().unwrap() {
            (Some(d), pos) => lines_in(&d[*pos..]),
            (None, _) => 0,
        };
        s.dropped_lines.load(Ordering::Relaxed) + queued + in_flight
    }

    /// [`OutHandle::finish`], then one line on stderr when lines were lost
    /// (not for a reader that went away: that is said elsewhere).
    pub fn finish_and_report(&self, grace: Duration) {
        let n = self.finish(grace);
        if n > 0 && !self.shared.closed.load(Ordering::Relaxed) {
            eprintln!(
                "ctdrop: {n} lines of output not written: stdout was not being read fast enough"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Condvar, Mutex};

    /// A reader that takes nothing until released, like a paused pipe.
    struct Stalled {
        gate: Arc<(Mutex<bool>, Condvar)>,
        got: Arc<Mutex<Vec<u8>>>,
    }

    impl Write for Stalled {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            let (m, c) = &*self.gate;
            let mut open = m.lock().unwrap();
            while !*open {
                open = c.wait(open).unwrap();
            }
            self.got.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stalled_reader_never_blocks_the_writer_and_every_line_is_written_or_counted() {
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let got = Arc::new(Mutex::new(Vec::new()));
        let (mut q, h) = queued(
            Stalled {
                gate: gate.clone(),
                got: got.clone(),
            },
            256 << 10,
        );
        let line = [b'x'; 99];
        let started = Instant::now();
        for _ in 0..100_000 {
            q.write_all(&line).unwrap();
            q.write_all(b"\n").unwrap();
        }
        q.flush().unwrap();
        // 10 MB into a reader that takes nothing: this returned, so the
        // caller was never blocked (a bound, not a timing).
        assert!(started.elapsed() < Duration::from_secs(30));
        let stuck = h.finish(Duration::from_millis(10));
        assert!(
            stuck > 90_000,
            "most lines cannot have gone anywhere: {stuck}"
        );
        // Release the reader: what was queued gets written, the rest counted.
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
        let unwritten = h.finish(Duration::from_secs(30));
        let written = lines_in(&got.lock().unwrap());
        assert_eq!(written + unwritten, 100_000);
        assert!(
            written > 0 && written <= (256 << 10) / 100 + 1,
            "only what fit in the queue: {written}"
        );
    }

    #[test]
    fn a_stalled_reader_costs_at_most_the_bound_in_fixed_chunks_however_small_the_flushes() {
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let got = Arc::new(Mutex::new(Vec::new()));
        let max = 8 * CHUNK as u64;
        let (mut q, h) = queued(
            Stalled {
                gate: gate.clone(),
                got: got.clone(),
            },
            max,
        );
        // Lines of ~20 bytes written piece by piece (as serde_json does);
        // first flushed every 1700 lines (hand-overs just over half a chunk:
        // two never share one), then every 7.
        for i in 0..200_000u32 {
            write!(q, "{{\"n\":{i},").unwrap();
            q.write_all(&b"yyyyyyyy"[..(i % 8) as usize]).unwrap();
            q.write_all(b"}\n").unwrap();
            if i % if i < 100_000 { 1700 } else { 7 } == 0 {
                q.flush().unwrap();
            }
        }
        q.flush().unwrap();
        {
            let queue = h.shared.queue.lock().unwrap();
            let in_flight = h.shared.in_flight.lock().unwrap().0.is_some() as usize;
            let chunks = queue.full.len() + queue.free.len() + in_flight + 1;
            assert!(
                chunks <= q.max_chunks + 2,
                "{chunks} chunks for a bound of {}",
                q.max_chunks
            );
            assert!(queue.full.iter().all(|c| c.capacity() == CHUNK));
        }
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
        let unwritten = h.finish(Duration::from_secs(30));
        let got = got.lock().unwrap();
        assert_eq!(lines_in(&got) + unwritten, 200_000);
        // What was written is whole lines, in order.
        let mut last = None;
        for l in got.split(|c| *c == b'\n').filter(|l| !l.is_empty()) {
            let l = std::str::from_utf8(l).unwrap();
            assert!(l.starts_with("{\"n\":") && l.ends_with('}'), "{l:?}");
            let n: u32 = l[5..].split(',').next().unwrap().parse().unwrap();
            assert!(last.is_none_or(|p| n > p), "{n} after {last:?}");
            last = Some(n);
        }
    }

    #[test]
    fn chunks_handed_over_when_full_end_with_a_whole_line() {
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let (mut q, h) = queued(
            Stalled {
                gate: gate.clone(),
                got: Default::default(),
            },
            MAX_QUEUED_BYTES,
        );
        // No flush: every hand-over is a full chunk, cut by `write`.
        for i in 0..30_000u32 {
            write!(q, "{{\"n\":{i},").unwrap();
            q.write_all(b"\"x\":1}\n").unwrap();
        }
        let queue = h.shared.queue.lock().unwrap();
        assert!(queue.full.len() > 2);
        for c in &queue.full {
            assert_eq!(c.last(), Some(&b'\n'), "a chunk ends mid-line");
        }
        drop(queue);
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
    }

    #[test]
    fn pieces_are_whole_lines_within_the_atomic_size() {
        let b = b"aaaa\nbbbb\ncccccccccc\nd";
        assert_eq!(piece_end(b, 100), b.len());
        assert_eq!(piece_end(b, 8), 5);
        assert_eq!(piece_end(b, 12), 10);
        assert_eq!(piece_end(&b[10..], 4), 11, "a longer line goes alone");
        assert_eq!(piece_end(b"xxxxxxxx", 4), 8);
    }

    #[test]
    fn a_reader_that_keeps_up_gets_everything() {
        let got = Arc::new(Mutex::new(Vec::new()));
        let gate = Arc::new((Mutex::new(true), Condvar::new()));
        let (mut q, h) = queued(
            Stalled {
                gate,
                got: got.clone(),
            },
            MAX_QUEUED_BYTES,
        );
        for i in 0..50_000 {
            writeln!(q, "line {i}").unwrap();
            if i % 100 == 0 {
                q.flush().unwrap();
            }
        }
        q.flush().unwrap();
        assert_eq!(h.finish(Duration::from_secs(30)), 0);
        assert_eq!(lines_in(&got.lock().unwrap()), 50_000);
    }

    struct Gone;
    impl Write for Gone {
        fn write(&mut self, _b: &[u8]) -> io::Result<usize> {
            Err(io::Error::from(io::ErrorKind::BrokenPipe))
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_reader_that_went_away_shows_as_broken_pipe() {
        let (mut q, h) = queued(Gone, MAX_QUEUED_BYTES);
        writeln!(q, "one").unwrap();
        q.flush().unwrap_or(());
        h.finish(Duration::from_secs(10));
        writeln!(q, "two").unwrap();
        assert_eq!(q.flush().unwrap_err().kind(), io::ErrorKind::BrokenPipe);
    }
}
