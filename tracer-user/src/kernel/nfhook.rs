//! Netfilter-hook marks around conntrack (BPF_PROG_TYPE_NETFILTER, 6.4+):
//! which dropped packet conntrack's own hooks dropped, known per packet
//! instead of inferred from counters.
//!
//! Three programs, attached with `BPF_LINK_CREATE` in every watched network
//! namespace, for IPv4 and IPv6 (the kernel refuses NFPROTO_INET):
//! - `ct_hook_enter` at priority -201 on PRE_ROUTING and LOCAL_OUT, just
//!   before `nf_conntrack_in` (-200): marks the skb IN;
//! - `ct_hook_leave` at -199 on the same hooks: the skb came out of
//!   conntrack alive, its mark (IN, or an old CONFIRM) is removed;
//! - `ct_hook_confirm` at INT_MAX-2 on POST_ROUTING and LOCAL_IN, just
//!   before confirmation (INT_MAX; IPv6 LOCAL_IN INT_MAX-1): marks
//!   an skb whose entry is still unconfirmed, with that entry's `_nfct`.
//!
//! (Each moves outward when its priority is taken: see [`Slot`].)
//! `kfree_skb` consumes the mark of a dropped skb (tracer-ebpf/src/hooks.rs).
//! A NETFILTER_DROP with an IN mark happened inside conntrack's hook; with
//! a CONFIRM mark and the same `_nfct`, at confirm; with neither, in a rule.
//!
//! Why hand-assembled here and not compiled in tracer-ebpf: aya 0.14 knows
//! no netfilter program type or link, so it can neither load nor attach
//! them; compiling them into the object would also make aya's loader meet
//! an ELF section it cannot classify. The programs are 9-30 instructions,
//! written against the map aya creates (its fd goes into BPF_LD_IMM64 with
//! BPF_PSEUDO_MAP_FD), and the verifier checks them like any other.
//!
//! What can interleave, and why it does not matter:
//! - a softirq handling another packet on the same CPU between the -201
//!   and -199 marks, or a task that migrates to another CPU inside
//!   LOCAL_OUT: marks are keyed by skb address, not by CPU;
//! - an skb address reused by a later packet: every packet crossing
//!   netfilter in a namespace starts at PRE_ROUTING or LOCAL_OUT, where
//!   -201 overwrites and -199 deletes any old mark; a packet dropped before
//!   -201 (the raw table) can only meet a mark its address kept from an
//!   earlier life: a CONFIRM mark then names another `_nfct` (ignored), an
//!   IN mark was left only by a drop nobody consumed (before `kfree_skb`
//!   attached, or beyond the age limit) and is reported stale, so the
//!   counters decide that record (`evidence` says so);
//! - a later rule drop after confirm cannot carry a CONFIRM mark of its own
//!   entry without passing -199 again (which deletes it).
//!
//! Blind spots (said in the README): a user's nftables chain at exactly
//! priority -200 sits inside the bracket; a conntrack helper's drop at
//! confirm would be called an insert failure; an l4 tracker's `-NF_DROP`
//! inside nf_conntrack_in (counted `invalid`, not `drop`) would be called
//! table-full.

