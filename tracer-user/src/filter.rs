//! Trace filters from the command line to the kernel's `FilterConfig`:
//! `--host` addresses and CIDR prefixes (IPv4 and IPv6), `--port`,
//! `--netns` (name, path, PID or inode), `--ifname` (resolved per
//! namespace), `--proto`. Each may be repeated up to [`FILTER_MAX`] times.
//! Everything is resolved before attaching: a namespace, interface or
//! inode that does not exist is bad input, not a trace of nothing.

use std::{net::IpAddr, path::PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use tracer_common::{FilterConfig, FilterIf, FILTER_MAX};

/// An address with a prefix length: `10.0.0.0/8`, `2001:db8::/32`, or a
/// bare address (all bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Net {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Net {
    fn bits(&self) -> u8 {
        if self.addr.is_ipv4() {
            32
        } else {
            128
        }
    }

    /// The address bytes and the mask bytes (16 each; IPv4 in the first 4).
    fn bytes(&self) -> ([u8; 16], [u8; 16]) {
        let mut a = [0u8; 16];
        match self.addr {
            IpAddr::V4(v) => a[..4].copy_from_slice(&v.octets()),
            IpAddr::V6(v) => a = v.octets(),
        }
        let mut m = [0u8; 16];
        for (i, b) in m.iter_mut().enumerate().take(self.bits() as usize / 8) {
            let left = self.prefix as i32 - i as i32 * 8;
            *b = if left >= 8 {
                0xff
            } else if left <= 0 {
                0
            } else {
                !(0xffu8 >> left)
            };
        }
        for i in 0..16 {
            a[i] &= m[i];
        }
        (a, m)
    }

    /// Whether `ip` is inside (the same rule as the kernel side's).
    pub fn contains(&self, ip: &IpAddr) -> bool {
        if ip.is_ipv4() != self.addr.is_ipv4() {
            return false;
        }
        let (a, m) = self.bytes();
        let other = Net {
            addr: *ip,
            prefix: self.bits(),
        }
        .bytes()
        .0;
        (0..16).all(|i| other[i] & m[i] == a[i])
    }
}

impl std::fmt::Display for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.prefix == self.bits() {
            write!(f, "{}", self.addr)
        } else {
            let (a, _) = self.bytes();
            let base = match self.addr {
                IpAddr::V4(_) => IpAddr::from([a[0], a[1], a[2], a[3]]),
                IpAddr::V6(_) => IpAddr::from(a),
            };
            write!(f, "{base}/{}", self.prefix)
        }
    }
}

/// `--host ADDR[/PREFIX]`. Host bits below the prefix are ignored
/// (`10.1.2.3/8` is `10.0.0.0/8`), as `ip route` would not accept but
/// iptables does.
pub fn parse_net(s: &str) -> Result<Net> {
    let (a, p) = match s.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (s, None),
    };
    let addr: IpAddr = a
        .trim()
        .parse()
        .map_err(|_| anyhow!("bad address {s:?} (try 198.18.0.2, 10.0.0.0/8 or 2001:db8::/32)"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = match p {
        None => max,
        Some(p) => p
            .parse::<u8>()
            .ok()
            .filter(|p| *p <= max)
            .ok_or_else(|| anyhow!("bad prefix length in {s:?} (0-{max})"))?,
    };
    Ok(Net { addr, prefix })
}

fn too_many(what: &str, n: usize) -> Result<()> {
    if n > FILTER_MAX {
        bail!("at most {FILTER_MAX} {what} values, got {n}");
    }
    Ok(())
}

fn word(b: &[u8]) -> u32 {
    u32::from_ne_bytes([b[0], b[1], b[2], b[3]])
}

/// The filter options as given on the command line (`cli::TraceArgs`
/// lends them; this module does not import the command line, which uses
/// its parsers).
pub struct Wanted<'a> {
    pub host: &'a [Net],
    pub port: &'a [u16],
    pub netns: &'a [String],
    pub ifname: &'a [String],
    pub proto: Option<u8>,
}

/// Fills the filter part of `f` from the command line.
pub fn fill(args: &Wanted, f: &mut FilterConfig) -> Result<()> {
    too_many("--host", args.host.len())?;
    too_many("--port", args.port.len())?;
    too_many("--netns", args.netns.len())?;
    too_many("--ifname", args.ifname.len())?;
    for (i, n) in args.host.iter().enumerate() {
        let (a, m) = n.bytes();
        for k in 0..4 {
            f.nets[i].addr[k] = word(&a[k * 4..]);
            f.nets[i].mask[k] = word(&m[k * 4..]);
        }
        if n.addr.is_ipv6() {
            f.nets_v6 |= 1 << i;
        }
    }
    f.n_nets = args.host.len() as u8;
    for (i, p) in args.port.iter().enumerate() {
        f.ports[i] = *p;
    }
    f.n_ports = args.port.len() as u8;
    let mut nss = Vec::new();
    for (i, arg) in args.netns.iter().enumerate() {
        let (inode, path) = crate::conntrack::netns::resolve_netns(arg)?;
        f.netns[i] = inode;
        nss.push((inode, path));
    }
    f.n_netns = nss.len() as u8;
    let ifs = resolve_ifnames(args.ifname, &nss)?;
    too_many(
        "--ifname (one per namespace it names an interface in)",
        ifs.len(),
    )?;
    for (i, x) in ifs.iter().enumerate() {
        f.ifs[i] = *x;
    }
    f.n_ifs = ifs.len() as u8;
    f.l4_proto = args.proto.unwrap_or(0);
    Ok(())
}

