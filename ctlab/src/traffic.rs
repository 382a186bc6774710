//! Traffic from inside a namespace: one new conntrack flow per UDP datagram,
//! sinks that tell which datagrams arrived, and ICMP echo probes whose
//! every loss is known.

use std::{
    net::{Ipv4Addr, UdpSocket},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};

use crate::ns::Netns;

/// Sends one 16-byte datagram to each of `dst:first_port .. first_port+n`
/// from inside `ns`: `n` new conntrack flows.
pub fn send_udp_flows(ns: &Netns, dst: Ipv4Addr, first_port: u16, n: u16) -> Result<Vec<u16>> {
    let last = first_port
        .checked_add(n)
        .ok_or_else(|| anyhow!("port overflow"))?;
    send_udp(ns, dst, (first_port..last).collect())
}

/// Sends one 16-byte datagram to each `dst:port` in `dports` from inside
/// `ns`, each from its own socket. The sockets stay open until all are
/// sent, so every datagram has a distinct source port (a new flow even
/// when ports repeat). Returns those source ports, in order.
pub fn send_udp(ns: &Netns, dst: Ipv4Addr, dports: Vec<u16>) -> Result<Vec<u16>> {
    ns.run_in(move || {
        let mut socks = Vec::with_capacity(dports.len());
        for port in dports {
            let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
            sock.send_to(b"ctdrop-tests udp", (dst, port))
                .with_context(|| format!("sending to {dst}:{port}"))?;
            socks.push(sock);
        }
        socks.iter().map(|s| Ok(s.local_addr()?.port())).collect()
    })
}

/// UDP sockets bound inside a namespace, one per port, to tell which
/// datagrams arrived (and so were not dropped on the way in).
pub struct UdpSink {
    socks: Vec<(u16, UdpSocket)>,
}

impl UdpSink {
    /// Binds `addr:port` for each port, inside `ns`.
    pub fn bind(ns: &Netns, addr: Ipv4Addr, ports: Vec<u16>) -> Result<UdpSink> {
        let socks = ns.run_in(move || {
            ports
                .into_iter()
                .map(|p| {
                    let s = UdpSocket::bind((addr, p))
                        .with_context(|| format!("binding {addr}:{p}"))?;
                    s.set_nonblocking(true)?;
                    Ok((p, s))
                })
                .collect::<Result<Vec<_>>>()
        })?;
        Ok(UdpSink { socks })
    }

    /// Ports that received at least one datagram since the last call.
    pub fn received(&self) -> Vec<u16> {
        let mut buf = [0u8; 2048];
        let mut ports = Vec::new();
        for (port, sock) in &self.socks {
            let mut got = false;
            while sock.recv_from(&mut buf).is_ok() {
                got = true;
            }
            if got {
                ports.push(*port);
            }
        }
        ports
    }
}

/// One ICMP echo request and whether its reply came back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EchoProbe {
    pub id: u16,
    pub seq: u16,
    pub replied: bool,
}

/// Sends `count` ICMP echo requests from inside `ns` on a raw socket, with
/// ids `first_id + i` (so each is a new conntrack flow) and seq `i + 1`,
/// then waits up to `wait` for the replies.
pub fn ping(
    ns: &Netns,
    dst: Ipv4Addr,
    first_id: u16,
    count: u16,
    wait: Duration,
) -> Result<Vec<EchoProbe>> {
    ns.run_in(move || {
        // SAFETY: plain socket(2); checked, then owned.
        let fd = unsafe {
            libc::socket(
                libc::AF_INET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::IPPROTO_ICMP,
            )
        };
        if fd < 0 {
            bail!("raw ICMP socket: {}", std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh socket nobody else owns.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 50_000,
        };
        let tv_len = std::mem::size_of::<libc::timeval>() as libc::socklen_t;
        // SAFETY: SO_RCVTIMEO with a timeval of the length given.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const _ as *const libc::c_void,
                tv_len,
            )
        };
        // SAFETY: sockaddr_in is plain old data; all-zero is valid.
        let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        addr.sin_family = libc::AF_INET as libc::sa_family_t;
        addr.sin_addr.s_addr = u32::from_ne_bytes(dst.octets());
        let mut probes = Vec::new();
        for i in 0..count {
            let (id, seq) = (first_id.wrapping_add(i), i + 1);
            let pkt = echo_request(id, seq);
            // SAFETY: `pkt` and `addr` outlive the call; lengths are theirs.
            let sent = unsafe {
                libc::sendto(
                    sock.as_raw_fd(),
                    pkt.as_ptr() as *const libc::c_void,
                    pkt.len(),
                    0,
                    &addr as *const _ as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                )
            };
            if sent != pkt.len() as isize {
                bail!("sending echo request: {}", std::io::Error::last_os_error());
            }
            probes.push(EchoProbe {
                id,
                seq,
                replied: false,
            });
        }
        let deadline = Instant::now() + wait;
        let mut buf = [0u8; 1500];
        while Instant::now() < deadline && probes.iter().any(|p| !p.replied) {
            // SAFETY: `buf` is writable for its whole length.
            let n = unsafe {
                libc::recv(
                    sock.as_raw_fd(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                    0,
                )
            };
            if n <= 0 {
                continue; // timeout tick
            }
            let pkt = &buf[..n as usize];
            let ihl = ((pkt[0] & 0x0f) as usize) * 4;
            if pkt.len() < ihl + 8 || pkt[12..16] != dst.octets() || pkt[ihl] != 0 {
                continue; // not an echo reply from dst
            }
            let id = u16::from_be_bytes([pkt[ihl + 4], pkt[ihl + 5]]);
            let seq = u16::from_be_bytes([pkt[ihl + 6], pkt[ihl + 7]]);
            if let Some(p) = probes.iter_mut().find(|p| p.id == id && p.seq == seq) {
                p.replied = true;
            }
        }
        Ok(probes)
    })
}

