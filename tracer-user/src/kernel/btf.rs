//! Struct offsets and enum names read from the running kernel's BTF.
//!
//! Rust eBPF has no CO-RE, so every offset the kernel programs use is
//! resolved here, once, and handed over as a global. Fields can sit inside
//! anonymous unions and struct groups (`sk_buff` is full of them), so the
//! lookup walks those.

mod raw;

use std::{cell::OnceCell, collections::HashMap, path::Path};

use anyhow::{anyhow, bail, Context, Result};
use tracer_common::{Offsets, OFFSET_ABSENT};

use raw::Raw;

/// The kernel's BTF: vmlinux plus, where conntrack is a module, its split
/// BTF (read as one table). Read from the file once per run: the offsets,
/// the hook ABI and aya's loader all take it from here.
pub struct KernelBtf {
    raw: Raw,
    /// vmlinux's bytes as read, for aya's parser (it cannot use ours).
    vmlinux: Vec<u8>,
    /// aya's parse of `vmlinux`, made on first use: tens of MiB, so only
    /// when programs are loaded, and dropped with this.
    aya: OnceCell<aya::Btf>,
}

impl KernelBtf {
    pub fn open(vmlinux: &Path) -> Result<Self> {
        let read = |p: &Path| {
            std::fs::read(p).with_context(|| format!("cannot read kernel BTF at {}", p.display()))
        };
        let bytes = read(vmlinux)?;
        let mut raw = Raw::parse(&bytes)
            .with_context(|| format!("cannot read kernel BTF at {}", vmlinux.display()))?;
        // Types that only a module defines (nf_conn on kernels with conntrack
        // as a module) live in its split BTF beside vmlinux.
        if let Some(dir) = vmlinux.parent() {
            let p = dir.join("nf_conntrack");
            if p.exists() {
                // Unreadable split BTF leaves vmlinux's types as they were.
                if let Ok(bytes) = std::fs::read(&p) {
                    let _ = raw.add_split(&bytes);
                }
            }
        }
        Ok(KernelBtf {
            raw,
            vmlinux: bytes,
            aya: OnceCell::new(),
        })
    }

    /// vmlinux's BTF as aya's loader wants it, parsed from the bytes
    /// already read (once; later calls share it).
    pub fn aya(&self) -> Result<&aya::Btf> {
        if let Some(b) = self.aya.get() {
            return Ok(b);
        }
        let b = aya::Btf::parse(&self.vmlinux, aya::Endianness::default())
            .context("cannot parse kernel BTF for loading")?;
        Ok(self.aya.get_or_init(|| b))
    }

    /// The named struct (first definition that has members).
    fn find_struct(&self, name: &str) -> Option<raw::TypeRec> {
        self.raw
            .find(name, raw::STRUCT)
            .filter_map(|id| self.raw.rec(id).ok())
            .find(|r| r.vlen > 0)
    }

    /// Byte offset of `path` (dot-separated, e.g. `ns.inum`) inside struct `name`.
    pub fn offset(&self, name: &str, path: &str) -> Result<u32> {
        let s = self
            .find_struct(name)
            .ok_or_else(|| anyhow!("struct {name} not in BTF"))?;
        let mut total_bits = 0u32;
        let mut cur = s;
        let parts: Vec<&str> = path.split('.').collect();
        for (i, part) in parts.iter().enumerate() {
            let (bits, ty) = self
                .member_offset(&cur, part)?
                .ok_or_else(|| anyhow!("{name} has no field {path}"))?;
            total_bits += bits;
            if i + 1 < parts.len() {
                cur = self.raw.rec(self.raw.strip(ty)?)?;
                if !matches!(cur.kind, raw::STRUCT | raw::UNION) {
                    bail!("{name}.{part} is not a struct");
                }
            }
        }
        if !total_bits.is_multiple_of(8) {
            bail!("{name}.{path} is a bitfield");
        }
        Ok(total_bits / 8)
    }

    /// Bit offset and type id of member `name`, searching anonymous
    /// members (unions and struct groups) too.
    fn member_offset(&self, s: &raw::TypeRec, name: &str) -> Result<Option<(u32, u32)>> {
        for m in self.raw.members(s)? {
            let mname = self.raw.name(m.name_off);
            if mname == name {
                return Ok(Some((m.bit_offset, m.type_id)));
            }
            if mname.is_empty() {
                let inner = self.raw.rec(self.raw.strip(m.type_id)?)?;
                if matches!(inner.kind, raw::STRUCT | raw::UNION) {
                    if let Some((off, t)) = self.member_offset(&inner, name)? {
                        return Ok(Some((m.bit_offset + off, t)));
                    }
                }
            }
        }
        Ok(None)
    }

