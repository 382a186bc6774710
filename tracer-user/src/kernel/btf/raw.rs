//! A reader of raw BTF (`include/uapi/linux/btf.h`) for the few questions
//! ctdrop asks: a struct member's offset, an enum's values, whether a
//! function exists. It indexes nothing up front: one pass records where
//! each type starts, and a question scans the types by name. That is a few
//! milliseconds and the file's own size in memory, where a general parser
//! that builds name maps for every type took ~165 ms and tens of MiB (and
//! aya parses the same BTF again for loading, with its types private).

use anyhow::{bail, Context, Result};

const MAGIC: u16 = 0xeb9f;

// BTF_KIND_*.
pub const INT: u8 = 1;
pub const PTR: u8 = 2;
pub const ARRAY: u8 = 3;
pub const STRUCT: u8 = 4;
pub const UNION: u8 = 5;
pub const ENUM: u8 = 6;
pub const FWD: u8 = 7;
pub const TYPEDEF: u8 = 8;
pub const VOLATILE: u8 = 9;
pub const CONST: u8 = 10;
pub const RESTRICT: u8 = 11;
pub const FUNC: u8 = 12;
pub const FUNC_PROTO: u8 = 13;
pub const VAR: u8 = 14;
pub const DATASEC: u8 = 15;
pub const FLOAT: u8 = 16;
pub const DECL_TAG: u8 = 17;
pub const TYPE_TAG: u8 = 18;
pub const ENUM64: u8 = 19;

/// One `struct btf_type` and where its trailing records start.
#[derive(Clone, Copy, Debug)]
pub struct TypeRec {
    pub kind: u8,
    pub kind_flag: bool,
    pub vlen: u16,
    pub name_off: u32,
    /// `size` or `type`, by kind.
    pub size_or_type: u32,
    /// Byte offset of the trailing records in [`Raw::types`].
    trailer: usize,
}

/// A member of a struct or union.
#[derive(Clone, Copy, Debug)]
pub struct Member {
    pub name_off: u32,
    pub type_id: u32,
    pub bit_offset: u32,
}

/// vmlinux's BTF, or vmlinux's followed by one module's split BTF: split
/// type ids continue after the base's and split string offsets after the
/// base's strings, so the two concatenated read as one.
pub struct Raw {
    types: Vec<u8>,
    strings: Vec<u8>,
    /// Index = type id; id 0 is `void`.
    recs: Vec<TypeRec>,
}

fn u32_at(b: &[u8], off: usize) -> Result<u32> {
    let s = b
        .get(off..off + 4)
        .with_context(|| format!("BTF truncated at byte {off}"))?;
    Ok(u32::from_ne_bytes(s.try_into().unwrap()))
}

/// Bytes of the records trailing a type of `kind` with `vlen` entries.
fn trailer_len(kind: u8, vlen: u16) -> Result<usize> {
    let v = vlen as usize;
    Ok(match kind {
        INT | VAR | DECL_TAG => 4,
        ARRAY => 12,
        STRUCT | UNION | DATASEC | ENUM64 => 12 * v,
        ENUM | FUNC_PROTO => 8 * v,
        PTR | FWD | TYPEDEF | VOLATILE | CONST | RESTRICT | FUNC | FLOAT | TYPE_TAG => 0,
        k => bail!("unknown BTF kind {k}"),
    })
}

impl Raw {
    /// vmlinux's BTF from its bytes.
    pub fn parse(bytes: &[u8]) -> Result<Raw> {
        let mut raw = Raw {
            types: Vec::new(),
            strings: Vec::new(),
            recs: vec![TypeRec {
                kind: 0,
                kind_flag: false,
                vlen: 0,
                name_off: 0,
                size_or_type: 0,
                trailer: 0,
            }],
        };
        raw.append(bytes)?;
        Ok(raw)
    }

    /// Appends a module's split BTF (based on this one); on an error
    /// nothing is appended.
    pub fn add_split(&mut self, bytes: &[u8]) -> Result<()> {
        self.append(bytes)
    }