use std::{
    collections::HashMap,
    ffi::CString,
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, RwLock,
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{anyhow, bail, Context, Result};
use tracer_common::hook_mark;

use super::btf::KernelBtf;

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
/// uapi `NFPROTO_IPV4`/`NFPROTO_IPV6`: an anonymous enum, so BTF has no
/// name to look them up by; they are ABI.
const NFPROTO_IPV4: u32 = 2;
const NFPROTO_IPV6: u32 = 10;
/// nf_conntrack's own priorities (`NF_IP_PRI_CONNTRACK`, and confirm at
/// INT_MAX): #defines, absent from BTF.
const PRI_CONNTRACK: i32 = -200;

/// The numbers the hook programs need, read from the running kernel's BTF.
#[derive(Clone, Copy, Debug)]
pub struct HookAbi {
    prog_type: u32,
    attach_type: u32,
    pre_routing: u32,
    local_in: u32,
    local_out: u32,
    post_routing: u32,
    ips_confirmed: u64,
    skb_nfct: u32,
    conn_status: u32,
}

impl HookAbi {
    /// An error when this kernel has no netfilter program type (before
    /// 6.4) or lacks a field the programs read (nf_conn's, when the
    /// nf_conntrack module is not loaded).
    pub fn from_btf(btf: &KernelBtf) -> Result<HookAbi> {
        let prog_types = btf.enum_values("bpf_prog_type")?;
        let attach_types = btf.enum_values("bpf_attach_type")?;
        let prog_type = *prog_types
            .get("BPF_PROG_TYPE_NETFILTER")
            .ok_or_else(|| anyhow!("no BPF_PROG_TYPE_NETFILTER in this kernel (needs 6.4+)"))?;
        let attach_type = *attach_types
            .get("BPF_NETFILTER")
            .ok_or_else(|| anyhow!("no BPF_NETFILTER attach type in this kernel"))?;
        let hooks = btf.enum_values("nf_inet_hooks")?;
        let hook = |n: &str| {
            hooks
                .get(n)
                .map(|v| *v as u32)
                .ok_or_else(|| anyhow!("enum nf_inet_hooks lacks {n}"))
        };
        // The status enum lives with conntrack (vmlinux when built in, the
        // module's BTF otherwise); the bit is uapi, so its value stands in.
        let ips_confirmed = btf
            .enum_values("ip_conntrack_status")
            .ok()
            .and_then(|e| e.get("IPS_CONFIRMED").copied())
            .unwrap_or(1 << 3);
        Ok(HookAbi {
            prog_type: prog_type as u32,
            attach_type: attach_type as u32,
            pre_routing: hook("NF_INET_PRE_ROUTING")?,
            local_in: hook("NF_INET_LOCAL_IN")?,
            local_out: hook("NF_INET_LOCAL_OUT")?,
            post_routing: hook("NF_INET_POST_ROUTING")?,
            ips_confirmed,
            skb_nfct: btf
                .offset("sk_buff", "_nfct")
                .context("sk_buff has no _nfct (conntrack not built)")?,
            conn_status: btf
                .offset("nf_conn", "status")
                .context("nf_conn not in BTF (nf_conntrack not loaded)")?,
        })
    }
}

// ------------------------------------------------------------ assembler

/// One eBPF instruction, encoded as the kernel reads it.
#[derive(Clone, Copy)]
#[repr(C)]
struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

const R0: u8 = 0;
const R1: u8 = 1;
const R2: u8 = 2;
const R3: u8 = 3;
const R4: u8 = 4;
const R6: u8 = 6;
const R7: u8 = 7;
const R8: u8 = 8;
const FP: u8 = 10;

const HELPER_MAP_UPDATE: i32 = 2;
const HELPER_MAP_DELETE: i32 = 3;
const HELPER_KTIME: i32 = 5;
const HELPER_PROBE_READ_KERNEL: i32 = 113;

fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: (src << 4) | dst,
        off,
        imm,
    }
}
/// dst = *(u64 *)(src + off)
fn ldx64(dst: u8, src: u8, off: i16) -> Insn {
    insn(0x79, dst, src, off, 0)
}
/// *(u64 *)(dst + off) = src
fn stx64(dst: u8, off: i16, src: u8) -> Insn {
    insn(0x7b, dst, src, off, 0)
}
/// *(u64 *)(dst + off) = imm
fn st64(dst: u8, off: i16, imm: i32) -> Insn {
    insn(0x7a, dst, 0, off, imm)
}
fn mov_imm(dst: u8, imm: i32) -> Insn {
    insn(0xb7, dst, 0, 0, imm)
}
fn mov_reg(dst: u8, src: u8) -> Insn {
    insn(0xbf, dst, src, 0, 0)
}
fn add_imm(dst: u8, imm: i32) -> Insn {
    insn(0x07, dst, 0, 0, imm)
}
fn and_imm(dst: u8, imm: i32) -> Insn {
    insn(0x57, dst, 0, 0, imm)
}
/// if dst == imm goto +off
fn jeq_imm(dst: u8, imm: i32, off: i16) -> Insn {
    insn(0x15, dst, 0, off, imm)
}
/// if dst != imm goto +off
fn jne_imm(dst: u8, imm: i32, off: i16) -> Insn {
    insn(0x55, dst, 0, off, imm)
}
fn call(helper: i32) -> Insn {
    insn(0x85, 0, 0, 0, helper)
}
fn exit() -> Insn {
    insn(0x95, 0, 0, 0, 0)
}
/// dst = the map behind `fd` (two instruction slots).
fn ld_map_fd(dst: u8, fd: RawFd) -> [Insn; 2] {
    const BPF_PSEUDO_MAP_FD: u8 = 1;
    [
        insn(0x18, dst, BPF_PSEUDO_MAP_FD, 0, fd),
        insn(0, 0, 0, 0, 0),
    ]
}