/// An ICMP echo request with `id` and `seq`, checksummed.
pub fn echo_request(id: u16, seq: u16) -> Vec<u8> {
    let mut p = vec![8u8, 0, 0, 0];
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(b"ctdrop-tests pin");
    set_icmp_checksum(&mut p);
    p
}

/// Fills in the checksum (bytes 2-3, zero before) of the ICMP message `p`.
pub fn set_icmp_checksum(p: &mut [u8]) {
    let mut sum = 0u32;
    for c in p.chunks(2) {
        sum += u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    p[2..4].copy_from_slice(&(!(sum as u16)).to_be_bytes());
}

/// Sends `count` ARP requests for `target` out of `ifname` inside `ns`, as
/// `arping` would, from the calling thread: each one reaches the peer's
/// ARP handling before this returns (a veth hands it over in the sender's
/// own softirq). For tests that need a known number of non-IP packets at
/// a known time, which the neighbour code's timer-driven retries are not.
pub fn send_arp_requests(
    ns: &Netns,
    ifname: &str,
    sender: Ipv4Addr,
    target: Ipv4Addr,
    count: u32,
) -> Result<()> {
    const ETH_P_ARP: u16 = 0x0806;
    let ifname = ifname.to_string();
    ns.run_in(move || {
        // Any unicast source: the frames exist to be dropped. (The device's
        // own address is not in this thread's /sys, which shows the
        // namespace /sys was mounted in.)
        let mac = [0x02, 0, 0x5e, 0, 0x53, 0x01];
        let index = {
            let c = std::ffi::CString::new(ifname.clone())?;
            // SAFETY: a NUL-terminated name.
            unsafe { libc::if_nametoindex(c.as_ptr()) }
        };
        if index == 0 {
            bail!("no interface {ifname}");
        }
        // SAFETY: plain socket call; the descriptor is owned below.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                ETH_P_ARP.to_be() as i32,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("AF_PACKET socket");
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut frame = Vec::with_capacity(42);
        frame.extend_from_slice(&[0xff; 6]); // broadcast
        frame.extend_from_slice(&mac);
        frame.extend_from_slice(&ETH_P_ARP.to_be_bytes());
        frame.extend_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1]); // Ethernet/IPv4, request
        frame.extend_from_slice(&mac);
        frame.extend_from_slice(&sender.octets());
        frame.extend_from_slice(&[0; 6]);
        frame.extend_from_slice(&target.octets());
        // SAFETY: sockaddr_ll is plain data; all-zero is valid.
        let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        to.sll_family = libc::AF_PACKET as u16;
        to.sll_protocol = ETH_P_ARP.to_be();
        to.sll_ifindex = index as i32;
        to.sll_halen = 6;
        to.sll_addr[..6].copy_from_slice(&[0xff; 6]);
        for _ in 0..count {
            // SAFETY: frame and address outlive the call; lengths are theirs.
            let n = unsafe {
                libc::sendto(
                    sock.as_raw_fd(),
                    frame.as_ptr().cast(),
                    frame.len(),
                    0,
                    (&to as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            if n != frame.len() as isize {
                return Err(std::io::Error::last_os_error()).context("sending an ARP request");
            }
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_checksum_verifies() {
        let p = echo_request(0x1234, 7);
        let mut sum = 0u32;
        for c in p.chunks(2) {
            sum += u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32;
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        assert_eq!(sum, 0xffff);
    }
}