    fn append(&mut self, b: &[u8]) -> Result<()> {
        let magic = b.get(0..2).context("BTF shorter than its header")?;
        if u16::from_ne_bytes([magic[0], magic[1]]) != MAGIC {
            bail!("not BTF (bad magic), or of the other byte order");
        }
        let hdr_len = u32_at(b, 4)? as usize;
        let (type_off, type_len) = (u32_at(b, 8)? as usize, u32_at(b, 12)? as usize);
        let (str_off, str_len) = (u32_at(b, 16)? as usize, u32_at(b, 20)? as usize);
        let types = b
            .get(hdr_len + type_off..hdr_len + type_off + type_len)
            .context("BTF type section out of bounds")?;
        let strings = b
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .context("BTF string section out of bounds")?;
        let base = self.types.len();
        let mut recs = Vec::new();
        let mut off = 0;
        while off < types.len() {
            let info = u32_at(types, off + 4)?;
            let kind = ((info >> 24) & 0x1f) as u8;
            let vlen = (info & 0xffff) as u16;
            recs.push(TypeRec {
                kind,
                kind_flag: info >> 31 == 1,
                vlen,
                name_off: u32_at(types, off)?,
                size_or_type: u32_at(types, off + 8)?,
                trailer: base + off + 12,
            });
            off += 12 + trailer_len(kind, vlen)?;
        }
        self.recs.extend(recs);
        self.types.extend_from_slice(types);
        self.strings.extend_from_slice(strings);
        Ok(())
    }

    pub fn rec(&self, id: u32) -> Result<TypeRec> {
        self.recs
            .get(id as usize)
            .copied()
            .with_context(|| format!("BTF type id {id} out of range"))
    }

    /// The NUL-terminated string at `off` (empty for anonymous types).
    pub fn name(&self, off: u32) -> &str {
        let s = self.strings.get(off as usize..).unwrap_or(&[]);
        let end = s.iter().position(|&c| c == 0).unwrap_or(s.len());
        std::str::from_utf8(&s[..end]).unwrap_or("")
    }

    /// Ids of the types of `kind` named `name`, in id order.
    pub fn find<'a>(&'a self, name: &'a str, kind: u8) -> impl Iterator<Item = u32> + 'a {
        self.recs
            .iter()
            .enumerate()
            .filter(move |(_, r)| r.kind == kind && self.name(r.name_off) == name)
            .map(|(id, _)| id as u32)
    }

    /// A struct's or union's members.
    pub fn members(&self, r: &TypeRec) -> Result<Vec<Member>> {
        (0..r.vlen as usize)
            .map(|i| {
                let at = r.trailer + 12 * i;
                let raw_off = u32_at(&self.types, at + 8)?;
                Ok(Member {
                    name_off: u32_at(&self.types, at)?,
                    type_id: u32_at(&self.types, at + 4)?,
                    // With kind_flag the top 8 bits are a bitfield's size.
                    bit_offset: if r.kind_flag {
                        raw_off & 0x00ff_ffff
                    } else {
                        raw_off
                    },
                })
            })
            .collect()
    }

    /// An enum's (name, value) pairs, ENUM or ENUM64.
    pub fn enumerators(&self, r: &TypeRec) -> Result<Vec<(&str, u64)>> {
        (0..r.vlen as usize)
            .map(|i| {
                Ok(match r.kind {
                    ENUM => {
                        let at = r.trailer + 8 * i;
                        let v = u32_at(&self.types, at + 4)?;
                        // Signed enums hold negative values as i32.
                        let v = if r.kind_flag {
                            v as i32 as i64 as u64
                        } else {
                            v as u64
                        };
                        (self.name(u32_at(&self.types, at)?), v)
                    }
                    _ => {
                        let at = r.trailer + 12 * i;
                        let lo = u32_at(&self.types, at + 4)? as u64;
                        let hi = u32_at(&self.types, at + 8)? as u64;
                        (self.name(u32_at(&self.types, at)?), hi << 32 | lo)
                    }
                })
            })
            .collect()
    }

    /// Follows typedefs and qualifiers down to the underlying type's id.
    pub fn strip(&self, mut id: u32) -> Result<u32> {
        for _ in 0..64 {
            let r = self.rec(id)?;
            match r.kind {
                TYPEDEF | VOLATILE | CONST | RESTRICT | TYPE_TAG => id = r.size_or_type,
                _ => return Ok(id),
            }
        }
        bail!("BTF type {id}: qualifier chain too long")
    }
}