/// `struct bpf_nf_ctx { state; skb; }`: the skb pointer's offset.
const CTX_SKB: i16 = 8;
/// Stack slots: key (the skb address) at -8, the `HookMark` value at -32
/// (`ts_ns` -32, `kind` -24, `nfct` -16), scratch at -40.
const KEY: i16 = -8;
const VAL: i16 = -32;

/// Stores a mark {now, kind, nfct=r7 or 0} for the skb in r6.
fn mark(out: &mut Vec<Insn>, map: RawFd, kind: u64, nfct_in_r7: bool) {
    out.push(stx64(FP, KEY, R6));
    out.push(call(HELPER_KTIME));
    out.push(stx64(FP, VAL, R0));
    out.push(st64(FP, VAL + 8, kind as i32));
    out.push(if nfct_in_r7 {
        stx64(FP, VAL + 16, R7)
    } else {
        st64(FP, VAL + 16, 0)
    });
    out.extend(ld_map_fd(R1, map));
    out.push(mov_reg(R2, FP));
    out.push(add_imm(R2, KEY as i32));
    out.push(mov_reg(R3, FP));
    out.push(add_imm(R3, VAL as i32));
    out.push(mov_imm(R4, 0)); // BPF_ANY
    out.push(call(HELPER_MAP_UPDATE));
}

fn accept(out: &mut Vec<Insn>) {
    out.push(mov_imm(R0, 1)); // NF_ACCEPT: the marks never change a verdict
    out.push(exit());
}

fn enter_program(map: RawFd) -> Vec<Insn> {
    let mut p = vec![ldx64(R6, R1, CTX_SKB)];
    mark(&mut p, map, hook_mark::IN, false);
    accept(&mut p);
    p
}

fn leave_program(map: RawFd) -> Vec<Insn> {
    let mut p = vec![ldx64(R6, R1, CTX_SKB), stx64(FP, KEY, R6)];
    p.extend(ld_map_fd(R1, map));
    p.push(mov_reg(R2, FP));
    p.push(add_imm(R2, KEY as i32));
    p.push(call(HELPER_MAP_DELETE));
    accept(&mut p);
    p
}

/// Marks only skbs whose entry is not yet confirmed: only those can fail
/// to insert, and packets of established flows (nearly all) then cost a
/// read, not a map update.
fn confirm_program(map: RawFd, abi: &HookAbi) -> Vec<Insn> {
    let mut body = vec![
        ldx64(R6, R1, CTX_SKB),
        ldx64(R7, R6, abi.skb_nfct as i16),
        mov_reg(R8, R7),
        and_imm(R8, -8), // NFCT_PTRMASK: the low 3 bits are ctinfo
    ];
    // Filled in below, once the distance to `out` is known.
    let skip_no_ct = body.len();
    body.push(jeq_imm(R8, 0, 0));
    body.extend([
        mov_reg(R1, FP),
        add_imm(R1, -40),
        mov_imm(R2, 8),
        mov_reg(R3, R8),
        add_imm(R3, abi.conn_status as i32),
        call(HELPER_PROBE_READ_KERNEL),
    ]);
    let skip_read_failed = body.len();
    body.push(jne_imm(R0, 0, 0));
    body.push(ldx64(R1, FP, -40));
    body.push(and_imm(R1, abi.ips_confirmed as i32));
    let skip_confirmed = body.len();
    body.push(jne_imm(R1, 0, 0));
    mark(&mut body, map, hook_mark::CONFIRM, true);
    let out = body.len();
    for at in [skip_no_ct, skip_read_failed, skip_confirmed] {
        body[at].off = (out - at - 1) as i16;
    }
    accept(&mut body);
    body
}