    /// Offset or [`OFFSET_ABSENT`] when this kernel lacks the field.
    pub fn offset_or_absent(&self, name: &str, path: &str) -> u32 {
        self.offset(name, path).unwrap_or(OFFSET_ABSENT)
    }

    /// Values of an enum, by name (the first ENUM or ENUM64 of that
    /// name that has values).
    pub fn enum_values(&self, name: &str) -> Result<HashMap<String, u64>> {
        let ids = self
            .raw
            .find(name, raw::ENUM)
            .chain(self.raw.find(name, raw::ENUM64));
        for id in ids {
            let r = self.raw.rec(id)?;
            let out: HashMap<String, u64> = self
                .raw
                .enumerators(&r)?
                .into_iter()
                .map(|(n, v)| (n.to_string(), v))
                .collect();
            if !out.is_empty() {
                return Ok(out);
            }
        }
        bail!("enum {name} not in BTF")
    }

    /// Whether a function of that name has BTF (a precondition for fentry).
    pub fn has_func(&self, name: &str) -> bool {
        self.raw.find(name, raw::FUNC).next().is_some()
    }

    /// The struct offsets the kernel programs use.
    pub fn offsets(&self) -> Result<Offsets> {
        let req = |s: &str, f: &str| {
            self.offset(s, f)
                .with_context(|| "kernel BTF lacks a field ctdrop needs")
        };
        let ns = self.offset("net", "ns")?;
        let inum = self.offset("ns_common", "inum")?;
        Ok(Offsets {
            skb_dev: req("sk_buff", "dev")?,
            skb_nfct: self.offset_or_absent("sk_buff", "_nfct"),
            skb_len: req("sk_buff", "len")?,
            skb_protocol: req("sk_buff", "protocol")?,
            skb_head: req("sk_buff", "head")?,
            skb_network_header: req("sk_buff", "network_header")?,
            skb_transport_header: req("sk_buff", "transport_header")?,
            skb_sk: self.offset_or_absent("sk_buff", "sk"),
            sk_net: self.offset_or_absent("sock", "__sk_common.skc_net"),
            dev_ifindex: req("net_device", "ifindex")?,
            dev_nd_net: req("net_device", "nd_net")?,
            net_inum: ns + inum,
            conn_status: self.offset_or_absent("nf_conn", "status"),
            conn_net: self.offset_or_absent("nf_conn", "ct_net.net"),
            conn_zone_id: self.offset_or_absent("nf_conn", "zone.id"),
            net_ct_stat: self.offset_or_absent("net", "ct.stat"),
            stat_drop: self.offset_or_absent("ip_conntrack_stat", "drop"),
            stat_insert_failed: self.offset_or_absent("ip_conntrack_stat", "insert_failed"),
            stat_invalid: self.offset_or_absent("ip_conntrack_stat", "invalid"),
            net_cookie: self.offset_or_absent("net", "net_cookie"),
            array_pptrs: self.offset_or_absent("bpf_array", "pptrs"),
        })
    }
}

/// Drop-reason names of this kernel, indexed by value.
pub struct DropReasons {
    names: HashMap<u32, String>,
    by_name: HashMap<String, u32>,
}

impl DropReasons {
    pub fn from_btf(btf: &KernelBtf) -> Result<Self> {
        let values = btf
            .enum_values("skb_drop_reason")
            .context("kernel BTF has no enum skb_drop_reason")?;
        Ok(Self::from_pairs(
            values.into_iter().map(|(k, v)| (k, v as u32)),
        ))
    }

    pub fn from_pairs(pairs: impl IntoIterator<Item = (String, u32)>) -> Self {
        let mut names = HashMap::new();
        let mut by_name = HashMap::new();
        for (full, v) in pairs {
            let short = full
                .strip_prefix("SKB_DROP_REASON_")
                .unwrap_or(&full)
                .to_string();
            names.insert(v, short.clone());
            by_name.insert(short, v);
        }
        DropReasons { names, by_name }
    }

