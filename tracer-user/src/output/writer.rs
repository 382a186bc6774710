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

use std::{
    io::{self, Write},
    os::fd::FromRawFd,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc, Arc,
    },
    time::{Duration, Instant},
};

/// A chunk goes to the writer thread once the buffer holds this much.
const CHUNK: usize = 1 << 16;
/// Output held for a slow reader before lines are dropped: a few seconds
/// of a flood's JSON, and a bound on the memory a stalled reader costs.
pub const MAX_QUEUED_BYTES: u64 = 4 << 20;
/// Spare chunk buffers kept for reuse.
const SPARE_CHUNKS: usize = 4;

#[derive(Default)]
struct Shared {
    /// Bytes handed to the writer thread and not yet written.
    queued_bytes: AtomicU64,
    /// Whole lines handed to the writer thread and not yet written.
    queued_lines: AtomicU64,
    /// Lines dropped because the queue was full.
    dropped_lines: AtomicU64,
    /// The reader went away (EPIPE) or stdout failed for good.
    closed: AtomicBool,
}

/// The sinks' end: a `Write` that never blocks.
pub struct QueuedOut {
    buf: Vec<u8>,
    tx: mpsc::Sender<Vec<u8>>,
    spare: mpsc::Receiver<Vec<u8>>,
    shared: Arc<Shared>,
    max_queued: u64,
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
    queued(Fd1(fd1), MAX_QUEUED_BYTES)
}

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
pub fn queued<W: Write + Send + 'static>(mut out: W, max_queued: u64) -> (QueuedOut, OutHandle) {
    let shared = Arc::new(Shared::default());
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    let (spare_tx, spare) = mpsc::sync_channel::<Vec<u8>>(SPARE_CHUNKS);
    let s = shared.clone();
    std::thread::Builder::new()
        .name("ctdrop-stdout".into())
        .spawn(move || {
            for mut chunk in rx {
                let mut pos = 0;
                while pos < chunk.len() && !s.closed.load(Ordering::Relaxed) {
                    match out.write(&chunk[pos..]) {
                        Ok(0) => s.closed.store(true, Ordering::Relaxed),
                        Ok(n) => {
                            s.queued_lines.fetch_sub(lines_in(&chunk[pos..pos + n]), Ordering::Relaxed);
                            pos += n;
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(_) => s.closed.store(true, Ordering::Relaxed),
                    }
                }
                if pos < chunk.len() {
                    s.queued_lines.fetch_sub(lines_in(&chunk[pos..]), Ordering::Relaxed);
                    s.dropped_lines.fetch_add(lines_in(&chunk[pos..]), Ordering::Relaxed);
                }
                s.queued_bytes.fetch_sub(chunk.len() as u64, Ordering::Relaxed);
                chunk.clear();
                let _ = spare_tx.try_send(chunk);
            }
            let _ = out.flush();
        })
        .expect("starting the stdout writer thread");
    let q = QueuedOut { buf: Vec::with_capacity(CHUNK), tx, spare, shared: shared.clone(), max_queued, warned_at: None };
    (q, OutHandle { shared })
}

impl QueuedOut {
    fn hand_over(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        let len = self.buf.len() as u64;
        let s = &self.shared;
        if s.closed.load(Ordering::Relaxed) || s.queued_bytes.load(Ordering::Relaxed) + len > self.max_queued {
            let n = lines_in(&self.buf);
            let total = s.dropped_lines.fetch_add(n, Ordering::Relaxed) + n;
            self.buf.clear();
            if !s.closed.load(Ordering::Relaxed) && self.warned_at.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                self.warned_at = Some(Instant::now());
                eprintln!("ctdrop: warning: stdout is not being read: {total} lines not written so far (tracing and counting go on)");
            }
            return;
        }
        s.queued_bytes.fetch_add(len, Ordering::Relaxed);
        s.queued_lines.fetch_add(lines_in(&self.buf), Ordering::Relaxed);
        let next = self.spare.try_recv().unwrap_or_else(|_| Vec::with_capacity(CHUNK));
        let chunk = std::mem::replace(&mut self.buf, next);
        if let Err(mpsc::SendError(c)) = self.tx.send(chunk) {
            // The writer thread is gone: nothing can be written any more.
            s.closed.store(true, Ordering::Relaxed);
            s.dropped_lines.fetch_add(lines_in(&c), Ordering::Relaxed);
        }
    }
}

impl Write for QueuedOut {
    #[inline]
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.hand_over();
        }
        Ok(data.len())
    }

    #[inline]
    fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        self.write(data).map(|_| ())
    }

    /// Hands what is buffered to the writer thread; never waits for it.
    /// Fails with `BrokenPipe` once the reader has gone away.
    fn flush(&mut self) -> io::Result<()> {
        self.hand_over();
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
        let until = Instant::now() + grace;
        while self.shared.queued_bytes.load(Ordering::Relaxed) > 0 && !self.shared.closed.load(Ordering::Relaxed) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
        self.shared.dropped_lines.load(Ordering::Relaxed) + self.shared.queued_lines.load(Ordering::Relaxed)
    }

    /// [`OutHandle::finish`], then one line on stderr when lines were lost
    /// (not for a reader that went away: that is said elsewhere).
    pub fn finish_and_report(&self, grace: Duration) {
        let n = self.finish(grace);
        if n > 0 && !self.shared.closed.load(Ordering::Relaxed) {
            eprintln!("ctdrop: {n} lines of output not written: stdout was not being read fast enough");
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
        let (mut q, h) = queued(Stalled { gate: gate.clone(), got: got.clone() }, 256 << 10);
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
        assert!(stuck > 90_000, "most lines cannot have gone anywhere: {stuck}");
        // Release the reader: what was queued gets written, the rest counted.
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
        let unwritten = h.finish(Duration::from_secs(30));
        let written = lines_in(&got.lock().unwrap());
        assert_eq!(written + unwritten, 100_000);
        assert!(written > 0 && written <= (256 << 10) / 100 + 1, "only what fit in the queue: {written}");
    }

    #[test]
    fn a_reader_that_keeps_up_gets_everything() {
        let got = Arc::new(Mutex::new(Vec::new()));
        let gate = Arc::new((Mutex::new(true), Condvar::new()));
        let (mut q, h) = queued(Stalled { gate, got: got.clone() }, MAX_QUEUED_BYTES);
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
