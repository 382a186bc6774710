//! Whether a namespace has NAT rules, asked the way the kernel answers
//! (netlink, procfs), without starting a program.

use anyhow::{anyhow, bail, Context, Result};
use netlink_packet_core::{
    NetlinkBuffer, NlasIterator, NLMSG_DONE, NLMSG_ERROR, NLM_F_DUMP, NLM_F_REQUEST,
};

use super::dump::{align4, nlmsg_error, NFGENMSG_LEN};

/// Whether the calling thread's namespace has NAT rules: an nf_tables
/// chain of type `nat` (nft, and iptables-nft once its nat table has a
/// rule), or a legacy iptables `nat` table. Asked over netlink and procfs:
/// ctdrop starts no programs. None when neither could be asked.
pub fn nat_rules_here() -> Option<bool> {
    let legacy = std::fs::read_to_string("/proc/thread-self/net/ip_tables_names")
        .ok()
        .map(|s| s.lines().any(|l| l.trim() == "nat"));
    let nft = nft_has_nat_chain().ok();
    match (legacy, nft) {
        (None, None) => None,
        (a, b) => Some(a.unwrap_or(false) || b.unwrap_or(false)),
    }
}

/// (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETCHAIN, and the NEWCHAIN replies.
const NFT_GET_CHAIN: u16 = (10 << 8) | 4;
const NFT_NEW_CHAIN: u16 = (10 << 8) | 3;
const NFTA_CHAIN_TYPE: u16 = 7;

fn nft_has_nat_chain() -> Result<bool> {
    use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};

    let mut socket =
        Socket::new(NETLINK_NETFILTER).context("opening a netfilter netlink socket")?;
    socket
        .bind_auto()
        .context("binding the netfilter netlink socket")?;
    socket
        .connect(&SocketAddr::new(0, 0))
        .context("connecting the netfilter netlink socket")?;
    // nlmsghdr, then nfgenmsg: family unspec (every family), version 0.
    let mut req = Vec::with_capacity(20);
    req.extend_from_slice(&20u32.to_ne_bytes());
    req.extend_from_slice(&NFT_GET_CHAIN.to_ne_bytes());
    req.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    req.extend_from_slice(&1u32.to_ne_bytes());
    req.extend_from_slice(&0u32.to_ne_bytes());
    req.extend_from_slice(&[0, 0, 0, 0]);
    socket
        .send(&req, 0)
        .context("asking for nf_tables chains")?;
    let mut nat = false;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = socket
            .recv(&mut &mut buf[..], 0)
            .context("reading nf_tables chains")?;
        let mut off = 0;
        while off < n {
            let msg = NetlinkBuffer::new_checked(&buf[off..n])
                .map_err(|e| anyhow!("malformed netlink message: {e}"))?;
            match msg.message_type() {
                NLMSG_DONE => return Ok(nat),
                NLMSG_ERROR => {
                    if let Some(e) = nlmsg_error(msg.payload()) {
                        bail!("nf_tables refused: {e}");
                    }
                    return Ok(nat);
                }
                NFT_NEW_CHAIN => {
                    let attrs = msg.payload().get(NFGENMSG_LEN..).unwrap_or(&[]);
                    for a in NlasIterator::new(attrs).flatten() {
                        if a.kind() == NFTA_CHAIN_TYPE
                            && a.value().split(|b| *b == 0).next() == Some(b"nat")
                        {
                            nat = true;
                        }
                    }
                }
                _ => {}
            }
            let len = msg.length() as usize;
            if len == 0 {
                bail!("malformed netlink message: zero length");
            }
            off += align4(len);
        }
        if n == 0 {
            bail!("nf_tables chain dump ended without its end marker");
        }
    }
}
