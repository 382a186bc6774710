//! Loading the embedded kernel programs and attaching them.

use std::{os::fd::AsFd, time::Instant};

use anyhow::{anyhow, Context, Result};
use aya::{
    maps::{MapData, PerCpuArray, PerCpuHashMap},
    programs::BtfTracePoint,
    Ebpf, EbpfLoader,
};
use tracer_common::{
    ct_signal, stat, CountConfig, CpuStatSet, CtEventCounts, FilterConfig, FlowCount, FlowKey,
    FlowSet, GroupKey, GroupSet, Offsets, FLOW_SETS, GROUP_SETS,
};

use super::{
    btf::KernelBtf,
    cpustat,
    nfhook::{HookAbi, HookCoverage, NfHooks},
    tier::{self, Mechanism, Mode},
};

static TRACER_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tracer"));

pub const DEFAULT_RING_SIZE: u32 = 4 << 20;

/// Ring buffer sizes the kernel accepts: a power of two, page aligned.
pub fn validate_ring_size(bytes: u64) -> Result<u32> {
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64;
    if bytes < page || !bytes.is_power_of_two() || bytes > (1 << 30) {
        return Err(anyhow!(
            "--ring-size must be a power of two between {page} and 1073741824 bytes, got {bytes}"
        ));
    }
    Ok(bytes as u32)
}

pub struct LoadOptions<'a> {
    /// The run's one read of the kernel's BTF.
    pub btf: &'a KernelBtf,
    pub offsets: Offsets,
    pub filter: FilterConfig,
    pub ring_size: u32,
    pub mode: Mode,
    /// Count mode's settings (ignored by the other modes).
    pub count: CountConfig,
}

/// Counters the kernel programs keep, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelStats {
    pub sent: u64,
    pub lost: u64,
    pub flow_map_full: u64,
    pub group_map_full: u64,
    /// Count-mode drops sampled for per-flow detail.
    pub flow_sampled: u64,
    /// Runs of `kfree_skb` the kernel skipped because the program was
    /// already running on that CPU (a drop in an interrupt that came while
    /// it ran): drops no count saw. 0 where the kernel does not say.
    pub skipped_runs: u64,
}

/// Loaded and attached programs; dropping it detaches everything (links
/// are owned by the `Ebpf` object, nothing is pinned).
pub struct Tracer {
    /// None once detached: the programs are gone, the maps below stay
    /// readable.
    ebpf: Option<Ebpf>,
    stats: PerCpuArray<MapData, u64>,
    ct_events: Option<PerCpuHashMap<MapData, u32, CtEventCounts>>,
    flow_sets: Option<PerCpuArray<MapData, FlowSet>>,
    group_sets: Option<PerCpuArray<MapData, GroupSet>>,
    groups: Option<PerCpuHashMap<MapData, GroupKey, u64>>,
    /// Netfilter hook marks (after `ebpf`: dropped after the consumer).
    hooks: Option<NfHooks>,
    /// Where the per-CPU counter witness runs: the seeds not to trust.
    cpu_stat_unsure: Option<std::sync::Arc<cpustat::Unsure>>,
    /// `kfree_skb`'s skipped runs, read when it was detached.
    skipped_at_detach: u64,
    /// Reader of the programs' own diagnostics (`--bpf-log`), last: what
    /// they logged until detached is read before it stops.
    kernel_log: Option<crate::logging::KernelLog>,
    /// Wall time from load start until every program is attached.
    pub attach_time: std::time::Duration,
    /// How each signal is served on this kernel.
    pub mechanisms: Vec<Mechanism>,
}