/// Each `--ifname` to (namespace, ifindex) in the `--netns` namespaces,
/// or without them in this host's own and every named namespace.
fn resolve_ifnames(names: &[String], nss: &[(u32, PathBuf)]) -> Result<Vec<FilterIf>> {
    if names.is_empty() {
        return Ok(Vec::new());
    }
    let places: Vec<(u32, PathBuf)> = if nss.is_empty() {
        let mut v = vec![(
            crate::conntrack::netns::own_netns()?,
            PathBuf::from("/proc/self/ns/net"),
        )];
        v.extend(
            crate::conntrack::netns::named_namespaces()
                .into_iter()
                .map(|(ino, (_, p))| (ino, p)),
        );
        v
    } else {
        nss.to_vec()
    };
    let mut out = Vec::new();
    for name in names {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('/') {
            bail!("bad interface name {name:?}");
        }
        let mut found = false;
        for (ino, path) in &places {
            let n = name.clone();
            let idx = crate::conntrack::netns::in_netns(path, move || {
                let c =
                    std::ffi::CString::new(n).map_err(|_| anyhow!("interface name with a NUL"))?;
                // SAFETY: c is a valid NUL-terminated string for the call.
                Ok(unsafe { libc::if_nametoindex(c.as_ptr()) })
            })
            .with_context(|| format!("looking up interface {name:?}"))?;
            if idx != 0
                && !out.contains(&FilterIf {
                    netns: *ino,
                    ifindex: idx,
                })
            {
                out.push(FilterIf {
                    netns: *ino,
                    ifindex: idx,
                });
                found = true;
            }
        }
        if !found {
            let scope = if nss.is_empty() {
                "this host's namespace or any named one (add --netns)"
            } else {
                "the --netns namespaces"
            };
            bail!("no interface named {name:?} in {scope}");
        }
    }
    Ok(out)
}

/// Whether a filter narrows what is traced (counts then cover only part
/// of what the kernel counted).
pub fn narrows(f: &FilterConfig) -> bool {
    f.n_netns != 0 || f.n_ifs != 0 || f.l4_proto != 0 || f.n_ports != 0 || f.n_nets != 0
}

/// The prefixes in `f`, as the user would write them.
pub fn nets(f: &FilterConfig) -> Vec<String> {
    (0..f.n_nets as usize)
        .map(|i| {
            let mut a = [0u8; 16];
            let mut m = [0u8; 16];
            for k in 0..4 {
                a[k * 4..k * 4 + 4].copy_from_slice(&f.nets[i].addr[k].to_ne_bytes());
                m[k * 4..k * 4 + 4].copy_from_slice(&f.nets[i].mask[k].to_ne_bytes());
            }
            let prefix = m.iter().map(|b| b.count_ones() as u8).sum();
            let addr = if f.nets_v6 & (1 << i) != 0 {
                IpAddr::from(a)
            } else {
                IpAddr::from([a[0], a[1], a[2], a[3]])
            };
            Net { addr, prefix }.to_string()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_parse_mask_and_print_back() {
        let n = parse_net("10.1.2.3/8").unwrap();
        assert_eq!(n.to_string(), "10.0.0.0/8");
        assert!(n.contains(&"10.200.0.1".parse().unwrap()));
        assert!(!n.contains(&"11.0.0.1".parse().unwrap()));
        assert!(!n.contains(&"::a00:1".parse().unwrap()));
        let n = parse_net("2001:db8:ff::/36").unwrap();
        assert_eq!(n.to_string(), "2001:db8::/36");
        assert!(n.contains(&"2001:db8:fff::1".parse().unwrap()));
        assert!(!n.contains(&"2001:db8:1000::1".parse().unwrap()));
        assert_eq!(parse_net("198.18.0.2").unwrap().to_string(), "198.18.0.2");
        assert!(parse_net("198.18.0.2/33").is_err());
        assert!(parse_net("bogus/8").is_err());
        assert!(parse_net("::1/129").is_err());
        assert_eq!(parse_net("0.0.0.0/0").unwrap().to_string(), "0.0.0.0/0");
        assert!(parse_net("0.0.0.0/0")
            .unwrap()
            .contains(&"1.2.3.4".parse().unwrap()));
    }

    #[test]
    fn filter_words_round_trip() {
        let args = crate::cli::LiveArgs::from_args(&[
            "--host",
            "198.18.0.0/15",
            "--host",
            "2001:db8::/32",
            "--host",
            "198.18.3.4",
            "--port",
            "53",
            "--port",
            "5353",
        ])
        .unwrap();
        let mut f: FilterConfig = bytemuck::Zeroable::zeroed();
        fill(&args.trace.filters(), &mut f).unwrap();
        assert_eq!(
            nets(&f),
            vec!["198.18.0.0/15", "2001:db8::/32", "198.18.3.4"]
        );
        assert_eq!(
            (f.n_nets, f.nets_v6, f.n_ports, &f.ports[..2]),
            (3, 0b010, 2, &[53u16, 5353][..])
        );
        assert!(narrows(&f));
    }

    #[test]
    fn more_than_the_kernel_holds_is_refused() {
        let many: Vec<String> = (1..=9)
            .flat_map(|p| ["--port".to_string(), p.to_string()])
            .collect();
        let refs: Vec<&str> = many.iter().map(String::as_str).collect();
        let args = crate::cli::LiveArgs::from_args(&refs).unwrap();
        let mut f: FilterConfig = bytemuck::Zeroable::zeroed();
        assert!(fill(&args.trace.filters(), &mut f)
            .unwrap_err()
            .to_string()
            .contains("at most 8 --port"));
    }
}