// ------------------------------------------------------------- syscalls

/// The leading fields of `union bpf_attr` for BPF_PROG_LOAD.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// `union bpf_attr` for BPF_LINK_CREATE with its netfilter part.
#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
    pf: u32,
    hooknum: u32,
    priority: i32,
    nf_flags: u32,
}

fn sys_bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<OwnedFd> {
    // SAFETY: attr is a live, fully initialised repr(C) prefix of union
    // bpf_attr and its size is passed along; the kernel zero-extends it.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, std::mem::size_of::<T>()) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a successful BPF_PROG_LOAD/BPF_LINK_CREATE returns a new fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

fn load(name: &str, insns: &[Insn], abi: &HookAbi) -> Result<OwnedFd> {
    let license = CString::new("GPL").expect("no NUL");
    let mut attr = ProgLoadAttr {
        prog_type: abi.prog_type,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        expected_attach_type: abi.attach_type,
        ..Default::default()
    };
    attr.prog_name[..name.len()].copy_from_slice(name.as_bytes());
    match sys_bpf(BPF_PROG_LOAD, &mut attr) {
        Ok(fd) => Ok(fd),
        Err(e) => {
            // Again with the verifier's log, for the error message.
            let mut log = vec![0u8; 1 << 16];
            attr.log_level = 1;
            attr.log_size = log.len() as u32;
            attr.log_buf = log.as_mut_ptr() as u64;
            let _ = sys_bpf(BPF_PROG_LOAD, &mut attr);
            let text =
                String::from_utf8_lossy(&log[..log.iter().position(|b| *b == 0).unwrap_or(0)])
                    .trim()
                    .to_string();
            bail!(
                "the kernel refused the netfilter program {name}: {e}{}",
                if text.is_empty() {
                    String::new()
                } else {
                    format!("; verifier: {text}")
                }
            )
        }
    }
}

/// Whether this kernel loads a netfilter program at all (for `check`).
pub fn supported(abi: &HookAbi) -> Result<()> {
    let p = [mov_imm(R0, 1), exit()];
    load("ct_hook_probe", &p, abi).map(drop)
}

/// Entries of HOOK_MARKS: its LRU lists are per CPU (each gets an equal
/// share), and a CPU's share must outlast a burst of confirm marks (one per
/// new flow) while another packet's IN mark is in flight.
pub fn mark_map_entries() -> u32 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) }.max(1) as u32;
    (cpus.saturating_mul(4096)).clamp(65536, 1 << 20)
}

// ---------------------------------------------------------- attachments

struct Programs {
    enter: OwnedFd,
    leave: OwnedFd,
    confirm: OwnedFd,
    abi: HookAbi,
}

/// One link to make: program, family, hook, and the priorities to try in
/// turn. The kernel gives each BPF hook a priority of its own on a hook
/// (EBUSY when any hook holds it already: IPv6 conntrack confirms on
/// LOCAL_IN at INT_MAX-1, and a second ctdrop holds the first's), so each
/// mark moves outward from conntrack's priority until one is free; what
/// it brackets stays the same.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Slot {
    prog: RawFd,
    pf: u32,
    hook: u32,
    first: i32,
    step: i32,
}

/// Priorities tried per slot: -201..-208 before conntrack, -199..-192
/// after it, INT_MAX-2.. down before confirm.
const TRIES: i32 = 8;

impl Slot {
    fn priorities(self) -> impl Iterator<Item = i32> {
        (0..TRIES).map(move |k| self.first + k * self.step)
    }
}