impl Tracer {
    pub fn load(opts: &LoadOptions) -> Result<Tracer> {
        let start = Instant::now();
        let btf = opts.btf.aya()?;
        tier::check_mode(opts.mode)?;
        let mut filter = opts.filter;
        // The drop path's own witness (cpustat.rs) first: it runs only on
        // drops, where kprobes on nf_conntrack_in and hook marks run on
        // every packet. Not where another mechanism is asked for; not in
        // count mode, which decides no record's cause in the kernel (the
        // seeds would cost a walk of every namespace at start for nothing).
        let cpu_stat = !matches!(opts.mode, Mode::Kprobe | Mode::NetfilterHook)
            && filter.count_only == 0
            && match cpustat::config(&opts.offsets) {
                Ok(()) => true,
                Err(e) => {
                    log::debug!("conntrack's per-CPU counters cannot be read here: {e:#}");
                    false
                }
            };
        // The namespaces asked for with --netns, else every one.
        let only = (filter.n_netns != 0).then(|| filter.netns[..filter.n_netns as usize].to_vec());
        let probes = tier::want_kprobes(opts.mode, cpu_stat);
        let mut hook_refused = None;
        let hook_abi = if tier::want_hooks(opts.mode, cpu_stat) {
            match HookAbi::from_btf(opts.btf) {
                Ok(abi) => Some(abi),
                Err(e) if opts.mode == Mode::NetfilterHook => {
                    return Err(e.context("--mode netfilter-hook"))
                }
                Err(e) => {
                    hook_refused = Some(format!("{e:#}"));
                    None
                }
            }
        } else {
            None
        };
        filter.wake_shift = tracer_common::wake_shift(opts.ring_size);
        filter.ct_probes = if probes { ct_signal::PROBES } else { 0 }
            | if hook_abi.is_some() {
                ct_signal::HOOKS
            } else {
                0
            }
            | if cpu_stat { ct_signal::CPU_STAT } else { 0 };

        // 0 unless asked for (logging.rs): the verifier then removes the
        // programs' logging code. Both names may be absent (no log call
        // left in the programs): nothing to switch off then.
        let log_level = crate::logging::kernel_log_level();
        let mut ebpf = EbpfLoader::new()
            .btf(Some(btf))
            .override_global("OFFSETS", &opts.offsets, true)
            .override_global("FILTER", &filter, true)
            .override_global("COUNT_CONFIG", &opts.count, true)
            .override_global(aya_log::LEVEL, &log_level, false)
            .override_global("BPF_LOG", &log_level, false)
            .map_max_entries("EVENTS", opts.ring_size)
            .map_max_entries("HOOK_MARKS", super::nfhook::mark_map_entries())
            // Count mode's counter arrays take memory on every CPU: one
            // set each unless counting.
            .map_max_entries(
                "FLOW_SET_ARRAY",
                if filter.count_only != 0 { FLOW_SETS } else { 1 },
            )
            .map_max_entries(
                "FLOW_TAG_ARRAY",
                if filter.count_only != 0 { FLOW_SETS } else { 1 },
            )
            .map_max_entries(
                "GROUP_SET_ARRAY",
                if filter.count_only != 0 {
                    GROUP_SETS
                } else {
                    1
                },
            )
            .load(TRACER_OBJ)
            .map_err(explain_load_error)?;
        let kernel_log = crate::logging::KernelLog::start(&mut ebpf)?;
        let prog: &mut BtfTracePoint = ebpf
            .program_mut("kfree_skb")
            .ok_or_else(|| anyhow!("embedded object lacks the kfree_skb program"))?
            .try_into()?;
        prog.load("kfree_skb", btf)
            .map_err(|e| anyhow!("{e}"))
            .context(
            "the kernel refused the kfree_skb tp_btf program (needs BTF tracepoints, kernel 5.5+)",
        )?;
        // Producers first, the consumer last: a drop recorded before its
        // conntrack signal was attached would be called a rule drop.
        let mut mechanisms = vec![Mechanism {
            signal: "drops",
            chosen: Some("tp_btf/kfree_skb".into()),
            note: String::new(),
        }];
        let mut hooks = None;
        if probes {
            mechanisms.extend(tier::attach_ct_probes(&mut ebpf, opts.mode)?);
        } else if let Some(abi) = hook_abi {
            let marks = match ebpf.map("HOOK_MARKS") {
                Some(aya::maps::Map::LruHashMap(m)) => m
                    .fd()
                    .as_fd()
                    .try_clone_to_owned()
                    .context("duplicating the HOOK_MARKS fd")?,
                _ => return Err(anyhow!("embedded object lacks the HOOK_MARKS map")),
            };
            match NfHooks::start(abi, &marks, only.clone()) {
                Ok(h) => {
                    mechanisms.extend(tier::hook_mechanisms(h.namespaces_at_start));
                    hooks = Some(h);
                }
                Err(e) if opts.mode == Mode::NetfilterHook => {
                    return Err(e.context("--mode netfilter-hook"))
                }
                Err(e) => hook_refused = Some(format!("{e:#}")),
            }
        }
        // Marks left before the consumer existed prove nothing: written
        // before attaching, and again after (then the marks of drops freed
        // while the attach was under way count as stale too).
        let set_epoch = |ebpf: &mut aya::Ebpf| -> Result<()> {
            let mut epoch: aya::maps::Array<_, u64> = aya::maps::Array::try_from(
                ebpf.map_mut("HOOK_EPOCH")
                    .ok_or_else(|| anyhow!("no HOOK_EPOCH map"))?,
            )?;
            epoch
                .set(0, crate::probe::mono_ns(), 0)
                .context("writing HOOK_EPOCH")
        };
        // Seeds read before the attach, and read again after it: where
        // they moved, a first decision may rest on a drop nobody saw.
        let seeds = if cpu_stat {
            let present = super::nfhook::namespaces_now(only.as_deref());
            let seeds = cpustat::snapshot(&present);
            let mut ledger: PerCpuArray<&mut MapData, CpuStatSet> = PerCpuArray::try_from(
                ebpf.map_mut("CPU_STAT_LEDGER")
                    .ok_or_else(|| anyhow!("embedded object lacks the CPU_STAT_LEDGER map"))?,
            )?;
            let seeded = cpustat::seed(&mut ledger, &seeds)?;
            mechanisms.extend(tier::cpu_stat_mechanisms());
            Some((seeds, seeded, present))
        } else {
            None
        };
        if hooks.is_some() {
            set_epoch(&mut ebpf)?;
        } else if !probes && seeds.is_none() {
            let why = match (opts.mode, &hook_refused) {
                (Mode::Tracepoint, _) => "--mode tracepoint".to_string(),
                (_, Some(e)) => format!(
                    "no kprobe support in this kernel; netfilter hook programs unavailable: {e}"
                ),
                _ => "no kprobe support in this kernel".to_string(),
            };
            mechanisms.extend(tier::tracepoint_mechanisms(&why));
        }
        let prog: &mut BtfTracePoint = ebpf
            .program_mut("kfree_skb")
            .ok_or_else(|| anyhow!("no kfree_skb program"))?
            .try_into()?;
        prog.attach()
            .map_err(|e| anyhow!("{e}"))
            .context("cannot attach to tracepoint kfree_skb")?;
        if hooks.is_some() {
            set_epoch(&mut ebpf)?;
        }
        let cpu_stat_unsure = seeds.map(|(before, seeded, present)| {
            let after = cpustat::snapshot(&present);
            let unsure =
                cpustat::Unsure::between(&before, &after, &seeded, present.keys().copied());
            let (namespaces, pairs) = unsure.counts();
            if namespaces + pairs > 0 {
                log::debug!(
                    "first drops left to the totals: {namespaces} namespaces without a seed that holds, {pairs} (namespace, CPU) pairs whose counters moved during the attach"
                );
            }
            std::sync::Arc::new(unsure)
        });
        let attach_time = start.elapsed();
        log::trace!("struct offsets from BTF: {:?}", opts.offsets);
        for m in &mechanisms {
            let note = if m.note.is_empty() {
                String::new()
            } else {
                format!(" ({})", m.note)
            };
            let how = m.chosen.as_deref().unwrap_or("not watched");
            log::debug!("{} signal: {how}{note}", m.signal);
        }
        let stats = PerCpuArray::try_from(
            ebpf.take_map("STATS")
                .ok_or_else(|| anyhow!("no STATS map"))?,
        )?;
        let ct_events = ebpf
            .take_map("CT_EVENTS")
            .map(PerCpuHashMap::try_from)
            .transpose()?;
        let flow_sets = ebpf
            .take_map("FLOW_SET_ARRAY")
            .map(PerCpuArray::try_from)
            .transpose()?;
        let group_sets = ebpf
            .take_map("GROUP_SET_ARRAY")
            .map(PerCpuArray::try_from)
            .transpose()?;
        let groups = ebpf
            .take_map("GROUPS")
            .map(PerCpuHashMap::try_from)
            .transpose()?;
        Ok(Tracer {
            ebpf: Some(ebpf),
            stats,
            ct_events,
            flow_sets,
            group_sets,
            groups,
            hooks,
            cpu_stat_unsure,
            skipped_at_detach: 0,
            kernel_log,
            attach_time,
            mechanisms,
        })
    }

