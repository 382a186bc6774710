//! Sends probes and reports answers. Runs on its own thread with its own
//! runtime so it can live in another network namespace (`--probe-netns`)
//! while the tracer stays in ours: sockets keep the namespace they were
//! created in.

use std::{
    net::{IpAddr, SocketAddr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::PathBuf,
    time::Duration,
};

use anyhow::{anyhow, bail, Context, Result};
use tokio::{io::unix::AsyncFd, sync::mpsc};

use super::{mono_ns, Target, TargetSpec, Wire};

#[derive(Clone, Debug)]
pub struct ProberConfig {
    pub targets: Vec<TargetSpec>,
    pub interval: Duration,
    pub timeout: Duration,
    /// Keep one echo id (classic ping) instead of a new flow per probe.
    pub same_id: bool,
    /// Namespace file to send from (`/run/netns/NAME`).
    pub netns: Option<PathBuf>,
    /// Probes per target; None = until stopped.
    pub count: Option<u64>,
}

#[derive(Debug)]
pub enum ProbeEvent {
    Sent {
        target: usize,
        number: u64,
        wire: Wire,
        mono_ns: u64,
    },
    Reply {
        target: usize,
        wire: Wire,
        mono_ns: u64,
    },
    /// Sending failed (e.g. no route); the probe counts as sent and lost.
    Failed { target: usize, error: String },
}

/// Starts the prober; events arrive on the returned channel. Socket set-up
/// errors (no permission, bad namespace) are returned before it starts.
pub fn spawn(cfg: ProberConfig) -> Result<mpsc::UnboundedReceiver<ProbeEvent>> {
    let (tx, rx) = mpsc::unbounded_channel();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
    std::thread::Builder::new()
        .name("ctdrop-prober".into())
        .spawn(move || {
            let setup = (|| -> Result<(tokio::runtime::Runtime, Sockets)> {
                if let Some(ns) = &cfg.netns {
                    enter_netns(ns)?;
                }
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                let sockets = rt.block_on(async { Sockets::open(&cfg.targets) })?;
                Ok((rt, sockets))
            })();
            match setup {
                Ok((rt, sockets)) => {
                    let _ = ready_tx.send(Ok(()));
                    rt.block_on(run(cfg, sockets, tx));
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            }
        })
        .context("starting the prober thread")?;
    ready_rx
        .recv()
        .map_err(|_| anyhow!("prober thread died"))??;
    Ok(rx)
}

fn enter_netns(path: &PathBuf) -> Result<()> {
    let f = std::fs::File::open(path)
        .with_context(|| format!("opening namespace {}", path.display()))?;
    crate::conntrack::netns::enter_file(&f)
        .with_context(|| format!("entering namespace {}", path.display()))
}

/// One raw ICMP socket per address family, shared by all echo targets.
struct Sockets {
    v4: Option<AsyncFd<OwnedFd>>,
    v6: Option<AsyncFd<OwnedFd>>,
}

impl Sockets {
    fn open(targets: &[TargetSpec]) -> Result<Sockets> {
        let need = |v6: bool| {
            targets
                .iter()
                .any(|t| matches!(t.target, Target::Echo(a) if a.is_ipv6() == v6))
        };
        let open = |fam, proto| -> Result<AsyncFd<OwnedFd>> {
            let fd = unsafe {
                libc::socket(
                    fam,
                    libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                    proto,
                )
            };
            if fd < 0 {
                bail!(
                    "cannot open a raw ICMP socket for --ping: {}",
                    std::io::Error::last_os_error()
                );
            }
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            // SAFETY: the AsyncFd owns the fd.
            unsafe { AsyncFd::register(fd) }.map_err(|e| anyhow!("registering ICMP socket: {e}"))
        };
        Ok(Sockets {
            v4: if need(false) {
                Some(open(libc::AF_INET, libc::IPPROTO_ICMP)?)
            } else {
                None
            },
            v6: if need(true) {
                Some(open(libc::AF_INET6, libc::IPPROTO_ICMPV6)?)
            } else {
                None
            },
        })
    }
}

async fn run(cfg: ProberConfig, sockets: Sockets, tx: mpsc::UnboundedSender<ProbeEvent>) {
    let base_id = (std::process::id() as u16)
        .wrapping_mul(31)
        .wrapping_add(mono_ns() as u16)
        | 1;
    let mut tick = tokio::time::interval(cfg.interval);
    let mut number = 0u64;
    let targets = cfg.targets.clone();
    let mut v4buf = vec![0u8; 2048];
    let mut v6buf = vec![0u8; 2048];
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if cfg.count.is_some_and(|c| number >= c) {
                    // Dropping the sender tells the session we are done;
                    // in-flight TCP/UDP tasks hold clones only briefly.
                    return;
                }
                number += 1;
                for (i, t) in targets.iter().enumerate() {
                    let r = send_one(&cfg, &sockets, i, t.target, number, base_id, &tx);
                    if let Err(e) = r {
                        let _ = tx.send(ProbeEvent::Failed { target: i, error: format!("{e:#}") });
                    }
                }
            }
            r = recv_echo(sockets.v4.as_ref(), &mut v4buf, false) => {
                if let Some((from, id, seq)) = r {
                    report_reply(&targets, from, id, seq, &tx);
                }
            }
            r = recv_echo(sockets.v6.as_ref(), &mut v6buf, true) => {
                if let Some((from, id, seq)) = r {
                    report_reply(&targets, from, id, seq, &tx);
                }
            }
        }
        if tx.is_closed() {
            return;
        }
    }
}