impl Programs {
    /// Slots in attach order: every clearing link before the marking one
    /// it pairs with, so no mark is ever set that nothing would remove.
    fn plan(&self) -> Vec<Slot> {
        let a = &self.abi;
        let mut out = Vec::new();
        for pf in [NFPROTO_IPV4, NFPROTO_IPV6] {
            for hook in [a.pre_routing, a.local_out] {
                out.push(Slot {
                    prog: self.leave.as_raw_fd(),
                    pf,
                    hook,
                    first: PRI_CONNTRACK + 1,
                    step: 1,
                });
            }
            for hook in [a.pre_routing, a.local_out] {
                out.push(Slot {
                    prog: self.enter.as_raw_fd(),
                    pf,
                    hook,
                    first: PRI_CONNTRACK - 1,
                    step: -1,
                });
            }
            for hook in [a.post_routing, a.local_in] {
                out.push(Slot {
                    prog: self.confirm.as_raw_fd(),
                    pf,
                    hook,
                    first: i32::MAX - 2,
                    step: -1,
                });
            }
        }
        out
    }
}

/// Links of this plan in the namespace of the calling thread.
fn link_all(plan: &[Slot], attach_type: u32) -> Result<Vec<OwnedFd>> {
    let mut links = Vec::with_capacity(plan.len());
    for slot in plan {
        let mut last = None;
        for priority in slot.priorities() {
            let mut attr = LinkCreateAttr {
                prog_fd: slot.prog as u32,
                attach_type,
                pf: slot.pf,
                hooknum: slot.hook,
                priority,
                ..Default::default()
            };
            match sys_bpf(BPF_LINK_CREATE, &mut attr) {
                Ok(link) => {
                    links.push(link);
                    last = None;
                    break;
                }
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => last = Some(e),
                Err(e) => {
                    last = Some(e);
                    break;
                }
            }
        }
        if let Some(e) = last {
            let family = if slot.pf == NFPROTO_IPV4 {
                "ipv4"
            } else {
                "ipv6"
            };
            bail!(
                "BPF_LINK_CREATE {family} hook {} priority {} (+{} more): {e}",
                slot.hook,
                slot.first,
                TRIES - 1
            );
        }
    }
    Ok(links)
}

/// Which namespaces have marks, and since when (monotonic ns): a record
/// there and then without a mark was not dropped by conntrack's hooks.
#[derive(Clone, Default)]
pub struct HookCoverage(Arc<RwLock<HashMap<u32, u64>>>);

impl HookCoverage {
    pub fn covers(&self, netns: u32, mono_ns: u64) -> bool {
        self.0
            .read()
            .map(|m| m.get(&netns).is_some_and(|since| *since <= mono_ns))
            .unwrap_or(false)
    }

    fn set(&self, netns: u32, since: Option<u64>) {
        if let Ok(mut m) = self.0.write() {
            match since {
                Some(t) => m.insert(netns, t),
                None => m.remove(&netns),
            };
        }
    }
}

/// A packet already between -201 and -199 when the links went in carries
/// no mark; it leaves conntrack within microseconds. Records this soon
/// after attaching are left to the counters.
const SETTLE_NS: u64 = 1_000_000;
/// Links per namespace: 3 hooks x 2 places x 2 families.
const LINKS_PER_NS: usize = 12;

/// Namespaces that may hold links: a quarter of the descriptors the soft
/// limit leaves (the counter files of every namespace need most of the
/// rest). At `ulimit -n 1024` that is 16 namespaces; ctdrop raises the soft
/// limit to the hard one at start, which is far higher on most systems.
fn link_budget() -> usize {
    let (soft, _) = crate::conntrack::netns::fd_limits();
    ((soft.saturating_sub(256) / 4) as usize / LINKS_PER_NS).max(1)
}

/// How often new namespaces are looked for.
const POLL: Duration = Duration::from_millis(250);
/// Scans a namespace may be missing from before its links are closed.
const GONE_AFTER: u32 = 8;

struct NsLinks {
    _links: Vec<OwnedFd>,
    missed: u32,
}

