//! A minimal NFQUEUE listener (nfnetlink_queue over a raw netlink socket):
//! just enough to hold packets in a queue and let them go in an order the
//! test chooses. Used to make conntrack insert clashes happen on purpose
//! (see `clash::held_clashes`) where racing two CPUs is left to chance.

use std::io;

use anyhow::{anyhow, Context, Result};
use netlink_packet_core::{NetlinkBuffer, NlasIterator, NLMSG_ERROR, NLM_F_ACK, NLM_F_REQUEST};

const NETLINK_NETFILTER: i32 = 12;
const NFNL_SUBSYS_QUEUE: u16 = 3;
const NFQNL_MSG_PACKET: u16 = 0;
const NFQNL_MSG_VERDICT: u16 = 1;
const NFQNL_MSG_CONFIG: u16 = 2;
const NFQA_PACKET_HDR: u16 = 1;
const NFQA_VERDICT_HDR: u16 = 2;
const NFQA_CFG_CMD: u16 = 1;
const NFQA_CFG_PARAMS: u16 = 2;
const NFQNL_CFG_CMD_BIND: u8 = 1;
const NFQNL_COPY_META: u8 = 1;
/// `NF_DROP`: the queue refuses the packet (`nf_reinject` frees it).
pub const NF_DROP: u32 = 0;
/// `NF_ACCEPT`: the packet goes on to the hooks after the queueing rule.
pub const NF_ACCEPT: u32 = 1;

/// A bound queue. Closing the socket unbinds it; packets still held are
/// then dropped by the kernel, so a test lets every packet go first.
pub struct Queue {
    fd: i32,
    num: u16,
    seq: u32,
}

impl Drop for Queue {
    fn drop(&mut self) {
        // SAFETY: `fd` is ours and closed once.
        unsafe { libc::close(self.fd) };
    }
}

fn attr(buf: &mut Vec<u8>, ty: u16, payload: &[u8]) {
    buf.extend_from_slice(&(4 + payload.len() as u16).to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(payload);
    while !buf.len().is_multiple_of(4) {
        buf.push(0);
    }
}

impl Queue {
    /// Binds queue `num` in the calling thread's network namespace
    /// (netlink sockets belong to the namespace they were made in).
    pub fn bind(num: u16) -> Result<Self> {
        // SAFETY: plain socket(2).
        let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW, NETLINK_NETFILTER) };
        if fd < 0 {
            return Err(io::Error::last_os_error()).context("netlink socket");
        }
        let mut q = Queue { fd, num, seq: 0 };
        let mut a = Vec::new();
        attr(
            &mut a,
            NFQA_CFG_CMD,
            &[NFQNL_CFG_CMD_BIND, 0, 0, libc::AF_INET as u8],
        );
        q.request(NFQNL_MSG_CONFIG, &a)
            .with_context(|| format!("binding NFQUEUE {num}"))?;
        let mut a = Vec::new();
        // copy_range (be32), copy_mode: ids and metadata only.
        attr(&mut a, NFQA_CFG_PARAMS, &[0, 0, 0, 0, NFQNL_COPY_META]);
        q.request(NFQNL_MSG_CONFIG, &a)
            .with_context(|| format!("setting NFQUEUE {num} to metadata only"))?;
        Ok(q)
    }

    fn message(&mut self, ty: u16, flags: u16, attrs: &[u8]) -> Vec<u8> {
        self.seq += 1;
        let len = 16 + 4 + attrs.len();
        let mut m = Vec::with_capacity(len);
        m.extend_from_slice(&(len as u32).to_ne_bytes());
        m.extend_from_slice(&((NFNL_SUBSYS_QUEUE << 8) | ty).to_ne_bytes());
        m.extend_from_slice(&flags.to_ne_bytes());
        m.extend_from_slice(&self.seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        // nfgenmsg: family, version, queue number (big endian).
        m.extend_from_slice(&[libc::AF_UNSPEC as u8, 0]);
        m.extend_from_slice(&self.num.to_be_bytes());
        m.extend_from_slice(attrs);
        m
    }

    fn send(&self, m: &[u8]) -> Result<()> {
        let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        sa.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: `m` and `sa` are live for the call.
        let n = unsafe {
            libc::sendto(
                self.fd,
                m.as_ptr().cast(),
                m.len(),
                0,
                (&sa as *const libc::sockaddr_nl).cast(),
                std::mem::size_of_val(&sa) as u32,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error()).context("netlink send");
        }
        Ok(())
    }

    /// Sends a request and waits for its acknowledgement.
    fn request(&mut self, ty: u16, attrs: &[u8]) -> Result<()> {
        let m = self.message(ty, NLM_F_REQUEST | NLM_F_ACK, attrs);
        self.send(&m)?;
        let seq = self.seq;
        loop {
            for (ty, mseq, body) in self.recv()? {
                if ty == NLMSG_ERROR && mseq == seq {
                    let err = i32::from_ne_bytes(body[..4].try_into().unwrap());
                    if err != 0 {
                        return Err(io::Error::from_raw_os_error(-err).into());
                    }
                    return Ok(());
                }
            }
        }
    }

    /// One datagram of netlink messages: (type, seq, body after the header).
    fn recv(&self) -> Result<Vec<(u16, u32, Vec<u8>)>> {
        let mut buf = vec![0u8; 65536];
        // SAFETY: `buf` is live and as long as said.
        let n = unsafe { libc::recv(self.fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error()).context("netlink recv");
        }
        let mut out = Vec::new();
        let mut at = 0usize;
        let n = n as usize;
        while at < n {
            let msg = NetlinkBuffer::new_checked(&buf[at..n])
                .map_err(|e| anyhow!("malformed netlink message at {at} of {n}: {e}"))?;
            out.push((
                msg.message_type(),
                msg.sequence_number(),
                msg.payload().to_vec(),
            ));
            at += (msg.length() as usize + 3) & !3;
        }
        Ok(out)
    }

    /// Waits until `n` packets are held and returns their ids, in the
    /// order they were queued.
    pub fn held(&self, n: usize) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        while ids.len() < n {
            for (ty, _, body) in self.recv()? {
                if ty != (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET {
                    continue;
                }
                // After the 4-byte nfgenmsg, attributes.
                for a in NlasIterator::new(body.get(4..).unwrap_or(&[])) {
                    let a = a.map_err(|e| anyhow!("malformed NFQUEUE attribute: {e}"))?;
                    if a.kind() == NFQA_PACKET_HDR && a.value().len() >= 4 {
                        ids.push(u32::from_be_bytes(a.value()[..4].try_into().unwrap()));
                    }
                }
            }
        }
        Ok(ids)
    }

    /// Lets packet `id` go with `verdict`.
    pub fn verdict(&mut self, id: u32, verdict: u32) -> Result<()> {
        let mut p = Vec::new();
        p.extend_from_slice(&verdict.to_be_bytes());
        p.extend_from_slice(&id.to_be_bytes());
        let mut a = Vec::new();
        attr(&mut a, NFQA_VERDICT_HDR, &p);
        // Acknowledged, so that a verdict the kernel refused is an error
        // here rather than a packet silently dropped at unbind.
        self.request(NFQNL_MSG_VERDICT, &a)
            .with_context(|| format!("verdict for queued packet {id}"))
    }
}