    /// Short name (`NETFILTER_DROP`), or the number when unknown.
    pub fn name(&self, v: u32) -> String {
        self.names
            .get(&v)
            .cloned()
            .unwrap_or_else(|| format!("reason_{v}"))
    }

    pub fn value(&self, short: &str) -> Option<u32> {
        self.by_name.get(short).copied()
    }

    pub fn pairs(&self) -> impl Iterator<Item = (u32, &str)> {
        self.names.iter().map(|(v, n)| (*v, n.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> Option<KernelBtf> {
        // Every kernel ctdrop supports has BTF; a machine without it fails here.
        Some(KernelBtf::open(Path::new("/sys/kernel/btf/vmlinux")).expect("host BTF"))
    }

    #[test]
    fn resolves_skb_fields_inside_anonymous_groups() {
        let Some(btf) = host() else { return };
        let o = btf.offsets().unwrap();
        // Cross-checked with `bpftool btf dump` on this machine's 6.18.
        if std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap()
            .starts_with("6.18")
        {
            assert_eq!(o.skb_dev, 16);
            assert_eq!(o.skb_nfct, 104);
            assert_eq!(o.skb_len, 112);
            assert_eq!(o.skb_protocol, 176);
            assert_eq!(o.skb_network_header, 180);
            assert_eq!(o.skb_head, 192);
            assert_eq!(o.dev_ifindex, 224);
            assert_eq!(o.dev_nd_net, 264);
            assert_eq!(o.net_inum, 152 + 24);
        }
        assert_ne!(o.conn_status, OFFSET_ABSENT);
        assert_ne!(o.conn_net, OFFSET_ABSENT);
    }

    #[test]
    fn drop_reasons_by_name() {
        let Some(btf) = host() else { return };
        let r = DropReasons::from_btf(&btf).unwrap();
        let nf = r.value("NETFILTER_DROP").expect("NETFILTER_DROP");
        assert_eq!(r.name(nf), "NETFILTER_DROP");
        assert!(r.value("NOT_SPECIFIED").is_some());
    }

    #[test]
    fn unknown_field_is_an_error() {
        let Some(btf) = host() else { return };
        assert!(btf.offset("sk_buff", "no_such_field").is_err());
        assert_eq!(
            btf.offset_or_absent("sk_buff", "no_such_field"),
            OFFSET_ABSENT
        );
    }

    /// The general parser's answer, walked the same way (anonymous
    /// members included), for the cross-check below.
    fn btf_rs_offset(b: &btf_rs::Btf, name: &str, path: &str) -> Option<u32> {
        use btf_rs::Type;
        fn strip(b: &btf_rs::Btf, mut t: Type) -> Option<Type> {
            loop {
                t = match t {
                    Type::Typedef(ref x) | Type::TypeTag(ref x) => b.resolve_chained_type(x),
                    Type::Volatile(ref x) | Type::Const(ref x) | Type::Restrict(ref x) => {
                        b.resolve_chained_type(x)
                    }
                    other => return Some(other),
                }
                .ok()?;
            }
        }
        fn member(b: &btf_rs::Btf, s: &btf_rs::Struct, name: &str) -> Option<(u32, Type)> {
            for m in &s.members {
                let n = b.resolve_name(m).unwrap_or_default();
                let ty = b.resolve_chained_type(m).ok()?;
                if n == name {
                    return Some((m.bit_offset(), ty));
                }
                if n.is_empty() {
                    if let Some(Type::Struct(i) | Type::Union(i)) = strip(b, ty) {
                        if let Some((o, t)) = member(b, &i, name) {
                            return Some((m.bit_offset() + o, t));
                        }
                    }
                }
            }
            None
        }
        let mut cur = b
            .resolve_types_by_name(name)
            .ok()?
            .into_iter()
            .find_map(|t| match t {
                Type::Struct(s) if !s.members.is_empty() => Some(s),
                _ => None,
            })?;
        let (mut bits, parts) = (0, path.split('.').collect::<Vec<_>>());
        for (i, p) in parts.iter().enumerate() {
            let (o, t) = member(b, &cur, p)?;
            bits += o;
            if i + 1 < parts.len() {
                cur = match strip(b, t)? {
                    Type::Struct(s) | Type::Union(s) => s,
                    _ => return None,
                };
            }
        }
        Some(bits / 8)
    }

    #[test]
    fn own_reader_agrees_with_a_general_btf_parser() {
        let path = Path::new("/sys/kernel/btf/vmlinux");
        let ours = KernelBtf::open(path).unwrap();
        let theirs = btf_rs::Btf::from_file(path).unwrap();
        for (s, f) in [
            ("sk_buff", "dev"),
            ("sk_buff", "_nfct"),
            ("sk_buff", "len"),
            ("sk_buff", "protocol"),
            ("sk_buff", "head"),
            ("sk_buff", "network_header"),
            ("sk_buff", "transport_header"),
            ("sk_buff", "sk"),
            ("sock", "__sk_common.skc_net"),
            ("net_device", "ifindex"),
            ("net_device", "nd_net"),
            ("net", "ns"),
            ("ns_common", "inum"),
            ("nf_conn", "status"),
            ("nf_conn", "ct_net.net"),
            ("nf_conn", "zone.id"),
        ] {
            assert_eq!(
                ours.offset(s, f).ok(),
                btf_rs_offset(&theirs, s, f),
                "{s}.{f}"
            );
        }
        for e in [
            "skb_drop_reason",
            "bpf_prog_type",
            "bpf_attach_type",
            "nf_inet_hooks",
            "ip_conntrack_status",
        ] {
            let mut want = HashMap::new();
            for t in theirs.resolve_types_by_name(e).unwrap() {
                if let btf_rs::Type::Enum(en) = t {
                    for m in &en.members {
                        want.insert(theirs.resolve_name(m).unwrap(), m.val() as u64);
                    }
                }
            }
            assert!(!want.is_empty(), "{e}");
            assert_eq!(ours.enum_values(e).unwrap(), want, "enum {e}");
        }
        assert!(ours.has_func("nf_hook_slow"));
        assert!(!ours.has_func("no_such_function_here"));
    }

    #[test]
    fn aya_btf_is_parsed_once_from_the_same_read() {
        let btf = host().unwrap();
        let a = btf.aya().expect("aya parses the bytes our reader indexed");
        // Parsed once: a second call hands back the same parse.
        assert!(std::ptr::eq(a, btf.aya().unwrap()));
    }

    /// Little-endian (host order here) BTF with the given types and strings.
    fn blob(types: &[u32], strings: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&0xeb9fu16.to_ne_bytes());
        b.extend_from_slice(&[1, 0]);
        for v in [
            24u32,
            0,
            types.len() as u32 * 4,
            types.len() as u32 * 4,
            strings.len() as u32,
        ] {
            b.extend_from_slice(&v.to_ne_bytes());
        }
        for t in types {
            b.extend_from_slice(&t.to_ne_bytes());
        }
        b.extend_from_slice(strings);
        b
    }

    #[test]
    fn split_btf_continues_the_base_ids_and_strings() {
        // Base: [1] int "u32"; [2] struct "inner" { u32 a @0; u32 b @32 }.
        let base_str = b"\0u32\0inner\0a\0b\0";
        let base = blob(
            &[
                1,
                1 << 24,
                4,
                32, // int u32, 32 bits
                5,
                4 << 24 | 2,
                8, // struct inner, 2 members
                11,
                1,
                0, // a
                13,
                1,
                32, // b
            ],
            base_str,
        );
        // Split: [3] struct "outer" { u32 x @0; anonymous union @64 { inner y } },
        // [4] union (anonymous) { inner y @0 }; strings after the base's.
        let o = base_str.len() as u32;
        let split = blob(
            &[
                o + 1,
                4 << 24 | 2,
                16, // struct outer
                o + 7,
                1,
                0, // x
                0,
                4,
                64, // anonymous member of type 4
                0,
                5 << 24 | 1,
                8, // union, 1 member
                o + 9,
                2,
                0, // y: inner
            ],
            b"\0outer\0x\0y\0",
        );
        let mut raw = Raw::parse(&base).unwrap();
        raw.add_split(&split).unwrap();
        let k = KernelBtf {
            raw,
            vmlinux: Vec::new(),
            aya: OnceCell::new(),
        };
        assert_eq!(k.offset("outer", "x").unwrap(), 0);
        assert_eq!(k.offset("outer", "y.b").unwrap(), 12);
        assert_eq!(k.offset("inner", "b").unwrap(), 4);
        assert!(k.offset("outer", "z").is_err());
        // A broken split leaves the base as it was.
        let mut raw = Raw::parse(&base).unwrap();
        assert!(raw.add_split(&split[..40]).is_err());
        assert!(raw.rec(3).is_err());
    }
}
