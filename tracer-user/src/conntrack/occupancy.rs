//! Who holds a namespace's conntrack table: a snapshot of its entries,
//! summarized by protocol and state, by liveness (UNREPLIED entries are the
//! ones the kernel may evict, ASSURED ones never are), and by the sources,
//! destinations and destination ports that hold the most entries.
//!
//! The snapshot is a ctnetlink dump, the request `conntrack -L` makes,
//! through the rust-netlink `netlink-packet-netfilter` crate. Not
//! `/proc/net/nf_conntrack`: that file only exists on kernels built with
//! CONFIG_NF_CONNTRACK_PROCFS (not this one, and not most distribution
//! kernels since 5.x), and it is text the kernel formats per entry, slower
//! to produce and to parse than the binary dump. ctnetlink answers for the
//! namespace of the socket, so the dump runs on a thread inside it.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    path::{Path, PathBuf},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use netlink_packet_core::{
    NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload, NlaBuffer, NlasIterator,
    NLMSG_DONE, NLMSG_ERROR, NLMSG_OVERRUN, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_netfilter::{
    conntrack::{ConntrackMessage, Status},
    NetfilterHeader, NetfilterMessage, NetfilterProtoFamily,
};
use serde::{Deserialize, Serialize};

use crate::events::decode::proto_name;

/// Rows kept in each top list.
pub const TOP_N: usize = 5;

/// One conntrack entry as far as occupancy cares: its original direction,
/// its TCP state and its status bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtEntry {
    pub proto: u8,
    pub src: IpAddr,
    pub dst: IpAddr,
    /// TCP/UDP/SCTP ports of the original direction; 0 otherwise.
    pub sport: u16,
    pub dport: u16,
    pub tcp_state: Option<u8>,
    pub status: u32,
}

/// Whether an entry has seen its peer answer, and whether it is protected
/// from early eviction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Liveness {
    /// One direction only: evictable when the table is full.
    Unreplied,
    /// Answered but not (yet) assured.
    Replied,
    /// Both directions seen long enough: never evicted early.
    Assured,
}

impl Liveness {
    pub fn as_str(self) -> &'static str {
        match self {
            Liveness::Unreplied => "UNREPLIED",
            Liveness::Replied => "REPLIED",
            Liveness::Assured => "ASSURED",
        }
    }
}

impl CtEntry {
    pub fn liveness(&self) -> Liveness {
        let s = Status::from_bits_retain(self.status);
        if s.contains(Status::Assured) {
            Liveness::Assured
        } else if s.contains(Status::SeenReply) {
            Liveness::Replied
        } else {
            Liveness::Unreplied
        }
    }

    pub fn natted(&self) -> bool {
        Status::from_bits_retain(self.status).intersects(Status::NatMask)
    }