struct Attacher {
    progs: Arc<Programs>,
    only: Option<Vec<u32>>,
    links: HashMap<u32, NsLinks>,
    /// After the first scan: say on stderr when a new namespace is covered.
    started: bool,
    /// The descriptor budget stopped attaching (said once).
    over_budget: bool,
    pids: PidNamespaces,
    /// Namespaces that refused links (say once, do not retry every scan).
    refused: HashMap<u32, String>,
    coverage: HookCoverage,
}

impl Attacher {
    fn scan(&mut self) {
        let found = namespaces(self.only.as_deref(), &mut self.pids);
        // Our own namespace, then named ones, then the rest: who gets marks
        // first when the descriptor budget runs out.
        let own = crate::conntrack::netns::own_netns().unwrap_or(0);
        let mut order: Vec<(&u32, &PathBuf)> = found.iter().collect();
        order.sort_by_key(|(ns, p)| (**ns != own, !p.starts_with("/run/netns"), **ns));
        for (ns, path) in order {
            if self.links.contains_key(ns) || self.refused.contains_key(ns) {
                continue;
            }
            if self.links.len() >= link_budget() {
                if !self.over_budget {
                    self.over_budget = true;
                    log::warn!(
                        "netfilter hook marks in {} namespaces only (file descriptor limit, {} links each); conntrack causes in the others are inferred from their counters",
                        self.links.len(),
                        LINKS_PER_NS
                    );
                }
                break;
            }
            if let Err(e) = self.attach(*ns, path) {
                if !path.exists() || format!("{e:#}").contains("Too many open files") {
                    continue; // gone meanwhile, or out of descriptors: not a refusal
                }
                // Said once; that namespace's records fall back to the counters.
                log::warn!("netfilter hook marks not attached in network namespace {ns}: {e:#}; its conntrack causes are inferred");
                self.refused.insert(*ns, format!("{e:#}"));
            }
        }
        let mut gone = Vec::new();
        for (ns, l) in self.links.iter_mut() {
            if found.contains_key(ns) {
                l.missed = 0;
            } else {
                l.missed += 1;
                if l.missed >= GONE_AFTER {
                    gone.push(*ns);
                }
            }
        }
        for ns in gone {
            self.coverage.set(ns, None);
            self.links.remove(&ns);
        }
    }

    fn attach(&mut self, ns: u32, path: &Path) -> Result<()> {
        let plan = self.progs.plan();
        let attach_type = self.progs.abi.attach_type;
        let progs = self.progs.clone();
        let links = crate::conntrack::netns::in_netns(path, move || {
            let _keep = progs; // the raw fds in `plan` stay open meanwhile
                               // A /proc/PID path may name another namespace by now (the pid
                               // exited and was reused): links there would vouch for `ns`.
            let here = crate::conntrack::netns::thread_netns()?;
            if here != ns {
                bail!("namespace {ns} changed under its path (now {here})");
            }
            link_all(&plan, attach_type)
        })?;
        self.links.insert(
            ns,
            NsLinks {
                _links: links,
                missed: 0,
            },
        );
        self.coverage
            .set(ns, Some(crate::probe::mono_ns() + SETTLE_NS));
        if self.started {
            log::info!("netfilter hook marks attached in new network namespace {ns}");
        } else {
            log::debug!("netfilter hook marks attached in network namespace {ns}");
        }
        Ok(())
    }
}

/// Namespaces of running processes by pid. A process nearly always keeps
/// its namespace, so a scan looks only at pids it has not seen (stat per
/// process adds up on a host with thousands of them, four times a second);
/// every [`FULL_EVERY`] scans it looks at all, for the rare `unshare`.
#[derive(Default)]
struct PidNamespaces {
    by_pid: HashMap<u32, u32>,
    scans: u32,
}

const FULL_EVERY: u32 = 40;

/// Every network namespace reachable now (see [`namespaces`]), once.
pub fn namespaces_now(only: Option<&[u32]>) -> HashMap<u32, PathBuf> {
    namespaces(only, &mut PidNamespaces::default())
}

