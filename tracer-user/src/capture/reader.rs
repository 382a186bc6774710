//! Reading a capture file as a stream of records. Damage or a cut past the
//! header ends the stream where the good part ends, and [`End`] tells
//! where and why; only a file whose header cannot be read is an error.

use std::{
    collections::VecDeque,
    fs::File,
    io::{BufReader, Read},
    path::Path,
};

use anyhow::{anyhow, bail, Context, Result};

use super::{
    block::{kind, read_block, BlockError, BLOCK_HEADER_LEN, FORMAT_VERSION, MAGIC, PREAMBLE_LEN},
    codec::Cursor,
    meta::{Header, Trailer},
    record::{self, CapturedDrop, Checkpoint},
};
use crate::{cause::Cause, model::ProbeVerdict};

pub enum Item {
    Drop(CapturedDrop),
    /// A probe verdict, as `live --json` prints it.
    Probe(ProbeVerdict),
    Checkpoint(Checkpoint),
}

/// How the stream of records ended.
#[derive(Clone, Debug, PartialEq)]
pub enum End {
    /// The trailer was read: the capture finished normally.
    Complete(Trailer),
    /// Every block is whole but there is no trailer: the capture was killed
    /// (or is still running); everything up to its last flush is there.
    NoTrailer { at: u64 },
    /// Reading stopped at byte `at`: the blocks before it are whole.
    Stopped { at: u64, why: String },
}

impl End {
    pub fn trailer(&self) -> Option<&Trailer> {
        match self {
            End::Complete(t) => Some(t),
            _ => None,
        }
    }

    /// One sentence for a report; None for a complete capture.
    pub fn describe(&self) -> Option<String> {
        match self {
            End::Complete(_) => None,
            End::NoTrailer { at } => Some(format!(
                "trailer missing: the capture did not finish (killed, disk full, or still running); read {at} bytes, up to its last flush"
            )),
            End::Stopped { at, why } => Some(format!("trailer missing: reading stopped at byte {at}: {why}; everything before it was read")),
        }
    }
}

pub struct CaptureReader<R: Read> {
    r: R,
    pub header: Header,
    /// The file's capture format version (from its preamble).
    pub format: u32,
    /// Offset of the next block.
    offset: u64,
    strings: Vec<String>,
    causes: Vec<Option<Cause>>,
    pending: VecDeque<Item>,
    end: Option<End>,
    /// Set when the current block failed mid-way: ends after its good records.
    end_after_pending: Option<End>,
    /// Table snapshots stored in the file, in file order (filled as the
    /// blocks holding them are read).
    pub occupancy: Vec<crate::conntrack::occupancy::Occupancy>,
}

impl CaptureReader<BufReader<File>> {
    pub fn open(path: &Path) -> Result<Self> {
        let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        if f.metadata().map(|m| m.is_dir()).unwrap_or(false) {
            bail!("{} is a directory, not a capture file", path.display());
        }
        CaptureReader::new(BufReader::with_capacity(1 << 20, f))
            .with_context(|| format!("reading {}", path.display()))
    }
}

impl<R: Read> CaptureReader<R> {
    pub fn new(mut r: R) -> Result<Self> {
        let mut pre = [0u8; PREAMBLE_LEN];
        let n = read_up_to(&mut r, &mut pre)?;
        if n < MAGIC.len() || pre[..MAGIC.len()] != MAGIC {
            if n < MAGIC.len() && pre[..n] == MAGIC[..n] {
                bail!("cut short at byte {n}, inside the file's preamble: nothing to read");
            }
            bail!("not a ctdrop capture file (no ctdrop capture signature at its start)");
        }
        if n < PREAMBLE_LEN {
            bail!("cut short at byte {n}, inside the file's preamble: nothing to read");
        }
        let version = u32::from_le_bytes(pre[8..12].try_into().unwrap());
        let header = match read_block(&mut r) {
            Ok(Some((kind::HEADER, payload))) => Some(payload),
            Ok(Some(_)) => bail!("damaged: the first block is not the capture header"),
            Ok(None) => bail!(
                "cut short at byte {PREAMBLE_LEN}, before the capture header: nothing to read"
            ),
            Err(e) if version == FORMAT_VERSION || version == 0 => {
                bail!("the capture header at byte {PREAMBLE_LEN} is unreadable ({e}): nothing to read")
            }
            Err(_) => None,
        };
        if version > FORMAT_VERSION {
            let by = header
                .as_deref()
                .and_then(|h| serde_json::from_slice::<serde_json::Value>(h).ok())
                .and_then(|v| {
                    v.get("ctdrop_version")
                        .and_then(|s| s.as_str())
                        .map(|s| format!("ctdrop {s}"))
                })
                .unwrap_or_else(|| "a newer ctdrop".into());
            bail!(
                "written in capture format version {version} by {by}; this ctdrop ({}) reads format version {FORMAT_VERSION} and older: read it with a newer ctdrop",
                env!("CARGO_PKG_VERSION")
            );
        }
        if version == 0 {
            bail!("damaged: capture format version 0 does not exist");
        }
        let payload = header.unwrap_or_default();
        let header: Header = serde_json::from_slice(&payload)
            .map_err(|e| anyhow!("the capture header is not valid: {e}"))?;
        Ok(CaptureReader {
            r,
            header,
            format: version,
            offset: (PREAMBLE_LEN + BLOCK_HEADER_LEN + payload.len()) as u64,
            strings: Vec::new(),
            causes: Vec::new(),
            pending: VecDeque::new(),
            end: None,
            end_after_pending: None,
            occupancy: Vec::new(),
        })
    }