fn report_reply(
    targets: &[TargetSpec],
    from: IpAddr,
    id: u16,
    seq: u16,
    tx: &mpsc::UnboundedSender<ProbeEvent>,
) {
    let now = mono_ns();
    for (i, t) in targets.iter().enumerate() {
        if t.target == Target::Echo(from) {
            let _ = tx.send(ProbeEvent::Reply {
                target: i,
                wire: Wire::Echo { id, seq },
                mono_ns: now,
            });
        }
    }
}

fn send_one(
    cfg: &ProberConfig,
    sockets: &Sockets,
    i: usize,
    target: Target,
    number: u64,
    base_id: u16,
    tx: &mpsc::UnboundedSender<ProbeEvent>,
) -> Result<()> {
    // Stamped before the packet leaves, so its drop can never look earlier.
    let sent = |wire| {
        let _ = tx.send(ProbeEvent::Sent {
            target: i,
            number,
            wire,
            mono_ns: mono_ns(),
        });
    };
    match target {
        Target::Echo(addr) => {
            // A new id opens a new conntrack flow; a fixed id keeps reusing
            // one entry and never notices a full table.
            let (id, seq) = if cfg.same_id {
                (
                    base_id.wrapping_add(i as u16),
                    (number as u16).wrapping_sub(1),
                )
            } else {
                let id = base_id
                    .wrapping_add((number as u16).wrapping_mul(64))
                    .wrapping_add(i as u16);
                (if id == 0 { 1 } else { id }, 1)
            };
            let wire = Wire::Echo { id, seq };
            let sock = if addr.is_ipv6() {
                sockets.v6.as_ref()
            } else {
                sockets.v4.as_ref()
            };
            let sock = sock.ok_or_else(|| anyhow!("no ICMP socket"))?;
            sent(wire);
            send_echo(sock.get_ref().as_raw_fd(), addr, id, seq)
        }
        Target::Tcp(addr) => {
            let sock = if addr.is_ipv6() {
                tokio::net::TcpSocket::new_v6()?
            } else {
                tokio::net::TcpSocket::new_v4()?
            };
            sock.bind(SocketAddr::new(unspecified(addr.ip()), 0))?;
            let local = sock.local_addr()?.port();
            let wire = Wire::Port {
                proto: 6,
                local,
                remote: addr.port(),
            };
            sent(wire);
            let tx = tx.clone();
            let limit = cfg.timeout * 3;
            tokio::spawn(async move {
                if answered(tokio::time::timeout(limit, sock.connect(addr)).await) {
                    let _ = tx.send(ProbeEvent::Reply {
                        target: i,
                        wire,
                        mono_ns: mono_ns(),
                    });
                }
            });
            Ok(())
        }
        Target::Udp(addr) => {
            let std_sock = std::net::UdpSocket::bind(SocketAddr::new(unspecified(addr.ip()), 0))?;
            std_sock.connect(addr)?;
            std_sock.set_nonblocking(true)?;
            let sock = tokio::net::UdpSocket::from_std(std_sock)?;
            let local = sock.local_addr()?.port();
            let wire = Wire::Port {
                proto: 17,
                local,
                remote: addr.port(),
            };
            sent(wire);
            let tx = tx.clone();
            let limit = cfg.timeout * 3;
            tokio::spawn(async move {
                if sock.send(b"ctdrop probe").await.is_err() {
                    return;
                }
                let mut buf = [0u8; 512];
                if answered(tokio::time::timeout(limit, sock.recv(&mut buf)).await) {
                    let _ = tx.send(ProbeEvent::Reply {
                        target: i,
                        wire,
                        mono_ns: mono_ns(),
                    });
                }
            });
            Ok(())
        }
    }
}

/// A TCP/UDP probe was answered when the far end spoke: a connection or a
/// datagram back, or a refusal (RST, ICMP port-unreachable): both mean the
/// probe got through. No answer before the time limit is no answer.
fn answered<T>(r: Result<std::io::Result<T>, tokio::time::error::Elapsed>) -> bool {
    match r {
        Ok(Ok(_)) => true,
        Ok(Err(e)) => e.kind() == std::io::ErrorKind::ConnectionRefused,
        Err(_) => false,
    }
}

