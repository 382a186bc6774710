//! Framing: the preamble, then checksummed blocks.
//!
//! ```text
//! preamble  8 bytes magic "\x89CTDROP\n", u32 LE format version
//! block     u8 kind, 3 zero bytes, u32 LE payload length,
//!           u32 LE CRC-32 of (kind, zeros, length, payload), payload
//! ```
//! A block is written with one `write` call, so a capture killed mid-run
//! ends at a block boundary or inside the last block; the length and the
//! checksum tell the reader where the good part ends.

use std::io::Read;

pub const MAGIC: [u8; 8] = *b"\x89CTDROP\n";
/// 2 added the occupancy block; 3 dropped the drop record's `detail` byte
/// (never set by the kernel) and reads probe records as typed verdicts
/// ([`crate::model::ProbeVerdict`]). Files of versions 1 and 2 read as before.
pub const FORMAT_VERSION: u32 = 3;
pub const PREAMBLE_LEN: usize = 12;
pub const BLOCK_HEADER_LEN: usize = 12;
/// Far above what the writer produces; a damaged length past it is not
/// believed (and not allocated).
pub const MAX_BLOCK: u32 = 64 << 20;

pub mod kind {
    /// JSON: what, where and how this capture was taken.
    pub const HEADER: u8 = b'H';
    /// Records (drops, strings, probe verdicts, checkpoints).
    pub const RECORDS: u8 = b'R';
    /// JSON: how the capture ended. Its absence means it did not end well.
    pub const TRAILER: u8 = b'T';
    /// JSON: a conntrack table snapshot (who held the table), version 2 on.
    pub const OCCUPANCY: u8 = b'O';
}

pub fn preamble() -> [u8; PREAMBLE_LEN] {
    let mut p = [0u8; PREAMBLE_LEN];
    p[..8].copy_from_slice(&MAGIC);
    p[8..].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    p
}

fn checksum(head: &[u8], payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&head[..8]);
    h.update(payload);
    h.finalize()
}

/// Fills the first [`BLOCK_HEADER_LEN`] bytes of `buf`, reserved by the
/// caller, so header and payload go out in a single write.
pub fn seal(kind: u8, buf: &mut [u8]) {
    let len = (buf.len() - BLOCK_HEADER_LEN) as u32;
    let (head, payload) = buf.split_at_mut(BLOCK_HEADER_LEN);
    head[0] = kind;
    head[1..4].fill(0);
    head[4..8].copy_from_slice(&len.to_le_bytes());
    let crc = checksum(head, payload);
    head[8..12].copy_from_slice(&crc.to_le_bytes());
}

pub fn framed(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut buf = vec![0u8; BLOCK_HEADER_LEN];
    buf.extend_from_slice(payload);
    seal(kind, &mut buf);
    buf
}

/// Why reading stopped before a clean end of file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlockError {
    /// The file ends inside a block (header or payload).
    Cut {
        need: u64,
        have: u64,
    },
    Checksum,
    UnknownKind(u8),
    TooLarge(u32),
    Io(String),
}

impl std::fmt::Display for BlockError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BlockError::Cut { need, have } => write!(
                f,
                "the file ends inside a block ({need} bytes needed, {have} there)"
            ),
            BlockError::Checksum => {
                f.write_str("block checksum mismatch (damaged or partly written)")
            }
            BlockError::UnknownKind(k) => write!(f, "unknown block kind {k:#04x}"),
            BlockError::TooLarge(n) => write!(
                f,
                "block claims {n} bytes, more than the {MAX_BLOCK}-byte limit"
            ),
            BlockError::Io(e) => write!(f, "read error: {e}"),
        }
    }
}

/// Reads as much as there is, up to `buf.len()`; returns the count.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> Result<usize, BlockError> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(BlockError::Io(e.to_string())),
        }
    }
    Ok(n)
}

/// The next block, `Ok(None)` at a clean end of file.
pub fn read_block(r: &mut impl Read) -> Result<Option<(u8, Vec<u8>)>, BlockError> {
    let mut head = [0u8; BLOCK_HEADER_LEN];
    let n = read_full(r, &mut head)?;
    if n == 0 {
        return Ok(None);
    }
    if n < BLOCK_HEADER_LEN {
        return Err(BlockError::Cut {
            need: BLOCK_HEADER_LEN as u64,
            have: n as u64,
        });
    }
    let kind = head[0];
    if ![kind::HEADER, kind::RECORDS, kind::TRAILER, kind::OCCUPANCY].contains(&kind)
        || head[1..4] != [0, 0, 0]
    {
        return Err(BlockError::UnknownKind(kind));
    }
    let len = u32::from_le_bytes(head[4..8].try_into().unwrap());
    if len > MAX_BLOCK {
        return Err(BlockError::TooLarge(len));
    }
    let mut payload = vec![0u8; len as usize];
    let got = read_full(r, &mut payload)?;
    if got < payload.len() {
        return Err(BlockError::Cut {
            need: (BLOCK_HEADER_LEN + payload.len()) as u64,
            have: (BLOCK_HEADER_LEN + got) as u64,
        });
    }
    if checksum(&head, &payload) != u32::from_le_bytes(head[8..12].try_into().unwrap()) {
        return Err(BlockError::Checksum);
    }
    Ok(Some((kind, payload)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_reads_back_and_every_cut_is_named() {
        let b = framed(kind::RECORDS, b"hello records");
        assert_eq!(
            read_block(&mut &b[..]).unwrap(),
            Some((kind::RECORDS, b"hello records".to_vec()))
        );
        assert_eq!(read_block(&mut &b[..0]).unwrap(), None);
        for cut in 1..b.len() {
            assert!(
                matches!(read_block(&mut &b[..cut]), Err(BlockError::Cut { .. })),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn flipped_bits_are_caught() {
        let b = framed(kind::TRAILER, b"{}");
        for i in 0..b.len() {
            let mut bad = b.clone();
            bad[i] ^= 0x10;
            assert!(read_block(&mut &bad[..]).is_err(), "flip at {i}");
        }
    }

    #[test]
    fn absurd_lengths_are_not_allocated() {
        let mut b = framed(kind::RECORDS, b"");
        b[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(read_block(&mut &b[..]), Err(BlockError::TooLarge(u32::MAX)));
    }
}
