//! The ctnetlink dump (the request `conntrack -L` makes) of the calling
//! thread's namespace, read and parsed on two threads.

use std::sync::mpsc;

use anyhow::{anyhow, bail, Context, Result};
use netlink_packet_core::{
    NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload, NLMSG_DONE, NLMSG_ERROR,
    NLMSG_OVERRUN, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_netfilter::{
    conntrack::ConntrackMessage, NetfilterHeader, NetfilterMessage, NetfilterProtoFamily,
};

use super::entry::CtEntry;

/// CPU time of the calling thread, in ns.
pub(super) fn thread_cpu_ns() -> u64 {
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW: one entry of a dump.
pub(super) const CT_NEW_MSG: u16 = 1 << 8;
pub(super) const NFGENMSG_LEN: usize = 4;

/// Dumps the conntrack table of the calling thread's network namespace,
/// handing each entry to `visit`. Returns how many dumped messages could
/// not be read as entries (never silently zero when there were some) and
/// the CPU time of the parsing thread.
///
/// The kernel fills each read (about half the work), a second thread
/// parses and counts the previous one, so the two halves overlap.
pub fn dump(mut visit: impl FnMut(CtEntry) + Send) -> Result<(u64, u64)> {
    let socket = request_dump()?;
    const BUFS: usize = 8;
    // Netlink dumps come in reads of at most 32 KiB.
    const BUF_LEN: usize = 64 << 10;
    let (full_tx, full_rx) = mpsc::sync_channel::<(Vec<u8>, usize)>(BUFS);
    let (empty_tx, empty_rx) = mpsc::channel::<Vec<u8>>();
    for _ in 0..BUFS {
        let _ = empty_tx.send(vec![0u8; BUF_LEN]);
    }
    std::thread::scope(|scope| {
        let parser = scope.spawn(move || -> Result<(u64, u64)> {
            let cpu = thread_cpu_ns();
            let mut unreadable = 0u64;
            for (buf, n) in full_rx {
                if parse_chunk(&buf[..n], &mut visit, &mut unreadable)? {
                    return Ok((unreadable, thread_cpu_ns().saturating_sub(cpu)));
                }
                let _ = empty_tx.send(buf);
            }
            bail!("conntrack dump ended without its end marker")
        });
        let mut read_error = None;
        // Ends when the parser is done (or failed) and stops returning buffers.
        while let Ok(mut buf) = empty_rx.recv() {
            match socket.recv(&mut &mut buf[..], 0) {
                Ok(0) => break,
                Ok(n) => {
                    let last = chunk_is_last(&buf[..n]);
                    if full_tx.send((buf, n)).is_err() || last {
                        break;
                    }
                }
                Err(e) => {
                    read_error = Some(e);
                    break;
                }
            }
        }
        drop(full_tx);
        let parsed = parser
            .join()
            .map_err(|_| anyhow!("conntrack dump parser panicked"))?;
        match (parsed, read_error) {
            (Ok(n), _) => Ok(n),
            (Err(_), Some(e)) => Err(anyhow!(e).context("reading the conntrack dump")),
            (Err(e), None) => Err(e),
        }
    })
}

fn request_dump() -> Result<netlink_sys::Socket> {
    use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};

    let mut socket =
        Socket::new(NETLINK_NETFILTER).context("opening a netfilter netlink socket")?;
    // Room for the kernel to run ahead of us while we parse.
    let _ = socket.set_rx_buf_sz(4 << 20);
    socket
        .bind_auto()
        .context("binding the netfilter netlink socket")?;
    socket
        .connect(&SocketAddr::new(0, 0))
        .context("connecting the netfilter netlink socket")?;
    let mut hdr = NetlinkHeader::default();
    hdr.flags = NLM_F_REQUEST | NLM_F_DUMP;
    hdr.sequence_number = 1;
    // Unspec: every address family in one dump.
    let mut req = NetlinkMessage::new(
        hdr,
        NetlinkPayload::from(NetfilterMessage::new(
            NetfilterHeader::new(NetfilterProtoFamily::Unspec, 0, 0),
            ConntrackMessage::Get(vec![]),
        )),
    );
    req.finalize();
    let mut buf = vec![0u8; req.buffer_len()];
    req.serialize(&mut buf);
    socket
        .send(&buf, 0)
        .context("sending the conntrack dump request")?;
    Ok(socket)
}

/// Whether a read holds the dump's end (or an error that ends it): only
/// the message headers are looked at.
pub(super) fn chunk_is_last(buf: &[u8]) -> bool {
    let mut off = 0;
    while let Ok(msg) = NetlinkBuffer::new_checked(&buf[off..]) {
        if matches!(msg.message_type(), NLMSG_DONE | NLMSG_ERROR | NLMSG_OVERRUN) {
            return true;
        }
        let len = msg.length() as usize;
        if len == 0 {
            return true;
        }
        off += align4(len);
        if off >= buf.len() {
            break;
        }
    }
    false
}

/// The error an `NLMSG_ERROR` message carries; `None` for its code 0, the
/// acknowledgement that ends a request (ctnetlink and nf_tables alike).
pub(super) fn nlmsg_error(payload: &[u8]) -> Option<std::io::Error> {
    let code = payload
        .get(..4)
        .map(|b| i32::from_ne_bytes(b.try_into().unwrap()))
        .unwrap_or(0);
    (code != 0).then(|| std::io::Error::from_raw_os_error(-code))
}

/// Parses one read of the dump; true at its end.
pub(super) fn parse_chunk(
    buf: &[u8],
    visit: &mut impl FnMut(CtEntry),
    unreadable: &mut u64,
) -> Result<bool> {
    let mut off = 0;
    while off < buf.len() {
        let msg = NetlinkBuffer::new_checked(&buf[off..])
            .map_err(|e| anyhow!("malformed netlink message in the conntrack dump: {e}"))?;
        let len = msg.length() as usize;
        match msg.message_type() {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => {
                if let Some(e) = nlmsg_error(msg.payload()) {
                    bail!("the kernel refused the conntrack dump: {e}");
                }
                return Ok(true);
            }
            NLMSG_OVERRUN => bail!("conntrack dump overran the receive buffer"),
            CT_NEW_MSG => match msg
                .payload()
                .get(NFGENMSG_LEN..)
                .and_then(CtEntry::from_nlas)
            {
                Some(e) => visit(e),
                None => *unreadable += 1,
            },
            _ => *unreadable += 1,
        }
        if len == 0 {
            bail!("malformed netlink message in the conntrack dump: zero length");
        }
        off += align4(len);
    }
    Ok(false)
}

pub(super) fn align4(n: usize) -> usize {
    (n + 3) & !3
}
