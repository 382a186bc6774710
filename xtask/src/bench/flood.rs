//! The flood: UDP datagrams sent with `sendmmsg` from inside the sender
//! namespace, each to a destination port the receiver has not seen recently,
//! so each one needs a new conntrack entry. With the receiver's table full,
//! every datagram takes the "table full, dropping packet" path.

use std::{
    net::Ipv4Addr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use super::STOP;

/// Datagrams per `sendmmsg` call: big enough that the syscall cost vanishes
/// next to the per-packet path we measure.
const BATCH: usize = 64;
const PAYLOAD: &[u8] = b"ctdrop-bench";
/// Destination ports FIRST_PORT..=65535: 64512 of them, a multiple of
/// BATCH, so a batch never straddles a change of source socket.
const FIRST_PORT: u16 = 1024;
const _: () = assert!((65536 - FIRST_PORT as usize).is_multiple_of(BATCH));

/// Distinct flows one source socket opens before its ports repeat.
pub const FLOWS_PER_SOCKET: u64 = 65536 - FIRST_PORT as u64;

#[derive(Clone, Debug)]
pub struct FloodSpec {
    pub dst: Ipv4Addr,
    /// Each socket has its own source port: sockets x 65535 destination
    /// ports is how many distinct flows the flood can open.
    pub sockets: usize,
    pub duration: Duration,
    /// Stop after this many datagrams (scale runs want an exact count).
    pub max_packets: Option<u64>,
    /// Pin the sending thread: the whole receive path (veth, netfilter,
    /// the tracer's kernel program) runs in softirq on the sender's CPU.
    pub cpu: Option<usize>,
}

#[derive(Clone, Copy, Debug)]
pub struct FloodResult {
    pub sent: u64,
    pub elapsed: Duration,
}

/// Runs the flood on a thread that has entered the namespace at `netns`.
pub fn run(netns: &Path, spec: &FloodSpec) -> Result<FloodResult> {
    let ns = std::fs::File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
    let spec = spec.clone();
    std::thread::spawn(move || -> Result<FloodResult> {
        ctlab::enter_file(&ns).context("entering the sender namespace")?;
        if let Some(cpu) = spec.cpu {
            pin(cpu)?;
        }
        send(&spec)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("flood thread panicked"))?
}

fn pin(cpu: usize) -> Result<()> {
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    unsafe { libc::CPU_SET(cpu, &mut set) };
    if unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) } != 0 {
        bail!(
            "pinning the flood to CPU {cpu}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

fn udp_socket() -> Result<OwnedFd> {
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        bail!("socket: {}", std::io::Error::last_os_error());
    }
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // Bound to an ephemeral port now, so every socket's source port differs.
    let any = sockaddr(Ipv4Addr::UNSPECIFIED, 0);
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            &any as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        )
    };
    if rc != 0 {
        bail!("bind: {}", std::io::Error::last_os_error());
    }
    Ok(fd)
}

fn sockaddr(ip: Ipv4Addr, port: u16) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(ip.octets()),
        },
        sin_zero: [0; 8],
    }
}

fn send(spec: &FloodSpec) -> Result<FloodResult> {
    let sockets: Vec<OwnedFd> = (0..spec.sockets.max(1))
        .map(|_| udp_socket())
        .collect::<Result<_>>()?;
    let mut addrs = [sockaddr(spec.dst, 1); BATCH];
    let mut iov = libc::iovec {
        iov_base: PAYLOAD.as_ptr() as *mut _,
        iov_len: PAYLOAD.len(),
    };
    let mut msgs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
    for (m, a) in msgs.iter_mut().zip(addrs.iter_mut()) {
        m.msg_hdr.msg_name = a as *mut _ as *mut libc::c_void;
        m.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as u32;
        m.msg_hdr.msg_iov = &mut iov;
        m.msg_hdr.msg_iovlen = 1;
    }
    let limit = spec.max_packets.unwrap_or(u64::MAX);
    let mut port: u16 = FIRST_PORT;
    let mut sock = 0usize;
    let mut sent = 0u64;
    let start = Instant::now();
    while sent < limit && start.elapsed() < spec.duration && !STOP.load(Ordering::Relaxed) {
        let n = (limit - sent).min(BATCH as u64) as usize;
        let fd = sockets[sock].as_raw_fd();
        for m in msgs.iter_mut().take(n) {
            unsafe { (*(m.msg_hdr.msg_name as *mut libc::sockaddr_in)).sin_port = port.to_be() };
            port = port.wrapping_add(1);
        }
        if port < FIRST_PORT {
            // Every destination port used from this source port: the next
            // socket's source port makes them new flows again.
            port = FIRST_PORT;
            sock = (sock + 1) % sockets.len();
        }
        let rc = unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr(), n as u32, 0) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                // A full socket buffer or a transient neighbour state: try again.
                Some(libc::EAGAIN) | Some(libc::ENOBUFS) | Some(libc::EINTR) => continue,
                _ => bail!("sendmmsg: {e}"),
            }
        }
        sent += rc as u64;
    }
    Ok(FloodResult {
        sent,
        elapsed: start.elapsed(),
    })
}