fn unspecified(a: IpAddr) -> IpAddr {
    match a {
        IpAddr::V4(_) => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
    }
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for c in data.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], 0])
        };
        sum += w as u32;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

pub fn echo_packet(v6: bool, id: u16, seq: u16) -> Vec<u8> {
    let mut p = vec![if v6 { 128 } else { 8 }, 0, 0, 0];
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(b"ctdrop-probe....");
    if !v6 {
        // The kernel fills in the ICMPv6 checksum itself (it needs the
        // pseudo-header); ICMPv4's is ours.
        let c = checksum(&p);
        p[2..4].copy_from_slice(&c.to_be_bytes());
    }
    p
}

fn send_echo(fd: i32, addr: IpAddr, id: u16, seq: u16) -> Result<()> {
    let pkt = echo_packet(addr.is_ipv6(), id, seq);
    let rc = match addr {
        IpAddr::V4(a) => {
            let sa = libc::sockaddr_in {
                sin_family: libc::AF_INET as u16,
                sin_port: 0,
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.octets()),
                },
                sin_zero: [0; 8],
            };
            unsafe {
                libc::sendto(
                    fd,
                    pkt.as_ptr().cast(),
                    pkt.len(),
                    0,
                    (&sa as *const libc::sockaddr_in).cast(),
                    std::mem::size_of_val(&sa) as u32,
                )
            }
        }
        IpAddr::V6(a) => {
            let sa = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as u16,
                sin6_port: 0,
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.octets(),
                },
                sin6_scope_id: 0,
            };
            unsafe {
                libc::sendto(
                    fd,
                    pkt.as_ptr().cast(),
                    pkt.len(),
                    0,
                    (&sa as *const libc::sockaddr_in6).cast(),
                    std::mem::size_of_val(&sa) as u32,
                )
            }
        }
    };
    if rc < 0 {
        bail!(
            "sending echo request to {addr}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Next echo reply on `sock`: (from, id, seq). Pends forever without a socket.
async fn recv_echo(
    sock: Option<&AsyncFd<OwnedFd>>,
    buf: &mut [u8],
    v6: bool,
) -> Option<(IpAddr, u16, u16)> {
    let Some(sock) = sock else {
        return std::future::pending().await;
    };
    loop {
        let mut guard = sock.readable().await.ok()?;
        let mut from: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of_val(&from) as u32;
        let n = unsafe {
            libc::recvfrom(
                sock.get_ref().as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                (&mut from as *mut libc::sockaddr_storage).cast(),
                &mut len,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::WouldBlock {
                guard.clear_ready();
                continue;
            }
            return None;
        }
        if let Some(r) = parse_reply(&buf[..n as usize], &from, v6) {
            return Some(r);
        }
    }
}

/// Raw IPv4 sockets deliver the IP header; raw ICMPv6 sockets do not.
pub fn parse_reply(
    pkt: &[u8],
    from: &libc::sockaddr_storage,
    v6: bool,
) -> Option<(IpAddr, u16, u16)> {
    let (icmp, src) = if v6 {
        let sa: &libc::sockaddr_in6 = unsafe { &*(from as *const _ as *const libc::sockaddr_in6) };
        (pkt, IpAddr::from(sa.sin6_addr.s6_addr))
    } else {
        let ihl = ((*pkt.first()? & 0x0f) as usize) * 4;
        let src = IpAddr::from([*pkt.get(12)?, *pkt.get(13)?, *pkt.get(14)?, *pkt.get(15)?]);
        (pkt.get(ihl..)?, src)
    };
    let reply_type = if v6 { 129 } else { 0 };
    if icmp.len() < 8 || icmp[0] != reply_type {
        return None;
    }
    Some((
        src,
        u16::from_be_bytes([icmp[4], icmp[5]]),
        u16::from_be_bytes([icmp[6], icmp[7]]),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_checksum_verifies() {
        let p = echo_packet(false, 0x1234, 7);
        assert_eq!(checksum(&p), 0);
        assert_eq!(&p[4..8], &[0x12, 0x34, 0, 7]);
    }

    #[test]
    fn parses_ipv4_reply_and_ignores_requests() {
        let mut pkt = vec![0x45u8; 20];
        pkt[12..16].copy_from_slice(&[198, 18, 0, 2]);
        let mut icmp = echo_packet(false, 9, 3);
        icmp[0] = 0;
        pkt.extend_from_slice(&icmp);
        let from: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        assert_eq!(
            parse_reply(&pkt, &from, false),
            Some(("198.18.0.2".parse().unwrap(), 9, 3))
        );
        pkt[20] = 8;
        assert_eq!(parse_reply(&pkt, &from, false), None);
        assert_eq!(parse_reply(&pkt[..10], &from, false), None);
    }
}
