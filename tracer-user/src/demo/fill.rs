//! Fills the demo server's conntrack table to the limit with real traffic,
//! so the demo needs no change to the global `nf_conntrack_max`.
//!
//! The kernel holds each namespace's own entry count against the one global
//! limit, so a full table in the demo's namespace leaves every other
//! namespace its room. The entries must be ones the kernel cannot evict:
//! with as many entries as hash buckets, `early_drop` finds an unassured
//! entry near almost every new flow's bucket, and the GC evicts unassured
//! entries once a table is 95% full. So each flow becomes a two-way UDP
//! stream, the kind a game server holds for each client: a datagram in, an
//! answer out, and another datagram more than two seconds after the first
//! (`nf_conntrack_udp_packet` marks such a flow ASSURED, 120 s timeout).
//! Three passes of `sendmmsg` on raw sockets, one new flow per datagram.

use std::{
    net::Ipv4Addr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Result};

/// Source addresses of the streams' clients: routed to the client namespace.
pub const CLIENT_NET: (Ipv4Addr, u8) = (Ipv4Addr::new(198, 19, 0, 0), 16);
/// Source ports per client address.
const PORTS_PER_ADDR: u32 = 60_000;
const FIRST_PORT: u32 = 1024;
/// Datagrams per `sendmmsg`.
const BATCH: usize = 512;
/// A flow seen both ways becomes ASSURED on a packet after this long.
const STREAM_AFTER: Duration = Duration::from_millis(2100);

/// What a fill did.
pub struct Filled {
    pub flows: u64,
    pub elapsed: Duration,
}

/// Flow `i`'s client address and port.
fn client(i: u64) -> (Ipv4Addr, u16) {
    let base = u32::from(CLIENT_NET.0);
    let addr = Ipv4Addr::from(base + (i / PORTS_PER_ADDR as u64) as u32 + 1);
    (
        addr,
        (FIRST_PORT + (i % PORTS_PER_ADDR as u64) as u32) as u16,
    )
}

/// Most flows one fill can make: one per (client address, port) in
/// [`CLIENT_NET`].
pub fn max_flows() -> u64 {
    ((1u64 << (32 - CLIENT_NET.1)) - 2) * PORTS_PER_ADDR as u64
}

/// An IPv4+UDP datagram with an 8-byte payload. The kernel fills in the IP
/// checksum, id and total length of IP_HDRINCL packets; a zero UDP checksum
/// means none (IPv4).
fn datagram(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) -> [u8; 36] {
    let mut p = [0u8; 36];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&36u16.to_be_bytes());
    p[6] = 0x40; // DF
    p[8] = 64;
    p[9] = libc::IPPROTO_UDP as u8;
    p[12..16].copy_from_slice(&src.0.octets());
    p[16..20].copy_from_slice(&dst.0.octets());
    p[20..22].copy_from_slice(&src.1.to_be_bytes());
    p[22..24].copy_from_slice(&dst.1.to_be_bytes());
    p[24..26].copy_from_slice(&16u16.to_be_bytes());
    p[28..36].copy_from_slice(b"ctdemo s");
    p
}