/// Every network namespace reachable now: our own, named ones
/// (`/run/netns`), and those of running processes (`/proc/*/ns/net`),
/// by inode, each with a path that opens it.
fn namespaces(only: Option<&[u32]>, pids: &mut PidNamespaces) -> HashMap<u32, PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let ino = |p: &Path| std::fs::metadata(p).ok().map(|m| m.ino() as u32);
    let mut out: HashMap<u32, PathBuf> = HashMap::new();
    let mut add = |ns: u32, p: PathBuf| {
        if only.is_none_or(|o| o.contains(&ns)) {
            out.entry(ns).or_insert(p);
        }
    };
    let own = PathBuf::from("/proc/self/ns/net");
    if let Some(ns) = ino(&own) {
        add(ns, own);
    }
    for (ns, (_, p)) in crate::conntrack::netns::named_namespaces() {
        add(ns, p);
    }
    let full = pids.scans.is_multiple_of(FULL_EVERY);
    pids.scans = pids.scans.wrapping_add(1);
    let mut alive = HashMap::with_capacity(pids.by_pid.len());
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let path = e.path().join("ns/net");
            let ns = match pids.by_pid.get(&pid) {
                Some(ns) if !full => Some(*ns),
                _ => ino(&path),
            };
            if let Some(ns) = ns {
                alive.insert(pid, ns);
                add(ns, path);
            }
        }
    }
    pids.by_pid = alive;
    out
}

/// The hook programs, their links in every watched namespace, and the
/// thread that attaches them in namespaces that appear later. Dropping it
/// stops the thread and closes every link (nothing is pinned, so a killed
/// process leaves nothing either).
pub struct NfHooks {
    coverage: HookCoverage,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Attacher>>,
    pub namespaces_at_start: usize,
}

impl NfHooks {
    /// Loads the programs against `marks` (the HOOK_MARKS map) and attaches
    /// them in every namespace found now; fails when the own namespace
    /// refuses them (then nothing is left attached).
    pub fn start(abi: HookAbi, marks: impl AsFd, only_netns: Option<Vec<u32>>) -> Result<NfHooks> {
        let map = marks.as_fd().as_raw_fd();
        let progs = Arc::new(Programs {
            enter: load("ct_hook_enter", &enter_program(map), &abi)?,
            leave: load("ct_hook_leave", &leave_program(map), &abi)?,
            confirm: load("ct_hook_confirm", &confirm_program(map, &abi), &abi)?,
            abi,
        });
        let coverage = HookCoverage::default();
        let mut attacher = Attacher {
            progs,
            only: only_netns.clone(),
            links: HashMap::new(),
            started: false,
            over_budget: false,
            pids: PidNamespaces::default(),
            refused: HashMap::new(),
            coverage: coverage.clone(),
        };
        attacher.scan();
        attacher.started = true;
        // If our own namespace (or the one asked for) refuses, the
        // mechanism is unavailable (no CONFIG_NETFILTER_BPF_LINK, say), not
        // merely absent in one namespace.
        let targets = match only_netns {
            Some(nss) => nss,
            None => vec![crate::conntrack::netns::own_netns()?],
        };
        for target in targets {
            if let Some(e) = attacher.refused.get(&target) {
                bail!("cannot attach netfilter hook programs in namespace {target}: {e}");
            }
            if !attacher.links.contains_key(&target) {
                bail!("network namespace {target} not found to attach netfilter hook programs in");
            }
        }
        let namespaces_at_start = attacher.links.len();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("ctdrop-nfhooks".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    // Short sleeps: stopping waits for at most one of them.
                    for _ in 0..5 {
                        std::thread::sleep(POLL / 5);
                        if flag.load(Ordering::Relaxed) {
                            return attacher;
                        }
                    }
                    attacher.scan();
                }
                attacher
            })
            .context("starting the namespace watcher")?;
        Ok(NfHooks {
            coverage,
            stop,
            thread: Some(thread),
            namespaces_at_start,
        })
    }

    pub fn coverage(&self) -> HookCoverage {
        self.coverage.clone()
    }
}

/// Threads that close links at exit.
const CLOSERS: usize = 32;

