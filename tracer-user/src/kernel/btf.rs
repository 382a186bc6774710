//! Struct offsets and enum names read from the running kernel's BTF.
//!
//! Rust eBPF has no CO-RE, so every offset the kernel programs use is
//! resolved here, once, and handed over as a global. Fields can sit inside
//! anonymous unions and struct groups (`sk_buff` is full of them), so the
//! lookup walks those.

use std::{collections::HashMap, path::Path};

use anyhow::{anyhow, bail, Context, Result};
use btf_rs::{Btf, Type};
use tracer_common::{Offsets, OFFSET_ABSENT};

/// The kernel's BTF: vmlinux plus, where conntrack is a module, its split BTF.
pub struct KernelBtf {
    vmlinux: Btf,
    modules: Vec<Btf>,
}

impl KernelBtf {
    pub fn open(vmlinux: &Path) -> Result<Self> {
        let vmlinux_btf = Btf::from_file(vmlinux)
            .map_err(|e| anyhow!("{e}"))
            .with_context(|| format!("cannot read kernel BTF at {}", vmlinux.display()))?;
        let mut modules = Vec::new();
        // Types that only a module defines (nf_conn on kernels with conntrack
        // as a module) live in its split BTF beside vmlinux.
        if let Some(dir) = vmlinux.parent() {
            {
                let m = "nf_conntrack";
                let p = dir.join(m);
                if p.exists() {
                    if let Ok(b) = Btf::from_split_file(&p, &vmlinux_btf) {
                        modules.push(b);
                    }
                }
            }
        }
        Ok(KernelBtf {
            vmlinux: vmlinux_btf,
            modules,
        })
    }

    fn all(&self) -> impl Iterator<Item = &Btf> {
        std::iter::once(&self.vmlinux).chain(self.modules.iter())
    }

    /// The named struct with its BTF (first definition that has members).
    fn find_struct(&self, name: &str) -> Option<(&Btf, btf_rs::Struct)> {
        for btf in self.all() {
            if let Ok(types) = btf.resolve_types_by_name(name) {
                for t in types {
                    if let Type::Struct(s) = t {
                        if !s.members.is_empty() {
                            return Some((btf, s));
                        }
                    }
                }
            }
        }
        None
    }

    /// Byte offset of `path` (dot-separated, e.g. `ns.inum`) inside struct `name`.
    pub fn offset(&self, name: &str, path: &str) -> Result<u32> {
        let (btf, s) = self
            .find_struct(name)
            .ok_or_else(|| anyhow!("struct {name} not in BTF"))?;
        let mut total_bits = 0u32;
        let mut cur = s;
        let parts: Vec<&str> = path.split('.').collect();
        for (i, part) in parts.iter().enumerate() {
            let (bits, ty) = member_offset(btf, &cur, part)?
                .ok_or_else(|| anyhow!("{name} has no field {path}"))?;
            total_bits += bits;
            if i + 1 < parts.len() {
                cur = match strip(btf, ty)? {
                    Type::Struct(s) | Type::Union(s) => s,
                    _ => bail!("{name}.{part} is not a struct"),
                };
            }
        }
        if !total_bits.is_multiple_of(8) {
            bail!("{name}.{path} is a bitfield");
        }
        Ok(total_bits / 8)
    }

    /// Offset or [`OFFSET_ABSENT`] when this kernel lacks the field.
    pub fn offset_or_absent(&self, name: &str, path: &str) -> u32 {
        self.offset(name, path).unwrap_or(OFFSET_ABSENT)
    }

    /// Values of an enum, by name.
    pub fn enum_values(&self, name: &str) -> Result<HashMap<String, u64>> {
        for btf in self.all() {
            let Ok(types) = btf.resolve_types_by_name(name) else {
                continue;
            };
            for t in types {
                let mut out = HashMap::new();
                match t {
                    Type::Enum(e) => {
                        for m in &e.members {
                            out.insert(
                                btf.resolve_name(m).map_err(|e| anyhow!("{e}"))?,
                                m.val() as u64,
                            );
                        }
                    }
                    Type::Enum64(e) => {
                        for m in &e.members {
                            out.insert(btf.resolve_name(m).map_err(|e| anyhow!("{e}"))?, m.val());
                        }
                    }
                    _ => continue,
                }
                if !out.is_empty() {
                    return Ok(out);
                }
            }
        }
        bail!("enum {name} not in BTF")
    }

    /// Whether a function of that name has BTF (a precondition for fentry).
    pub fn has_func(&self, name: &str) -> bool {
        self.all().any(|btf| {
            btf.resolve_types_by_name(name)
                .map(|ts| ts.iter().any(|t| matches!(t, Type::Func(_))))
                .unwrap_or(false)
        })
    }

    /// Every offset the kernel programs need.
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

/// Strips typedefs and qualifiers down to the underlying type.
fn strip(btf: &Btf, mut t: Type) -> Result<Type> {
    loop {
        t = match t {
            Type::Typedef(ref x) | Type::TypeTag(ref x) => btf.resolve_chained_type(x),
            Type::Volatile(ref x) | Type::Const(ref x) | Type::Restrict(ref x) => {
                btf.resolve_chained_type(x)
            }
            other => return Ok(other),
        }
        .map_err(|e| anyhow!("{e}"))?;
    }
}

/// Bit offset and type of member `name`, searching anonymous members too.
fn member_offset(btf: &Btf, s: &btf_rs::Struct, name: &str) -> Result<Option<(u32, Type)>> {
    for m in &s.members {
        let mname = btf.resolve_name(m).unwrap_or_default();
        let ty = btf.resolve_chained_type(m).map_err(|e| anyhow!("{e}"))?;
        if mname == name {
            return Ok(Some((m.bit_offset(), ty)));
        }
        if mname.is_empty() {
            if let Type::Struct(inner) | Type::Union(inner) = strip(btf, ty)? {
                if let Some((off, t)) = member_offset(btf, &inner, name)? {
                    return Ok(Some((m.bit_offset() + off, t)));
                }
            }
        }
    }
    Ok(None)
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
}