/// A raw IPv4 socket (IP_HDRINCL) created inside the namespace at `ns`
/// (the socket keeps the namespace it was made in).
fn raw_socket_in(ns: &Path) -> Result<OwnedFd> {
    ctlab::in_netns(ns, || {
        // SAFETY: plain socket(2); checked, then owned.
        let fd = unsafe {
            libc::socket(
                libc::AF_INET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::IPPROTO_RAW,
            )
        };
        if fd < 0 {
            bail!("raw socket: {}", std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh socket nobody else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    })
}

/// Sends every packet to the destination in its header, `BATCH` at a time.
fn send_all(sock: &OwnedFd, packets: &[[u8; 36]]) -> Result<()> {
    for chunk in packets.chunks(BATCH) {
        let addrs: Vec<libc::sockaddr_in> = chunk
            .iter()
            .map(|p| {
                // SAFETY: sockaddr_in is plain old data; all-zero is valid.
                let mut a: libc::sockaddr_in = unsafe { std::mem::zeroed() };
                a.sin_family = libc::AF_INET as libc::sa_family_t;
                a.sin_addr.s_addr = u32::from_ne_bytes([p[16], p[17], p[18], p[19]]);
                a
            })
            .collect();
        let mut iovs: Vec<libc::iovec> = chunk
            .iter()
            .map(|p| libc::iovec {
                iov_base: p.as_ptr() as *mut libc::c_void,
                iov_len: p.len(),
            })
            .collect();
        let mut msgs: Vec<libc::mmsghdr> = (0..chunk.len())
            .map(|i| {
                // SAFETY: msghdr is plain old data; all-zero is valid.
                let mut h: libc::msghdr = unsafe { std::mem::zeroed() };
                h.msg_name = &addrs[i] as *const _ as *mut libc::c_void;
                h.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as u32;
                h.msg_iov = &mut iovs[i];
                h.msg_iovlen = 1;
                libc::mmsghdr {
                    msg_hdr: h,
                    msg_len: 0,
                }
            })
            .collect();
        let mut done = 0;
        while done < msgs.len() {
            // SAFETY: every header points into `addrs` and `iovs`, which
            // outlive the call; the kernel only reads them.
            let n = unsafe {
                libc::sendmmsg(
                    sock.as_raw_fd(),
                    msgs[done..].as_mut_ptr(),
                    (msgs.len() - done) as u32,
                    0,
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                match e.raw_os_error() {
                    // A datagram the full table refused (EPERM on the way
                    // out) or no buffer space: skip it, the count is read
                    // from the table afterwards.
                    Some(libc::EPERM) | Some(libc::ENOBUFS) => done += 1,
                    _ => return Err(anyhow!("sendmmsg: {e}")),
                }
            } else {
                done += n as usize;
            }
        }
    }
    Ok(())
}

/// Opens `flows` two-way UDP streams from [`CLIENT_NET`] to `server`,
/// answered by `server_ns`, and makes them ASSURED. `stop` ends it early.
pub fn fill(
    flows: u64,
    client_ns: &Path,
    server_ns: &Path,
    server: (Ipv4Addr, u16),
    stop: &dyn Fn() -> bool,
) -> Result<Filled> {
    if flows > max_flows() {
        bail!(
            "cannot open {flows} streams from {}/{}",
            CLIENT_NET.0,
            CLIENT_NET.1
        );
    }
    let start = Instant::now();
    let out = raw_socket_in(client_ns)?;
    let back = raw_socket_in(server_ns)?;
    let ask: Vec<[u8; 36]> = (0..flows).map(|i| datagram(client(i), server)).collect();
    let answer: Vec<[u8; 36]> = (0..flows).map(|i| datagram(server, client(i))).collect();
    send_all(&out, &ask)?;
    // The last flow was created now: two seconds from here, every one is
    // old enough to count as a stream.
    let created = Instant::now();
    send_all(&back, &answer)?;
    drop(answer);
    while created.elapsed() < STREAM_AFTER {
        if stop() {
            bail!("interrupted");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    send_all(&out, &ask)?;
    Ok(Filled {
        flows,
        elapsed: start.elapsed(),
    })
}

/// Kernel memory one conntrack entry takes: the slab object size of
/// `nf_conntrack` (/proc/slabinfo), else a conservative 320 bytes.
pub fn entry_bytes() -> u64 {
    std::fs::read_to_string("/proc/slabinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("nf_conntrack "))
                .and_then(|l| l.split_whitespace().nth(3)?.parse().ok())
        })
        .unwrap_or(320)
}

/// MemAvailable in bytes.
pub fn mem_available() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: u64 = s
        .lines()
        .find(|l| l.starts_with("MemAvailable:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flows_have_distinct_clients_inside_the_client_net() {
        let n = 3 * PORTS_PER_ADDR as u64;
        let mut seen = std::collections::HashSet::new();
        for i in 0..n {
            let (a, p) = client(i);
            assert!(p >= FIRST_PORT as u16);
            assert_eq!(u32::from(a) >> 16, u32::from(CLIENT_NET.0) >> 16);
            assert!(seen.insert((a, p)));
        }
        assert!(max_flows() >= 1 << 20, "a 1M table must be fillable");
    }

    #[test]
    fn datagrams_carry_both_ends() {
        let p = datagram(
            (Ipv4Addr::new(198, 19, 0, 1), 1024),
            (Ipv4Addr::new(198, 18, 200, 2), 5353),
        );
        assert_eq!(&p[12..16], &[198, 19, 0, 1]);
        assert_eq!(&p[16..20], &[198, 18, 200, 2]);
        assert_eq!(u16::from_be_bytes([p[20], p[21]]), 1024);
        assert_eq!(u16::from_be_bytes([p[22], p[23]]), 5353);
        assert_eq!(u16::from_be_bytes([p[24], p[25]]), 16);
    }
}