    /// How the records ended; None until [`Self::next_item`] returned None.
    pub fn end(&self) -> Option<&End> {
        self.end.as_ref()
    }

    pub fn string(&self, id: u32) -> &str {
        self.strings
            .get(id as usize)
            .map(String::as_str)
            .unwrap_or("?")
    }

    pub fn next_item(&mut self) -> Option<Item> {
        loop {
            if let Some(it) = self.pending.pop_front() {
                return Some(it);
            }
            if let Some(e) = self.end_after_pending.take() {
                self.end = Some(e);
            }
            if self.end.is_some() {
                return None;
            }
            self.read_next_block();
        }
    }

    fn read_next_block(&mut self) {
        let at = self.offset;
        match read_block(&mut self.r) {
            Ok(None) => self.end = Some(End::NoTrailer { at }),
            Ok(Some((kind::TRAILER, payload))) => {
                self.end = Some(match serde_json::from_slice::<Trailer>(&payload) {
                    Ok(t) => End::Complete(t),
                    Err(e) => End::Stopped {
                        at,
                        why: format!("the trailer is not valid ({e})"),
                    },
                });
            }
            Ok(Some((kind::RECORDS, payload))) => {
                self.offset += (BLOCK_HEADER_LEN + payload.len()) as u64;
                self.decode_records(at, &payload);
            }
            Ok(Some((kind::OCCUPANCY, payload))) => {
                self.offset += (BLOCK_HEADER_LEN + payload.len()) as u64;
                match crate::conntrack::occupancy::Occupancy::from_stored(&payload) {
                    Ok(o) => self.occupancy.push(o),
                    Err(e) => {
                        self.end = Some(End::Stopped {
                            at,
                            why: format!("the table snapshot is not valid ({e})"),
                        })
                    }
                }
            }
            Ok(Some((k, _))) => {
                self.end = Some(End::Stopped {
                    at,
                    why: format!("unexpected block kind {k:#04x}"),
                })
            }
            Err(e @ BlockError::Cut { .. }) => {
                self.end = Some(End::Stopped {
                    at,
                    why: format!(
                        "{e}: the capture was cut short (killed mid-write or the disk filled)"
                    ),
                })
            }
            Err(e) => {
                self.end = Some(End::Stopped {
                    at,
                    why: e.to_string(),
                })
            }
        }
    }

    fn decode_records(&mut self, block_at: u64, payload: &[u8]) {
        let mut c = Cursor::new(payload);
        let mut prev_ts = 0u64;
        while !c.is_empty() {
            let rec_at = c.pos();
            let res = (|| -> Result<Option<Item>, super::codec::CodecError> {
                match c.u8("record kind")? {
                    record::DROP => {
                        let causes = &self.causes;
                        let d = record::get_drop(&mut c, prev_ts, self.format, |id| {
                            causes.get(id as usize).copied().flatten()
                        })?;
                        prev_ts = d.ev.ts_ns;
                        Ok(Some(Item::Drop(d)))
                    }
                    record::STRING => {
                        let (id, s) = record::get_string(&mut c)?;
                        if id as usize != self.strings.len() {
                            return Err(super::codec::CodecError("string ids out of order"));
                        }
                        self.causes.push(Cause::parse(&s));
                        self.strings.push(s);
                        Ok(None)
                    }
                    record::PROBE => Ok(Some(Item::Probe(record::get_probe(&mut c)?))),
                    record::CHECKPOINT => {
                        Ok(Some(Item::Checkpoint(record::get_checkpoint(&mut c)?)))
                    }
                    _ => Err(super::codec::CodecError("unknown record kind")),
                }
            })();
            match res {
                Ok(Some(it)) => self.pending.push_back(it),
                Ok(None) => {}
                Err(e) => {
                    let at = block_at + (BLOCK_HEADER_LEN + rec_at) as u64;
                    self.end_after_pending = Some(End::Stopped {
                        at,
                        why: format!("bad record: {e}"),
                    });
                    return;
                }
            }
        }
    }
}

fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("reading the preamble"),
        }
    }
    Ok(n)
}