    /// Detaches and unloads every program. The counters keep their final
    /// values and what is in the ring stays readable, so a drain after this
    /// ends, and delivered + lost adds up exactly.
    pub fn detach(&mut self) {
        // Read while the program exists: the count goes with it.
        self.skipped_at_detach = self.kfree_skb_misses().unwrap_or(self.skipped_at_detach);
        // The consumer first: with the marks gone while kfree_skb still
        // ran, conntrack drops would look like rule drops.
        self.ebpf = None;
        self.hooks = None;
        self.kernel_log = None;
    }

    /// With the per-CPU counter witness: which of its seeded decisions the
    /// collector must leave to the totals.
    pub fn cpu_stat_unsure(&self) -> Option<std::sync::Arc<cpustat::Unsure>> {
        self.cpu_stat_unsure.clone()
    }

    /// Where and since when netfilter hook marks decide conntrack drops.
    pub fn hook_coverage(&self) -> Option<HookCoverage> {
        self.hooks.as_ref().map(|h| h.coverage())
    }

    /// Loads (never attaches) a trivial fentry program: does this kernel
    /// accept fentry at all?
    pub fn try_fentry(btf: &KernelBtf) -> Result<()> {
        let btf = btf.aya()?;
        let mut ebpf = EbpfLoader::new()
            .btf(Some(btf))
            .load(TRACER_OBJ)
            .map_err(explain_load_error)?;
        let prog: &mut aya::programs::FEntry = ebpf
            .program_mut("fentry_probe")
            .ok_or_else(|| anyhow!("no fentry_probe program"))?
            .try_into()?;
        prog.load("nf_hook_slow", btf).map_err(|e| anyhow!("{e}"))?;
        Ok(())
    }