    /// What `conntrack -L` shows as the state: the TCP state for TCP,
    /// the liveness for protocols without states.
    pub fn state_label(&self) -> &'static str {
        match self.tcp_state {
            Some(s) => tcp_state_name(s),
            None => self.liveness().as_str(),
        }
    }

    /// Reads the fields we need out of one dumped entry's attributes (the
    /// payload after the netfilter header), without allocating: a full
    /// table is 262144 of these.
    pub fn from_nlas(attrs: &[u8]) -> Option<CtEntry> {
        let (mut orig, mut status, mut tcp_state) = (None, 0u32, None);
        for nla in NlasIterator::new(attrs) {
            let nla = nla.ok()?;
            match nla.kind() {
                CTA_TUPLE_ORIG => orig = Some(owned_value(nla)),
                CTA_STATUS => status = u32::from_be_bytes(nla.value().get(..4)?.try_into().ok()?),
                CTA_PROTOINFO => {
                    for info in NlasIterator::new(nla.value()).flatten() {
                        if info.kind() != CTA_PROTOINFO_TCP {
                            continue;
                        }
                        for t in NlasIterator::new(info.value()).flatten() {
                            if t.kind() == CTA_PROTOINFO_TCP_STATE {
                                tcp_state = t.value().first().copied();
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        let (mut src, mut dst, mut proto, mut sport, mut dport) = (None, None, None, 0, 0);
        for part in NlasIterator::new(orig?) {
            let part = part.ok()?;
            match part.kind() {
                CTA_TUPLE_IP => {
                    for ip in NlasIterator::new(part.value()) {
                        let ip = ip.ok()?;
                        let v = ip.value();
                        let addr = match ip.kind() {
                            CTA_IP_V4_SRC | CTA_IP_V4_DST => {
                                IpAddr::from(<[u8; 4]>::try_from(v.get(..4)?).ok()?)
                            }
                            CTA_IP_V6_SRC | CTA_IP_V6_DST => {
                                IpAddr::from(<[u8; 16]>::try_from(v.get(..16)?).ok()?)
                            }
                            _ => continue,
                        };
                        if matches!(ip.kind(), CTA_IP_V4_SRC | CTA_IP_V6_SRC) {
                            src = Some(addr);
                        } else {
                            dst = Some(addr);
                        }
                    }
                }
                CTA_TUPLE_PROTO => {
                    for p in NlasIterator::new(part.value()) {
                        let p = p.ok()?;
                        let v = p.value();
                        match p.kind() {
                            CTA_PROTO_NUM => proto = v.first().copied(),
                            CTA_PROTO_SRC_PORT => {
                                sport = u16::from_be_bytes(v.get(..2)?.try_into().ok()?)
                            }
                            CTA_PROTO_DST_PORT => {
                                dport = u16::from_be_bytes(v.get(..2)?.try_into().ok()?)
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        let proto = proto?;
        Some(CtEntry {
            proto,
            src: src?,
            dst: dst?,
            sport,
            dport,
            tcp_state: if proto == 6 { tcp_state } else { None },
            status,
        })
    }
}

/// The value of an attribute, borrowed from the dump buffer rather than
/// from the attribute view.
fn owned_value(nla: NlaBuffer<&[u8]>) -> &[u8] {
    let len = nla.length() as usize;
    let b = nla.into_inner();
    b.get(4..len).unwrap_or(&[])
}

// Attribute numbers from uapi/linux/netfilter/nfnetlink_conntrack.h.
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_STATUS: u16 = 3;
const CTA_PROTOINFO: u16 = 4;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
const CTA_PROTOINFO_TCP: u16 = 1;
const CTA_PROTOINFO_TCP_STATE: u16 = 1;
/// (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW: one entry of a dump.
const CT_NEW_MSG: u16 = 1 << 8;
const NFGENMSG_LEN: usize = 4;

/// Names from the kernel's `enum tcp_conntrack`, as `conntrack -L` prints them.
pub fn tcp_state_name(s: u8) -> &'static str {
    match s {
        0 => "NONE",
        1 => "SYN_SENT",
        2 => "SYN_RECV",
        3 => "ESTABLISHED",
        4 => "FIN_WAIT",
        5 => "CLOSE_WAIT",
        6 => "LAST_ACK",
        7 => "TIME_WAIT",
        8 => "CLOSE",
        9 => "SYN_SENT2",
        _ => "UNKNOWN",
    }
}

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
fn chunk_is_last(buf: &[u8]) -> bool {
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

/// Parses one read of the dump; true at its end.
fn parse_chunk(buf: &[u8], visit: &mut impl FnMut(CtEntry), unreadable: &mut u64) -> Result<bool> {
    let mut off = 0;
    while off < buf.len() {
        let msg = NetlinkBuffer::new_checked(&buf[off..])
            .map_err(|e| anyhow!("malformed netlink message in the conntrack dump: {e}"))?;
        let len = msg.length() as usize;
        match msg.message_type() {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => {
                let code = msg
                    .payload()
                    .get(..4)
                    .map(|b| i32::from_ne_bytes(b.try_into().unwrap()))
                    .unwrap_or(0);
                if code != 0 {
                    bail!(
                        "the kernel refused the conntrack dump: {}",
                        std::io::Error::from_raw_os_error(-code)
                    );
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

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Entries per (protocol, state).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateRow {
    pub proto: String,
    /// Cow: a name from the tables here, or read back from a capture file.
    pub state: std::borrow::Cow<'static, str>,
    pub entries: u64,
    pub unreplied: u64,
    pub assured: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddrRow {
    pub addr: IpAddr,
    pub entries: u64,
    pub unreplied: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortRow {
    pub proto: String,
    /// Not in the JSON (`proto` names it); [`Occupancy::from_stored`] puts it back.
    #[serde(skip)]
    pub proto_num: u8,
    pub port: u16,
    pub entries: u64,
    pub unreplied: u64,
    pub assured: u64,
    /// Distinct sources in this port's entries (capped count, see builder).
    pub sources: u64,
}

/// What a snapshot found, ready to show (and, as JSON, stored in captures).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Occupancy {
    pub netns: Option<u32>,
    pub netns_name: Option<String>,
    pub entries: u64,
    /// Global `nf_conntrack_max` at the time of the snapshot.
    pub max: Option<u64>,
    pub unreplied: u64,
    pub replied: u64,
    pub assured: u64,
    /// Entries with source or destination NAT applied.
    pub nat: u64,
    /// Whether the namespace has NAT rules (iptables or nft); None when
    /// neither tool could tell.
    pub nat_rules: Option<bool>,
    pub unreadable: u64,
    pub by_proto_state: Vec<StateRow>,
    pub top_sources: Vec<AddrRow>,
    pub top_destinations: Vec<AddrRow>,
    pub top_dst_ports: Vec<PortRow>,
    /// Wall-clock (unix ns) when the dump started.
    pub taken_ns: u64,
    pub elapsed_ms: f64,
    /// CPU time of the dump and summary (kernel and user): the part that
    /// does not depend on how busy the host is.
    pub cpu_ms: f64,
}

#[derive(Default)]
struct PortAcc {
    entries: u64,
    unreplied: u64,
    assured: u64,
    sources: FastSet<IpAddr>,
    last_source: Option<IpAddr>,
}

type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
type FastSet<T> = std::collections::HashSet<T, foldhash::fast::RandomState>;

/// Distinct sources tracked per port: enough to tell "one client" from
/// "many"; a flood from a /8 must not cost memory per address.
const SOURCES_PER_PORT: usize = 64;

/// Row of the state table: TCP states by number, then the liveness of
/// stateless protocols.
fn state_slot(e: &CtEntry) -> usize {
    match e.tcp_state {
        Some(s) => s.min(15) as usize,
        None => 16 + e.liveness() as usize,
    }
}

fn slot_label(slot: usize) -> &'static str {
    match slot {
        0..=15 => tcp_state_name(slot as u8),
        16 => Liveness::Unreplied.as_str(),
        17 => Liveness::Replied.as_str(),
        _ => Liveness::Assured.as_str(),
    }
}

/// Folds entries into counts; one pass, memory bounded by distinct keys.
/// Hashing is the cost that matters here (a full table is 262144 entries,
/// four lookups each), hence foldhash and an array for the states.
pub struct OccupancyBuilder {
    entries: u64,
    by_liveness: [u64; 3],
    nat: u64,
    /// [proto][slot][liveness]
    states: Vec<[[u64; 3]; 19]>,
    sources: FastMap<IpAddr, (u64, u64)>,
    dests: FastMap<IpAddr, (u64, u64)>,
    ports: FastMap<(u8, u16), PortAcc>,
}

impl Default for OccupancyBuilder {
    fn default() -> Self {
        OccupancyBuilder {
            entries: 0,
            by_liveness: [0; 3],
            nat: 0,
            states: vec![[[0; 3]; 19]; 256],
            sources: FastMap::default(),
            dests: FastMap::default(),
            ports: FastMap::default(),
        }
    }
}

impl OccupancyBuilder {
    pub fn add(&mut self, e: &CtEntry) {
        let live = e.liveness();
        let l = live as usize;
        let unreplied = (live == Liveness::Unreplied) as u64;
        self.entries += 1;
        self.by_liveness[l] += 1;
        self.nat += e.natted() as u64;
        self.states[e.proto as usize][state_slot(e)][l] += 1;
        let s = self.sources.entry(e.src).or_default();
        s.0 += 1;
        s.1 += unreplied;
        let d = self.dests.entry(e.dst).or_default();
        d.0 += 1;
        d.1 += unreplied;
        if has_ports(e.proto) {
            let p = self.ports.entry((e.proto, e.dport)).or_default();
            p.entries += 1;
            p.unreplied += unreplied;
            p.assured += (live == Liveness::Assured) as u64;
            // A flood repeats its source: skip the set when it does.
            if p.last_source != Some(e.src) && p.sources.len() < SOURCES_PER_PORT {
                p.sources.insert(e.src);
                p.last_source = Some(e.src);
            }
        }
    }

    pub fn finish(self, top: usize) -> Occupancy {
        let mut by_proto_state = Vec::new();
        for (p, slots) in self.states.iter().enumerate() {
            for (slot, n) in slots.iter().enumerate() {
                let entries: u64 = n.iter().sum();
                if entries > 0 {
                    by_proto_state.push(StateRow {
                        proto: proto_name(p as u8),
                        state: slot_label(slot).into(),
                        entries,
                        unreplied: n[Liveness::Unreplied as usize],
                        assured: n[Liveness::Assured as usize],
                    });
                }
            }
        }
        by_proto_state.sort_by(|a, b| {
            b.entries
                .cmp(&a.entries)
                .then_with(|| (&a.proto, &a.state).cmp(&(&b.proto, &b.state)))
        });
        let top_addrs = |m: FastMap<IpAddr, (u64, u64)>| {
            let mut v: Vec<AddrRow> = m
                .into_iter()
                .map(|(addr, (entries, unreplied))| AddrRow {
                    addr,
                    entries,
                    unreplied,
                })
                .collect();
            v.sort_by(|a, b| b.entries.cmp(&a.entries).then_with(|| a.addr.cmp(&b.addr)));
            v.truncate(top);
            v
        };
        let mut ports: Vec<PortRow> = self
            .ports
            .into_iter()
            .map(|((proto_num, port), a)| PortRow {
                proto: proto_name(proto_num),
                proto_num,
                port,
                entries: a.entries,
                unreplied: a.unreplied,
                assured: a.assured,
                sources: a.sources.len() as u64,
            })
            .collect();
        ports.sort_by(|a, b| {
            b.entries
                .cmp(&a.entries)
                .then_with(|| (a.proto_num, a.port).cmp(&(b.proto_num, b.port)))
        });
        ports.truncate(top);
        Occupancy {
            netns: None,
            netns_name: None,
            entries: self.entries,
            max: None,
            unreplied: self.by_liveness[Liveness::Unreplied as usize],
            replied: self.by_liveness[Liveness::Replied as usize],
            assured: self.by_liveness[Liveness::Assured as usize],
            nat: self.nat,
            nat_rules: None,
            unreadable: 0,
            by_proto_state,
            top_sources: top_addrs(self.sources),
            top_destinations: top_addrs(self.dests),
            top_dst_ports: ports,
            taken_ns: 0,
            elapsed_ms: 0.0,
            cpu_ms: 0.0,
        }
    }
}

fn has_ports(proto: u8) -> bool {
    matches!(proto, 6 | 17 | 33 | 132 | 136)
}

fn thread_cpu_ns() -> u64 {
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn wall_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Dumps and summarizes the table of the calling thread's namespace.
pub fn snapshot_here(top: usize) -> Result<Occupancy> {
    let taken_ns = wall_ns();
    let t = Instant::now();
    let cpu = thread_cpu_ns();
    let mut b = OccupancyBuilder::default();
    let (unreadable, parser_cpu) = dump(|e| b.add(&e))?;
    let mut o = b.finish(top);
    o.unreadable = unreadable;
    o.taken_ns = taken_ns;
    o.elapsed_ms = t.elapsed().as_secs_f64() * 1e3;
    o.cpu_ms = (thread_cpu_ns().saturating_sub(cpu) + parser_cpu) as f64 / 1e6;
    o.max = super::stats::CtLimits::read().map(|l| l.max);
    Ok(o)
}

/// Dumps and summarizes the table of the namespace at `ns_path`.
pub fn snapshot(ns_path: &Path, netns: Option<u32>, name: Option<String>) -> Result<Occupancy> {
    let mut o = super::netns::in_netns(ns_path, move || {
        let mut o = snapshot_here(TOP_N)?;
        o.nat_rules = nat_rules_here();
        Ok(o)
    })
    .with_context(|| {
        format!(
            "snapshot of the conntrack table in {}",
            name.clone()
                .unwrap_or_else(|| ns_path.display().to_string())
        )
    })?;
    o.netns = netns;
    o.netns_name = name;
    Ok(o)
}

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
                    let code = msg
                        .payload()
                        .get(..4)
                        .map(|b| i32::from_ne_bytes(b.try_into().unwrap()))
                        .unwrap_or(0);
                    if code != 0 {
                        bail!(
                            "nf_tables refused: {}",
                            std::io::Error::from_raw_os_error(-code)
                        );
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

/// At most one snapshot per namespace per `min_gap`: a full table keeps
/// dropping packets, and each drop must not cost a dump.
pub struct SnapshotLimiter {
    min_gap: Duration,
    last: HashMap<u32, Instant>,
}

impl SnapshotLimiter {
    pub fn new(min_gap: Duration) -> Self {
        SnapshotLimiter {
            min_gap,
            last: HashMap::new(),
        }
    }

    pub fn allow(&mut self, netns: u32, now: Instant) -> bool {
        match self.last.get(&netns) {
            Some(t) if now.saturating_duration_since(*t) < self.min_gap => false,
            _ => {
                self.last.insert(netns, now);
                true
            }
        }
    }
}

/// Default gap between two snapshots of one namespace.
pub const SNAPSHOT_GAP: Duration = Duration::from_secs(30);

/// Snapshots taken off the tracing loop: a dump of a full 262144-entry
/// table takes a noticeable fraction of a second, and the ring buffer must
/// keep draining meanwhile.
pub struct Snapshots {
    limiter: SnapshotLimiter,
    tx: mpsc::Sender<(u32, Result<Occupancy>)>,
    rx: mpsc::Receiver<(u32, Result<Occupancy>)>,
    in_flight: usize,
    /// Per namespace, the fullest snapshot seen (the moment that mattered).
    pub taken: BTreeMap<u32, Occupancy>,
    pub errors: Vec<String>,
}

impl Snapshots {
    pub fn new(min_gap: Duration) -> Self {
        let (tx, rx) = mpsc::channel();
        Snapshots {
            limiter: SnapshotLimiter::new(min_gap),
            tx,
            rx,
            in_flight: 0,
            taken: BTreeMap::new(),
            errors: Vec::new(),
        }
    }

    /// A table-full drop in `netns`: start a snapshot unless one was taken
    /// recently. Returns whether one was started.
    /// `locate` finds the namespace's name and path (a /proc scan: only
    /// done when a snapshot is due).
    pub fn table_full(
        &mut self,
        netns: u32,
        locate: impl FnOnce() -> Option<(Option<String>, PathBuf)>,
    ) -> bool {
        if !self.limiter.allow(netns, Instant::now()) {
            return false;
        }
        let Some((name, path)) = locate() else {
            return false;
        };
        let tx = self.tx.clone();
        let spawned = std::thread::Builder::new()
            .name("ctdrop-occupancy".into())
            .spawn(move || {
                let _ = tx.send((netns, snapshot(&path, Some(netns), name)));
            });
        match spawned {
            Ok(_) => {
                self.in_flight += 1;
                true
            }
            Err(e) => {
                self.errors
                    .push(format!("cannot start a snapshot thread: {e}"));
                false
            }
        }
    }

    /// Collects finished snapshots; returns the ones that just arrived.
    pub fn poll(&mut self) -> Vec<Occupancy> {
        let mut fresh = Vec::new();
        while let Ok(r) = self.rx.try_recv() {
            self.accept(r, &mut fresh);
        }
        fresh
    }

    /// Waits up to `limit` for snapshots still running (end of a run).
    pub fn finish(&mut self, limit: Duration) -> Vec<Occupancy> {
        let deadline = Instant::now() + limit;
        let mut fresh = self.poll();
        while self.in_flight > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(r) => self.accept(r, &mut fresh),
                Err(_) => {
                    self.errors.push(format!(
                        "{} snapshot(s) still running at exit, left out",
                        self.in_flight
                    ));
                    break;
                }
            }
        }
        fresh
    }

    fn accept(&mut self, (netns, r): (u32, Result<Occupancy>), fresh: &mut Vec<Occupancy>) {
        self.in_flight = self.in_flight.saturating_sub(1);
        match r {
            Ok(o) => {
                let keep = self
                    .taken
                    .get(&netns)
                    .map(|old| o.entries >= old.entries)
                    .unwrap_or(true);
                if keep {
                    self.taken.insert(netns, o.clone());
                }
                fresh.push(o);
            }
            Err(e) => self.errors.push(format!("{e:#}")),
        }
    }
}

impl Occupancy {
    /// A snapshot read back from its JSON (a capture file's block).
    pub fn from_stored(json: &[u8]) -> serde_json::Result<Occupancy> {
        let mut o: Occupancy = serde_json::from_slice(json)?;
        for p in &mut o.top_dst_ports {
            p.proto_num = crate::cli::parse_proto(&p.proto).unwrap_or(0);
        }
        Ok(o)
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }

    pub fn label(&self) -> String {
        self.netns_name
            .clone()
            .or_else(|| self.netns.map(|n| n.to_string()))
            .unwrap_or_else(|| "this namespace".into())
    }

    /// Lines of at most 80 columns.
    pub fn write_human(&self, out: &mut dyn std::io::Write) -> std::io::Result<()> {
        let pct = |n: u64| {
            if self.entries == 0 {
                0.0
            } else {
                n as f64 * 100.0 / self.entries as f64
            }
        };
        writeln!(
            out,
            "conntrack table in {}: {} entries{}",
            self.label(),
            self.entries,
            self.max.map(|m| format!(" (max {m})")).unwrap_or_default(),
        )?;
        writeln!(
            out,
            "  unreplied {} ({:.0}%, evictable)  replied {}  assured {} ({:.0}%)",
            self.unreplied,
            pct(self.unreplied),
            self.replied,
            self.assured,
            pct(self.assured)
        )?;
        if self.nat > 0 {
            writeln!(out, "  {} entries are NAT'd", self.nat)?;
        }
        if self.unreadable > 0 {
            writeln!(
                out,
                "  {} dumped messages could not be read",
                self.unreadable
            )?;
        }
        if !self.by_proto_state.is_empty() {
            writeln!(out, "  by protocol and state:")?;
        }
        for r in self.by_proto_state.iter().take(8) {
            writeln!(
                out,
                "    {:<6} {:<12} {:>9}  ({:.0}%)",
                r.proto,
                r.state,
                r.entries,
                pct(r.entries)
            )?;
        }
        if self.by_proto_state.len() > 8 {
            writeln!(out, "    ({} more rows)", self.by_proto_state.len() - 8)?;
        }
        for (title, rows) in [
            ("top sources:", &self.top_sources),
            ("top destinations:", &self.top_destinations),
        ] {
            if rows.is_empty() {
                continue;
            }
            writeln!(out, "  {title}")?;
            let w = rows
                .iter()
                .map(|r| r.addr.to_string().len())
                .max()
                .unwrap_or(0)
                .max(15);
            for r in rows {
                writeln!(
                    out,
                    "    {:<w$} {:>9}  ({:.0}%, {} unreplied)",
                    r.addr.to_string(),
                    r.entries,
                    pct(r.entries),
                    r.unreplied
                )?;
            }
        }
        if !self.top_dst_ports.is_empty() {
            writeln!(out, "  top destination ports:")?;
        }
        for r in &self.top_dst_ports {
            let port = format!("{} {}", r.proto, r.port);
            let srcs = if r.sources as usize >= SOURCES_PER_PORT {
                format!("{}+ sources", r.sources)
            } else {
                format!("{} sources", r.sources)
            };
            writeln!(
                out,
                "    {:<12} {:>9}  ({:.0}%, {} unreplied, {srcs})",
                port,
                r.entries,
                pct(r.entries),
                r.unreplied
            )?;
        }
        writeln!(
            out,
            "  (table read in {:.0} ms, {:.0} ms CPU)",
            self.elapsed_ms, self.cpu_ms
        )?;
        Ok(())
    }
}

/// Snapshot of the namespace named by `--netns` (name or inode), or of
/// ours when none is given.
pub fn snapshot_arg(netns: Option<&str>) -> Result<Occupancy> {
    match netns {
        None => {
            let own = super::netns::own_netns().ok();
            let name = own.and_then(|i| super::netns::NsRegistry::new().display_name(i));
            snapshot(Path::new("/proc/self/ns/net"), own, name)
        }
        Some(arg) => {
            let (inum, path) = super::netns::resolve_netns(arg)?;
            snapshot(
                &path,
                Some(inum),
                super::netns::NsRegistry::new().display_name(inum),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_netfilter::conntrack::{
        ConntrackAttribute, IPTuple, ProtoInfo, ProtoInfoTCP, ProtoTuple, Tuple,
    };

    fn e(proto: u8, src: &str, dport: u16, status: Status, tcp_state: Option<u8>) -> CtEntry {
        CtEntry {
            proto,
            src: src.parse().unwrap(),
            dst: "198.18.0.2".parse().unwrap(),
            sport: 40000,
            dport,
            tcp_state,
            status: status.bits(),
        }
    }

    #[test]
    fn counts_by_state_liveness_and_port() {
        let mut b = OccupancyBuilder::default();
        for _ in 0..40 {
            b.add(&e(17, "198.18.0.1", 5353, Status::Confirmed, None));
        }
        for _ in 0..5 {
            b.add(&e(
                6,
                "198.18.0.1",
                8080,
                Status::Confirmed | Status::SeenReply | Status::Assured,
                Some(3),
            ));
        }
        b.add(&e(
            1,
            "198.18.0.9",
            0,
            Status::Confirmed | Status::SeenReply,
            None,
        ));
        b.add(&e(
            17,
            "198.18.0.9",
            53,
            Status::Confirmed | Status::SrcNat,
            None,
        ));
        let o = b.finish(3);
        assert_eq!(o.entries, 47);
        assert_eq!((o.unreplied, o.replied, o.assured, o.nat), (41, 1, 5, 1));
        assert_eq!(
            o.by_proto_state[0],
            StateRow {
                proto: "udp".into(),
                state: "UNREPLIED".into(),
                entries: 41,
                unreplied: 41,
                assured: 0
            }
        );
        assert_eq!(
            o.by_proto_state[1],
            StateRow {
                proto: "tcp".into(),
                state: "ESTABLISHED".into(),
                entries: 5,
                unreplied: 0,
                assured: 5
            }
        );
        assert_eq!(
            o.top_sources[0].addr,
            "198.18.0.1".parse::<IpAddr>().unwrap()
        );
        assert_eq!(o.top_sources[0].entries, 45);
        assert_eq!(
            (
                o.top_dst_ports[0].port,
                o.top_dst_ports[0].entries,
                o.top_dst_ports[0].unreplied,
                o.top_dst_ports[0].sources
            ),
            (5353, 40, 40, 1)
        );
        assert_eq!(o.top_dst_ports[1].port, 8080);
        assert_eq!(o.top_dst_ports.len(), 3);
        assert_eq!(o.top_destinations[0].entries, 47);
    }

    #[test]
    fn ties_sort_stably() {
        let mut b = OccupancyBuilder::default();
        b.add(&e(17, "198.18.0.3", 9, Status::empty(), None));
        b.add(&e(17, "198.18.0.1", 7, Status::empty(), None));
        let o = b.finish(5);
        assert_eq!(o.top_sources[0].addr.to_string(), "198.18.0.1");
        assert_eq!(o.top_dst_ports[0].port, 7);
    }

    /// An entry as the kernel sends it, built with the crate's emitter.
    fn dumped(attrs: Vec<ConntrackAttribute>) -> Vec<u8> {
        let mut hdr = NetlinkHeader::default();
        hdr.message_type = CT_NEW_MSG;
        let mut m = NetlinkMessage::new(
            hdr,
            NetlinkPayload::from(NetfilterMessage::new(
                NetfilterHeader::new(NetfilterProtoFamily::IPv4, 0, 0),
                ConntrackMessage::New(attrs),
            )),
        );
        m.finalize();
        let mut buf = vec![0u8; m.buffer_len()];
        m.serialize(&mut buf);
        buf
    }

    #[test]
    fn reads_a_dumped_entry() {
        let orig = |src: &str, dst: &str| {
            ConntrackAttribute::CtaTupleOrig(vec![
                Tuple::Ip(vec![
                    IPTuple::SourceAddress(src.parse().unwrap()),
                    IPTuple::DestinationAddress(dst.parse().unwrap()),
                ]),
                Tuple::Proto(vec![
                    ProtoTuple::Protocol(6.into()),
                    ProtoTuple::SourcePort(40000),
                    ProtoTuple::DestinationPort(443),
                ]),
            ])
        };
        let rest = vec![
            ConntrackAttribute::CtaStatus(Status::Confirmed | Status::SeenReply | Status::Assured),
            ConntrackAttribute::CtaTimeout(431999),
            ConntrackAttribute::CtaProtoInfo(vec![ProtoInfo::TCP(vec![ProtoInfoTCP::State(3)])]),
        ];
        let mut attrs = vec![orig("198.18.0.1", "198.18.0.2")];
        attrs.extend(rest.clone());
        let buf = dumped(attrs);
        let msg = NetlinkBuffer::new_checked(&buf[..]).unwrap();
        assert_eq!(msg.message_type(), CT_NEW_MSG);
        let c = CtEntry::from_nlas(&msg.payload()[NFGENMSG_LEN..]).unwrap();
        assert_eq!(
            (c.proto, c.sport, c.dport, c.state_label(), c.liveness()),
            (6, 40000, 443, "ESTABLISHED", Liveness::Assured)
        );
        assert_eq!(c.src.to_string(), "198.18.0.1");

        let mut attrs = vec![orig("2001:db8::1", "2001:db8::2")];
        attrs.extend(rest.clone());
        let buf = dumped(attrs);
        let c = CtEntry::from_nlas(
            &NetlinkBuffer::new_checked(&buf[..]).unwrap().payload()[NFGENMSG_LEN..],
        )
        .unwrap();
        assert_eq!(c.dst.to_string(), "2001:db8::2");

        // No original tuple: not an entry we can count.
        let buf = dumped(rest);
        assert!(CtEntry::from_nlas(
            &NetlinkBuffer::new_checked(&buf[..]).unwrap().payload()[NFGENMSG_LEN..]
        )
        .is_none());
    }

    #[test]
    fn limiter_allows_one_per_gap_per_namespace() {
        let mut l = SnapshotLimiter::new(Duration::from_secs(30));
        let t = Instant::now();
        assert!(l.allow(1, t));
        assert!(!l.allow(1, t + Duration::from_secs(29)));
        assert!(l.allow(2, t + Duration::from_secs(1)));
        assert!(l.allow(1, t + Duration::from_secs(30)));
    }

    #[test]
    fn human_lines_fit_80_columns() {
        let mut b = OccupancyBuilder::default();
        for i in 0..300u16 {
            b.add(&e(
                17,
                &format!("2001:db8:ffff:ffff:ffff:ffff:ffff:{i:x}"),
                60000 + i % 7,
                Status::empty(),
                None,
            ));
        }
        let mut o = b.finish(TOP_N);
        o.netns_name = Some("ctdemo-srv".into());
        o.max = Some(262144);
        let mut out = Vec::new();
        o.write_human(&mut out).unwrap();
        let s = String::from_utf8(out).unwrap();
        for l in s.lines() {
            assert!(
                l.chars().count() <= 80,
                "{l:?} is {} columns",
                l.chars().count()
            );
        }
    }
}
