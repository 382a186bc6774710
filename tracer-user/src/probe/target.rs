//! `--ping HOST` and `--probe tcp:HOST:PORT|udp:HOST:PORT`.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};

use anyhow::{anyhow, bail, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Echo(IpAddr),
    Tcp(SocketAddr),
    Udp(SocketAddr),
}

impl Target {
    pub fn addr(&self) -> IpAddr {
        match self {
            Target::Echo(a) => *a,
            Target::Tcp(s) | Target::Udp(s) => s.ip(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetSpec {
    /// As the operator wrote it, for output.
    pub label: String,
    pub target: Target,
}

/// RFC 6761 names that can never resolve: refused here, so no query for
/// them leaves the host (glibc sends them to the configured nameserver).
fn never_resolves(host: &str) -> bool {
    let h = host.trim_end_matches('.').to_ascii_lowercase();
    h == "invalid" || h.ends_with(".invalid")
}

fn resolve(host: &str) -> Result<IpAddr> {
    if let Ok(a) = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
    {
        return Ok(a);
    }
    if never_resolves(host) {
        bail!("cannot resolve {host:?}: .invalid names never resolve (RFC 6761); not asking DNS");
    }
    (host, 0)
        .to_socket_addrs()
        .map_err(|e| anyhow!("cannot resolve {host:?}: {e}"))?
        .next()
        .map(|s| s.ip())
        .ok_or_else(|| anyhow!("cannot resolve {host:?}: no address"))
}

pub fn parse_ping(s: &str) -> Result<TargetSpec> {
    if s.is_empty() {
        bail!("--ping needs a host");
    }
    Ok(TargetSpec {
        label: s.to_string(),
        target: Target::Echo(resolve(s)?),
    })
}

pub fn parse_probe(s: &str) -> Result<TargetSpec> {
    let (kind, rest) = s
        .split_once(':')
        .ok_or_else(|| anyhow!("--probe takes tcp:HOST:PORT or udp:HOST:PORT, got {s:?}"))?;
    let (host, port) = rest
        .rsplit_once(':')
        .ok_or_else(|| anyhow!("--probe {s:?} lacks a port (tcp:HOST:PORT)"))?;
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| anyhow!("bad port in --probe {s:?}"))?;
    let addr = SocketAddr::new(resolve(host)?, port);
    let target = match kind {
        "tcp" => Target::Tcp(addr),
        "udp" => Target::Udp(addr),
        "icmp" | "ping" => bail!("use --ping HOST for ICMP echo probes"),
        other => bail!("unknown probe kind {other:?} in {s:?} (tcp or udp)"),
    };
    Ok(TargetSpec {
        label: s.to_string(),
        target,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_targets() {
        assert_eq!(
            parse_ping("198.18.0.2").unwrap().target,
            Target::Echo("198.18.0.2".parse().unwrap())
        );
        assert_eq!(
            parse_probe("tcp:198.18.0.2:80").unwrap().target,
            Target::Tcp("198.18.0.2:80".parse().unwrap())
        );
        assert_eq!(
            parse_probe("udp:[2001:db8::2]:53").unwrap().target,
            Target::Udp("[2001:db8::2]:53".parse().unwrap())
        );
        assert!(parse_probe("tcp:198.18.0.2").is_err());
        assert!(parse_probe("sctp:198.18.0.2:1").is_err());
        assert!(parse_probe("tcp:198.18.0.2:0").is_err());
        assert!(parse_ping("").is_err());
        assert!(parse_ping("no-such-host.invalid").is_err());
    }

    #[test]
    fn dot_invalid_names_are_known_unresolvable() {
        for h in ["invalid", "x.invalid", "X.INVALID.", "a.b.invalid"] {
            assert!(never_resolves(h), "{h}");
        }
        for h in ["invalid.example", "xinvalid", "example.com", "198.18.0.2"] {
            assert!(!never_resolves(h), "{h}");
        }
        let e = format!("{:#}", parse_probe("tcp:db.invalid:5432").unwrap_err());
        assert!(
            e.contains("db.invalid") && e.contains("not asking DNS"),
            "{e}"
        );
    }
}