    /// Whether allocation failures and confirm drops are seen directly.
    pub fn probes_drop_paths(&self) -> bool {
        ["table_full", "insert_failed", "conntrack_in"]
            .iter()
            .all(|s| {
                self.mechanisms.iter().any(|m| {
                    m.signal == *s && m.chosen.as_deref().is_some_and(|c| c.contains("probe"))
                })
            })
    }

    /// Conntrack path events per namespace inode (probe tier only).
    pub fn ct_events(&self) -> Result<Vec<(u32, CtEventCounts)>> {
        let Some(map) = &self.ct_events else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for item in map.iter() {
            let (ns, per_cpu) = item.context("reading CT_EVENTS map")?;
            let mut t = CtEventCounts::default();
            for c in per_cpu.iter() {
                t.inserts += c.inserts;
                t.early_drop_evicted += c.early_drop_evicted;
                t.early_drop_failed += c.early_drop_failed;
                t.alloc_failed += c.alloc_failed;
                t.confirm_dropped += c.confirm_dropped;
                t.clash_resolved += c.clash_resolved;
                t.in_dropped += c.in_dropped;
                t.invalid += c.invalid;
            }
            out.push((ns, t));
        }
        out.sort_by_key(|(ns, _)| *ns);
        Ok(out)
    }

    /// The record ring, for `events::ring` to map and read.
    pub fn take_ring(&mut self) -> Result<MapData> {
        let ebpf = self
            .ebpf
            .as_mut()
            .ok_or_else(|| anyhow!("programs already detached"))?;
        match ebpf.take_map("EVENTS") {
            Some(aya::maps::Map::RingBuf(map)) => Ok(map),
            Some(_) => Err(anyhow!("EVENTS is not a ring buffer")),
            None => Err(anyhow!("no EVENTS map")),
        }
    }

    pub fn stats(&self) -> Result<KernelStats> {
        let sum = |i: u32| -> Result<u64> {
            let v = self.stats.get(&i, 0).context("reading STATS map")?;
            Ok(v.iter().sum())
        };
        Ok(KernelStats {
            sent: sum(stat::SENT)?,
            lost: sum(stat::LOST)?,
            flow_map_full: sum(stat::FLOW_MAP_FULL)?,
            group_map_full: sum(stat::GROUP_MAP_FULL)?,
            flow_sampled: sum(stat::FLOW_SAMPLED)?,
            skipped_runs: self.kfree_skb_misses().unwrap_or(self.skipped_at_detach),
        })
    }

    /// `recursion_misses` of the `kfree_skb` program (5.12+); None once
    /// detached or where the kernel's info is shorter.
    fn kfree_skb_misses(&self) -> Option<u64> {
        use std::os::fd::{AsFd, AsRawFd};
        let prog = self.ebpf.as_ref()?.program("kfree_skb")?;
        let fd = prog.fd().ok()?.as_fd().as_raw_fd();
        recursion_misses(fd)
    }