impl Drop for NfHooks {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let Some(Ok(attacher)) = self.thread.take().map(|t| t.join()) else {
            return;
        };
        // Each link's release unregisters its hook and waits out an RCU
        // grace period: closed one after another, 80 namespaces' links took
        // over 20 s. Closed from many threads at once, the waits overlap.
        let mut links: Vec<OwnedFd> = attacher
            .links
            .into_values()
            .flat_map(|l| l._links)
            .collect();
        let per = links.len().div_ceil(CLOSERS).max(1);
        let mut closers = Vec::new();
        while !links.is_empty() {
            let chunk: Vec<OwnedFd> = links.drain(..per.min(links.len())).collect();
            // On a failed spawn the chunk goes down with the closure: closed here.
            if let Ok(t) = std::thread::Builder::new()
                .name("ctdrop-unlink".into())
                .spawn(move || drop(chunk))
            {
                closers.push(t);
            }
        }
        for t in closers {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn abi() -> HookAbi {
        HookAbi {
            prog_type: 32,
            attach_type: 45,
            pre_routing: 0,
            local_in: 1,
            local_out: 3,
            post_routing: 4,
            ips_confirmed: 8,
            skb_nfct: 104,
            conn_status: 128,
        }
    }

    #[test]
    fn confirm_program_jumps_land_on_the_accept() {
        let p = confirm_program(3, &abi());
        let accept_at = p.len() - 2;
        for (i, ins) in p.iter().enumerate() {
            if matches!(ins.code, 0x15 | 0x55) {
                assert_eq!(i + 1 + ins.off as usize, accept_at, "jump at {i}");
            }
        }
        assert_eq!((p[accept_at].code, p[accept_at].imm), (0xb7, 1));
    }

    #[test]
    fn every_program_returns_accept() {
        for p in [
            enter_program(3),
            leave_program(3),
            confirm_program(3, &abi()),
        ] {
            let n = p.len();
            assert_eq!(
                (p[n - 2].code, p[n - 2].imm, p[n - 1].code),
                (0xb7, 1, 0x95)
            );
        }
    }

    #[test]
    fn clearing_links_come_before_the_marks_they_pair_with() {
        let fd = || OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
        let progs = Programs {
            enter: fd(),
            leave: fd(),
            confirm: fd(),
            abi: abi(),
        };
        let plan = progs.plan();
        assert_eq!(plan.len(), 12);
        for (i, s) in plan.iter().enumerate() {
            let tried: Vec<i32> = s.priorities().collect();
            if s.prog == progs.enter.as_raw_fd() {
                assert!(tried.iter().all(|p| (-208..=-201).contains(p)), "{tried:?}");
                let leave = Slot {
                    prog: progs.leave.as_raw_fd(),
                    first: -199,
                    step: 1,
                    ..*s
                };
                assert!(
                    plan[..i].contains(&leave),
                    "enter before its leave: {plan:?}"
                );
            } else if s.prog == progs.leave.as_raw_fd() {
                assert!(tried.iter().all(|p| (-199..=-192).contains(p)), "{tried:?}");
            } else {
                // Below every conntrack confirm (INT_MAX; IPv6 LOCAL_IN INT_MAX-1).
                assert!(
                    tried.iter().all(|p| *p < i32::MAX - 1 && *p > 300),
                    "{tried:?}"
                );
                assert!([1, 4].contains(&s.hook));
            }
        }
        for pf in [NFPROTO_IPV4, NFPROTO_IPV6] {
            assert_eq!(plan.iter().filter(|p| p.pf == pf).count(), 6);
        }
    }

    #[test]
    fn host_btf_has_the_netfilter_program_type() {
        let btf = KernelBtf::open(Path::new("/sys/kernel/btf/vmlinux")).expect("host BTF");
        // Kernels before 6.4 lack it; then the error names what is missing.
        match HookAbi::from_btf(&btf) {
            Ok(a) => assert!(a.prog_type > 0 && a.attach_type > 0),
            Err(e) => assert!(format!("{e:#}").contains("NETFILTER"), "{e:#}"),
        }
    }
}
