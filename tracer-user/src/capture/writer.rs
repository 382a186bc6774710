//! Writing a capture file: records gather in one buffer and go out as one
//! checksummed block when the buffer is large or old enough. After a failed
//! write (full disk) the file is cut back to its last whole block and
//! nothing more is written, so what was flushed stays readable.

use std::{
    collections::HashMap,
    fs::{File, OpenOptions},
    io,
    os::unix::fs::{FileExt, OpenOptionsExt},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use super::{
    block::{self, kind, BLOCK_HEADER_LEN},
    meta::{Header, Trailer},
    record::{self, Checkpoint, DropStrings},
};
use crate::{cause::Cause, events::DropEvent};

/// A block this large is written at once, whatever its age: big enough
/// that a write costs little per record, small enough to lose little.
pub const BLOCK_TARGET: usize = 256 << 10;

pub struct CaptureWriter {
    file: File,
    path: PathBuf,
    /// `BLOCK_HEADER_LEN` reserved bytes, then the records of the next block.
    buf: Vec<u8>,
    strings: HashMap<String, u32>,
    prev_ts: u64,
    /// File length up to the end of the last complete block.
    good_len: u64,
    last_write: Instant,
    pub drops: u64,
    pub probes: u64,
    /// Drops written out in complete blocks, and the newest one's time.
    pub drops_flushed: u64,
    pub last_flushed_ts: Option<u64>,
    pending_last_ts: Option<u64>,
    pending_drops: u64,
    failed: Option<(io::ErrorKind, String)>,
}

impl CaptureWriter {
    /// Creates `path` with mode 0600 (captures show hosts and flows).
    /// An existing file is an error unless `force`; then it is replaced,
    /// never rewritten in place (it might be someone else's link).
    pub fn create(path: &Path, force: bool) -> Result<CaptureWriter> {
        let mut opts = OpenOptions::new();
        opts.write(true).create_new(true).mode(0o600);
        let file = match opts.open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                if path.is_dir() {
                    bail!(
                        "{} is a directory: give a file name for the capture",
                        path.display()
                    );
                }
                if !force {
                    bail!(
                        "{} already exists: choose another name, or add --force to replace it",
                        path.display()
                    );
                }
                std::fs::remove_file(path)
                    .with_context(|| format!("removing the old {}", path.display()))?;
                opts.open(path)
                    .with_context(|| format!("creating {}", path.display()))?
            }
            Err(e) => return Err(e).with_context(|| format!("creating {}", path.display())),
        };
        Ok(CaptureWriter::on(file, path))
    }

    /// A writer on an already open, empty file.
    pub fn on(file: File, path: &Path) -> CaptureWriter {
        CaptureWriter {
            file,
            path: path.to_path_buf(),
            buf: vec![0; BLOCK_HEADER_LEN],
            strings: HashMap::new(),
            prev_ts: 0,
            good_len: 0,
            last_write: Instant::now(),
            drops: 0,
            probes: 0,
            drops_flushed: 0,
            last_flushed_ts: None,
            pending_last_ts: None,
            pending_drops: 0,
            failed: None,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn bytes_written(&self) -> u64 {
        self.good_len
    }

    pub fn failed(&self) -> Option<io::Error> {
        self.failed
            .as_ref()
            .map(|(k, m)| io::Error::new(*k, m.clone()))
    }

    pub fn write_header(&mut self, h: &Header) -> io::Result<()> {
        let json = serde_json::to_vec(h).map_err(io::Error::other)?;
        let mut out = block::preamble().to_vec();
        out.extend_from_slice(&block::framed(kind::HEADER, &json));
        self.write(&out)
    }

    fn intern(&mut self, s: &str) -> u32 {
        if let Some(id) = self.strings.get(s) {
            return *id;
        }
        let id = self.strings.len() as u32;
        record::put_string(&mut self.buf, id, s);
        self.strings.insert(s.to_string(), id);
        id
    }

    pub fn drop_event(
        &mut self,
        ev: &DropEvent,
        cause: Cause,
        location: &str,
        netns_name: Option<&str>,
        ifname: Option<&str>,
    ) -> io::Result<()> {
        if let Some(e) = self.failed() {
            return Err(e);
        }
        let ids = DropStrings {
            cause: self.intern(cause.as_str()),
            location: self.intern(location),
            netns_name: netns_name.map(|n| self.intern(n)),
            ifname: ifname.map(|n| self.intern(n)),
        };
        record::put_drop(&mut self.buf, self.prev_ts, ev, &ids);
        self.prev_ts = ev.ts_ns;
        self.drops += 1;
        self.pending_drops += 1;
        self.pending_last_ts = Some(ev.ts_ns);
        self.flush_if_full()
    }

    pub fn probe(&mut self, p: &crate::model::ProbeVerdict) -> io::Result<()> {
        if let Some(e) = self.failed() {
            return Err(e);
        }
        let bytes = serde_json::to_vec(p).map_err(io::Error::other)?;
        record::put_probe(&mut self.buf, &bytes);
        self.probes += 1;
        self.flush_if_full()
    }

    pub fn checkpoint(&mut self, c: &Checkpoint) -> io::Result<()> {
        if let Some(e) = self.failed() {
            return Err(e);
        }
        record::put_checkpoint(&mut self.buf, c);
        self.flush_if_full()
    }

    fn flush_if_full(&mut self) -> io::Result<()> {
        if self.buf.len() >= BLOCK_TARGET {
            self.flush()
        } else {
            Ok(())
        }
    }

    /// Writes the pending records when the oldest may be `max_age` old.
    pub fn flush_if_older(&mut self, max_age: Duration) -> io::Result<()> {
        if self.last_write.elapsed() >= max_age {
            self.flush()
        } else {
            Ok(())
        }
    }

    /// Writes the pending records as one block now.
    pub fn flush(&mut self) -> io::Result<()> {
        if let Some(e) = self.failed() {
            return Err(e);
        }
        self.last_write = Instant::now();
        if self.buf.len() == BLOCK_HEADER_LEN {
            return Ok(());
        }
        block::seal(kind::RECORDS, &mut self.buf);
        let buf = std::mem::take(&mut self.buf);
        let r = self.write(&buf);
        self.buf = buf;
        self.buf.truncate(BLOCK_HEADER_LEN);
        // Timestamps restart with each block: a block decodes on its own.
        self.prev_ts = 0;
        if r.is_ok() {
            self.drops_flushed += self.pending_drops;
            self.last_flushed_ts = self.pending_last_ts.or(self.last_flushed_ts);
        }
        self.pending_drops = 0;
        r
    }

    /// A table snapshot as its own block, after the records so far (the
    /// records pending are flushed first, keeping the file in time order).
    pub fn occupancy(&mut self, o: &crate::conntrack::occupancy::Occupancy) -> io::Result<()> {
        self.flush()?;
        let json = serde_json::to_vec(o).map_err(io::Error::other)?;
        self.write(&block::framed(kind::OCCUPANCY, &json))
    }

    /// Flushes, writes the trailer and syncs: the capture is complete.
    pub fn finish(&mut self, t: &Trailer) -> io::Result<()> {
        self.flush()?;
        let json = serde_json::to_vec(t).map_err(io::Error::other)?;
        self.write(&block::framed(kind::TRAILER, &json))?;
        self.file.sync_data()
    }

    /// One positioned write; on failure the file is cut back to its last
    /// whole block and the writer refuses everything after.
    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self.file.write_all_at(bytes, self.good_len) {
            Ok(()) => {
                self.good_len += bytes.len() as u64;
                Ok(())
            }
            Err(e) => {
                let _ = self.file.set_len(self.good_len);
                let msg = format!(
                    "writing {}: {e}; the file keeps {} bytes, readable up to its last flush ({} drops)",
                    self.path.display(),
                    self.good_len,
                    self.drops_flushed
                );
                self.failed = Some((e.kind(), msg));
                Err(self.failed().unwrap())
            }
        }
    }
}