    /// Per-group drop counts of count mode (cumulative), summed over slots
    /// and CPUs, plus the overflow hash.
    pub fn group_counts(&self) -> Result<Vec<(GroupKey, u64)>> {
        let sets = self
            .group_sets
            .as_ref()
            .ok_or_else(|| anyhow!("no GROUP_SET_ARRAY map"))?;
        let map = self
            .groups
            .as_ref()
            .ok_or_else(|| anyhow!("no GROUPS map"))?;
        let mut sum: std::collections::HashMap<GroupKey, u64> = std::collections::HashMap::new();
        for i in 0..sets.len() {
            for set in sets.get(&i, 0).context("reading GROUP_SET_ARRAY")?.iter() {
                for slot in set.slots.iter().filter(|s| s.drops != 0) {
                    *sum.entry(slot.key).or_default() += slot.drops;
                }
            }
        }
        for item in map.iter() {
            let (k, per_cpu) = item.context("reading GROUPS map")?;
            *sum.entry(k).or_default() += per_cpu.iter().sum::<u64>();
        }
        Ok(sum.into_iter().collect())
    }

    /// Per-flow counters of count mode, summed over slots and CPUs.
    pub fn flow_counts(&self) -> Result<Vec<(FlowKey, FlowCount)>> {
        let sets = self
            .flow_sets
            .as_ref()
            .ok_or_else(|| anyhow!("no FLOW_SET_ARRAY map"))?;
        let mut sum: std::collections::HashMap<FlowKey, FlowCount> =
            std::collections::HashMap::new();
        for i in 0..sets.len() {
            for set in sets.get(&i, 0).context("reading FLOW_SET_ARRAY")?.iter() {
                for slot in set.slots.iter().filter(|s| s.count.packets != 0) {
                    merge_flow(sum.entry(slot.key).or_default(), &slot.count);
                }
            }
        }
        Ok(sum.into_iter().collect())
    }
}

/// Adds one CPU's (or slot's) counters of a flow to its total.
fn merge_flow(total: &mut FlowCount, c: &FlowCount) {
    total.packets += c.packets;
    total.bytes += c.bytes;
    total.first_ns = if total.first_ns == 0 {
        c.first_ns
    } else {
        total.first_ns.min(c.first_ns)
    };
    total.last_ns = total.last_ns.max(c.last_ns);
}

fn explain_load_error(e: aya::EbpfError) -> anyhow::Error {
    // aya names the map or program; the cause is in the error's sources.
    let mut text = e.to_string();
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        let more = s.to_string();
        if !text.contains(&more) {
            text += &format!(": {more}");
        }
        src = s.source();
    }
    if let Some(why) = resource_cause(&text) {
        return anyhow!("cannot load ctdrop's kernel programs: {why} ({text})");
    }
    if text.contains("EPERM") || text.contains("Operation not permitted") {
        anyhow!("the kernel refused to load ctdrop's programs ({text}): run as root; lockdown or unprivileged BPF limits may apply")
    } else {
        anyhow!("cannot load ctdrop's kernel programs: {text}")
    }
}

/// What to tell the operator when the kernel said EMFILE or ENOMEM.
fn resource_cause(text: &str) -> Option<String> {
    if text.contains("os error 24") || text.contains("Too many open files") {
        let (soft, hard) = crate::conntrack::netns::fd_limits();
        return Some(format!(
            "out of file descriptors (EMFILE: limit {soft}, hard limit {hard}); raise it with `ulimit -n` or LimitNOFILE= in the service unit"
        ));
    }
    if text.contains("os error 12") || text.contains("Cannot allocate memory") {
        return Some(
            "the kernel could not allocate memory for a BPF map (ENOMEM): check RLIMIT_MEMLOCK (`ulimit -l`) on kernels before 5.11, the memory cgroup limit, or try a smaller --ring-size".to_string(),
        );
    }
    None
}

/// `struct bpf_prog_info.recursion_misses` of the program open as `fd`
/// (BPF_OBJ_GET_INFO_BY_FD: aya 0.14's ProgramInfo has no accessor).
fn recursion_misses(fd: std::os::fd::RawFd) -> Option<u64> {
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    /// uapi offset of `recursion_misses` (u64) in `struct bpf_prog_info`.
    const AT: usize = 208;
    #[repr(C)]
    struct Attr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let mut info = [0u64; 32];
    let mut attr = Attr {
        bpf_fd: fd as u32,
        info_len: std::mem::size_of_val(&info) as u32,
        info: info.as_mut_ptr() as u64,
    };
    // SAFETY: the kernel writes at most `info_len` bytes into `info`, which
    // outlives the call, and rewrites `info_len` with what it filled.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            &mut attr as *mut Attr,
            std::mem::size_of::<Attr>(),
        )
    };
    (r == 0 && attr.info_len as usize >= AT + 8).then(|| info[AT / 8])
}
