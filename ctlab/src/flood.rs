//! Floods from a sender namespace: as many new flows per second as one
//! thread can push through `sendmmsg`, for tests that need the kernel to
//! out-run ctdrop (lost events, memory under load, shutdown under load).
//!
//! Every packet is a new conntrack flow, so into a full table each one is a
//! `conntrack_table_full` drop. The kernel's own counters say how many were
//! dropped; the sender's count is only informative.

use std::{
    net::Ipv4Addr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
};

use anyhow::{anyhow, bail, Result};

use crate::{ns::spawn_in, traffic::echo_request, Netns};

/// Messages per `sendmmsg` call.
const BATCH: usize = 64;
/// UDP source sockets the flood rotates through: each source port can only
/// make 64k flows (one per destination port), and ctdrop's flow table
/// holds 100k by default, so a flood must be able to go past it.
const UDP_SOURCES: usize = 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FloodKind {
    /// UDP datagrams, a new destination port (1024..=65535) per datagram.
    Udp,
    /// ICMP echo requests on a raw socket, a new id per request.
    Echo,
}

/// A flood running on its own thread inside a namespace.
pub struct Flood {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Result<u64>>>,
}

impl Flood {
    /// Floods `dst` from inside `ns` until [`Flood::stop`], or until
    /// `limit` packets went out when given.
    pub fn start(ns: &Netns, dst: Ipv4Addr, kind: FloodKind, limit: Option<u64>) -> Result<Flood> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = spawn_in(&ns.path(), "ctlab-flood", move || match kind {
            FloodKind::Udp => flood_udp(dst, &flag, limit),
            FloodKind::Echo => flood_echo(dst, &flag, limit),
        })?;
        Ok(Flood {
            stop,
            handle: Some(handle),
        })
    }

    /// Stops the flood; the number of packets the kernel accepted to send.
    pub fn stop(mut self) -> Result<u64> {
        self.stop.store(true, Ordering::Relaxed);
        self.join()
    }

    /// Waits for a flood started with a `limit` to send all of it.
    pub fn wait(mut self) -> Result<u64> {
        self.join()
    }

    fn join(&mut self) -> Result<u64> {
        self.handle
            .take()
            .unwrap()
            .join()
            .map_err(|_| anyhow!("flood thread panicked"))?
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn sockaddr(dst: Ipv4Addr, port: u16) -> libc::sockaddr_in {
    // SAFETY: sockaddr_in is plain old data; all-zero is valid.
    let mut a: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    a.sin_family = libc::AF_INET as libc::sa_family_t;
    a.sin_port = port.to_be();
    a.sin_addr.s_addr = u32::from_ne_bytes(dst.octets());
    a
}

fn socket(ty: i32, proto: i32) -> Result<OwnedFd> {
    // SAFETY: plain socket(2); checked, then owned.
    let fd = unsafe { libc::socket(libc::AF_INET, ty | libc::SOCK_CLOEXEC, proto) };
    if fd < 0 {
        bail!("socket: {}", std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// One `sendmmsg` of `payloads[i]` to `addrs[i]`; how many went out. A
/// full device queue (ENOBUFS) or socket buffer (EAGAIN) is not an error:
/// those packets just never reach conntrack.
fn send_batch(
    fd: &OwnedFd,
    payloads: &mut [Vec<u8>],
    addrs: &mut [libc::sockaddr_in],
) -> Result<u64> {
    let mut iovs: Vec<libc::iovec> = payloads
        .iter_mut()
        .map(|p| libc::iovec {
            iov_base: p.as_mut_ptr() as *mut libc::c_void,
            iov_len: p.len(),
        })
        .collect();
    let mut msgs: Vec<libc::mmsghdr> = iovs
        .iter_mut()
        .zip(addrs.iter_mut())
        .map(|(iov, addr)| {
            // SAFETY: msghdr is plain old data; all-zero is valid.
            let mut h: libc::msghdr = unsafe { std::mem::zeroed() };
            h.msg_name = addr as *mut _ as *mut libc::c_void;
            h.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            h.msg_iov = iov;
            h.msg_iovlen = 1;
            libc::mmsghdr {
                msg_hdr: h,
                msg_len: 0,
            }
        })
        .collect();
    // SAFETY: every header points into `payloads`/`addrs`, alive for the call.
    let n = unsafe { libc::sendmmsg(fd.as_raw_fd(), msgs.as_mut_ptr(), msgs.len() as u32, 0) };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENOBUFS) | Some(libc::EAGAIN) => Ok(0),
            _ => Err(anyhow!("sendmmsg: {e}")),
        };
    }
    Ok(n as u64)
}

fn flood_udp(dst: Ipv4Addr, stop: &AtomicBool, limit: Option<u64>) -> Result<u64> {
    let socks = (0..UDP_SOURCES)
        .map(|_| socket(libc::SOCK_DGRAM, 0))
        .collect::<Result<Vec<_>>>()?;
    let mut payloads = vec![b"ctdrop-tests fld".to_vec(); BATCH];
    // Each socket walks the destination ports on its own: one shared walk
    // with 64 ports a batch gives every socket the same ports (64,512 / 64 is
    // a multiple of 4), so the flood made only 64,512 distinct flows.
    let mut ports = [1024u16; UDP_SOURCES];
    let (mut sent, mut round) = (0u64, 0usize);
    while !stop.load(Ordering::Relaxed) && limit.is_none_or(|l| sent < l) {
        let n = limit.map_or(BATCH, |l| BATCH.min((l - sent) as usize));
        let port = &mut ports[round % UDP_SOURCES];
        let mut addrs: Vec<libc::sockaddr_in> = (0..n)
            .map(|_| {
                *port = if *port == u16::MAX { 1024 } else { *port + 1 };
                sockaddr(dst, *port)
            })
            .collect();
        sent += send_batch(&socks[round % UDP_SOURCES], &mut payloads[..n], &mut addrs)?;
        round += 1;
    }
    Ok(sent)
}

fn flood_echo(dst: Ipv4Addr, stop: &AtomicBool, limit: Option<u64>) -> Result<u64> {
    let sock = socket(libc::SOCK_RAW, libc::IPPROTO_ICMP)?;
    let mut id: u32 = 0;
    let mut sent = 0u64;
    while !stop.load(Ordering::Relaxed) && limit.is_none_or(|l| sent < l) {
        let n = limit.map_or(BATCH, |l| BATCH.min((l - sent) as usize));
        let mut payloads: Vec<Vec<u8>> = (0..n)
            .map(|_| {
                id = id.wrapping_add(1);
                // A new id is a new conntrack flow; seq says how often the id wrapped.
                echo_request(id as u16, (id >> 16) as u16)
            })
            .collect();
        let mut addrs = vec![sockaddr(dst, 0); n];
        sent += send_batch(&sock, &mut payloads, &mut addrs)?;
    }
    Ok(sent)
}
