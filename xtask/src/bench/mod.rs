//! `cargo xtask bench`: the same drop flood under no tracer, ctdrop (one
//! record per drop, and count mode) and two bpftrace one-liners, in
//! alternating rounds, with medians printed and every round kept in a JSON
//! file. Root only; it holds the nf_conntrack_max lock for the whole run.

mod bpf_stats;
mod flood;
mod report;
pub use report::load;
mod topology;
mod tracer;

use std::{
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use anyhow::{anyhow, bail, Context as _, Result};

use flood::{FloodSpec, FLOWS_PER_SOCKET};
use topology::{ConntrackMax, DropCounter, Topology, RECEIVER, RECEIVER_ADDR, SENDER};
use tracer::{Config, Env, Kind};

/// Set by SIGINT/SIGTERM: the flood stops, the bench unwinds through its
/// guards (namespaces deleted, nf_conntrack_max restored).
pub static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// Table size during the bench: tiny, so it is full after 64 flows.
const BENCH_CONNTRACK_MAX: u64 = 64;
/// Distinct flows of the memory check (issue: 1,000,000).
const SCALE_FLOWS: u64 = 1_000_000;

pub struct Options {
    pub rounds: usize,
    pub seconds: f64,
    /// Configuration keys to run (a..e); empty = all.
    pub only: Vec<String>,
    /// Extra (b) runs with these `--ring-size` values.
    pub ring_sweep: Vec<String>,
    /// Extra configurations `KEY=ctdrop arguments` (split at whitespace).
    pub ctdrop_configs: Vec<String>,
    pub ctdrop_args: Vec<String>,
    pub skip_scale: bool,
    pub cpu: Option<usize>,
    pub ctdrop: PathBuf,
    pub out_dir: PathBuf,
    /// `/proc/loadavg` when the bench started.
    pub load_at_start: String,
}

/// One configuration's round: for a tracer, a flood with BPF run-time
/// statistics on (its BPF ns per drop), then one with them off (its
/// throughput); the baseline has only the second.
#[derive(Clone, Debug)]
pub struct RoundResult {
    pub key: String,
    pub round: usize,
    pub sent: u64,
    /// Increase of the receiver's conntrack `drop` counter over the whole
    /// round (both floods): what the tracer should have delivered.
    pub kernel_drops: u64,
    /// The throughput flood: its drops and length.
    pub rate_drops: u64,
    pub seconds: f64,
    /// Drops during the statistics flood (0: there was none).
    pub bpf_drops: u64,
    /// Whether run-time statistics were really off for the throughput
    /// flood (someone else may hold them on).
    pub stats_off: bool,
    pub entries: u64,
    pub tracer: tracer::Report,
}

impl RoundResult {
    pub fn rate(&self) -> f64 {
        self.rate_drops as f64 / self.seconds
    }

    /// Kernel run time of the tracer's programs per drop the kernel counted.
    pub fn bpf_ns_per_drop(&self) -> Option<f64> {
        let b = self.tracer.bpf.as_ref()?;
        (self.bpf_drops > 0).then(|| b.run_time_ns as f64 / self.bpf_drops as f64)
    }
}

/// BPF run-time statistics, switched per flood. They add two clock reads
/// to every program run (~25 ns each under this VM's paravirtual clock),
/// a cost a production host never pays, so throughput is measured with
/// them off and BPF ns per drop in a flood of its own with them on.
struct Stats {
    on: Option<bpf_stats::StatsOn>,
}

impl Stats {
    fn on(&mut self) -> Result<()> {
        if self.on.is_none() {
            self.on = Some(bpf_stats::StatsOn::enable()?);
        }
        Ok(())
    }

    /// Off as far as this process goes; true when the kernel switch is off
    /// too (false when another holder, or the sysctl, keeps it on).
    fn off(&mut self) -> bool {
        self.on = None;
        bpf_stats::sysctl_value().as_deref() == Some("0")
    }
}

pub fn run(opts: &Options) -> Result<()> {
    if unsafe { libc::geteuid() } != 0 {
        bail!("bench needs root (namespaces, nf_conntrack_max, eBPF)");
    }
    let netfilter_drop = netfilter_drop_reason()?;
    let mut configs = vec![
        Config::new("a", Kind::None),
        Config::new("b", Kind::CtdropJson),
        Config::new("c", Kind::CtdropCount),
        Config::new("d", Kind::BpftraceCount),
        Config::new("e", Kind::BpftracePrintf),
    ];
    for size in &opts.ring_sweep {
        let mut c = Config::new(&format!("b@{size}"), Kind::CtdropJson);
        c.extra = vec!["--ring-size".into(), size.clone()];
        configs.push(c);
    }
    for spec in &opts.ctdrop_configs {
        let (key, args) = spec
            .split_once('=')
            .ok_or_else(|| anyhow!("--ctdrop-config wants KEY=ARGS, got {spec:?}"))?;
        let mut c = Config::new(key, Kind::CtdropCustom);
        c.extra = args.split_whitespace().map(String::from).collect();
        if c.extra.first().is_some_and(|a| a.starts_with('/')) {
            let bin = PathBuf::from(c.extra.remove(0));
            if !bin.is_file() {
                bail!(
                    "--ctdrop-config {key}: no ctdrop binary at {}",
                    bin.display()
                );
            }
            c.bin = Some(bin);
        }
        configs.push(c);
    }
    if !opts.only.is_empty() {
        configs.retain(|c| {
            c.key == "a"
                || opts
                    .only
                    .iter()
                    .any(|o| c.key == *o || c.key.starts_with(&format!("{o}@")))
        });
    }
    if configs
        .iter()
        .any(|c| matches!(c.kind, Kind::BpftraceCount | Kind::BpftracePrintf))
        && crate::proc::probe(std::process::Command::new("bpftrace").arg("--version")).is_none()
    {
        bail!("bpftrace is not installed: run `cargo xtask setup`");
    }
    let env = Env {
        ctdrop: opts.ctdrop.clone(),
        netfilter_drop,
        ctdrop_args: opts.ctdrop_args.clone(),
    };

    for sig in [libc::SIGINT, libc::SIGTERM] {
        unsafe {
            libc::signal(
                sig,
                on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
            )
        };
    }
    let ct_max = ConntrackMax::set(BENCH_CONNTRACK_MAX)?;
    let mut stats = Stats { on: None };
    let held_elsewhere = !stats.off();
    stats.on()?;
    println!(
        "bench: BPF run-time statistics on through BPF_ENABLE_STATS for each tracer's statistics flood, off for its throughput flood (kernel.bpf_stats_enabled untouched{}; off when this process exits, however it exits)",
        if held_elsewhere {
            ", but it reads 1 without us: statistics stay on throughout and throughput includes their cost"
        } else {
            ""
        }
    );
    println!(
        "bench: holding {} with nf_conntrack_max={BENCH_CONNTRACK_MAX} (was {}; restored at exit)",
        topology::LOCK_PATH,
        ct_max.previous()
    );
    let topo = Topology::create()?;
    let mut counter = DropCounter::open(RECEIVER)?;
    let sender = Topology::netns_path(SENDER);
    let flood = FloodSpec {
        dst: RECEIVER_ADDR,
        sockets: 1,
        duration: Duration::from_secs_f64(opts.seconds),
        max_packets: None,
        cpu: opts.cpu,
    };
    fill_table(&sender, &flood, &mut counter)?;

    let mut results = Vec::new();
    for round in 0..opts.rounds {
        for cfg in &configs {
            check_stop()?;
            let r = one_round(
                cfg,
                &env,
                &sender,
                &flood,
                &mut counter,
                round,
                Some(&mut stats),
            )
            .with_context(|| {
                format!(
                    "round {} of ({}) {}",
                    round + 1,
                    cfg.key,
                    cfg.describe(&env)
                )
            })?;
            println!("{}", report::progress_line(&r));
            if let Some(b) = r.tracer.bpf.as_ref().filter(|b| !b.by_prog.is_empty()) {
                println!("bench:   programs: {}", b.breakdown());
            }
            results.push(r);
        }
    }
    let mut scale = Vec::new();
    if !opts.skip_scale {
        let spec = FloodSpec {
            sockets: SCALE_FLOWS.div_ceil(FLOWS_PER_SOCKET) as usize,
            max_packets: Some(SCALE_FLOWS),
            duration: Duration::from_secs(120),
            ..flood.clone()
        };
        let default_cap = Config::new("scale", Kind::CtdropJson);
        let mut all = Config::new("scale-all", Kind::CtdropJson);
        all.extra = vec!["--max-flows".into(), SCALE_FLOWS.to_string()];
        for cfg in [default_cap, all] {
            check_stop()?;
            let r = one_round(&cfg, &env, &sender, &spec, &mut counter, 0, None)
                .with_context(|| format!("scale run {}", cfg.describe(&env)))?;
            println!("{}", report::progress_line(&r));
            scale.push(r);
        }
    }
    drop(topo);
    drop(stats);
    drop(ct_max);

    let summary = report::summarize(&configs, &results);
    report::print_table(&configs, &env, &summary, &scale, opts);
    let path = report::write_json(
        &opts.out_dir,
        &configs,
        &env,
        &summary,
        &results,
        &scale,
        opts,
    )?;
    println!("bench: results in {}", path.display());
    Ok(())
}

fn check_stop() -> Result<()> {
    if STOP.load(Ordering::Relaxed) {
        bail!("interrupted");
    }
    Ok(())
}

/// Sends until the receiver's table is at its limit, so every later new
/// flow is a table-full drop.
fn fill_table(sender: &Path, flood: &FloodSpec, counter: &mut DropCounter) -> Result<()> {
    let spec = FloodSpec {
        max_packets: Some(4 * BENCH_CONNTRACK_MAX),
        duration: Duration::from_secs(5),
        ..flood.clone()
    };
    flood::run(sender, &spec)?;
    let (_, entries) = counter.read()?;
    if entries < BENCH_CONNTRACK_MAX {
        bail!("the receiver's conntrack table holds {entries} entries after the fill, expected {BENCH_CONNTRACK_MAX}");
    }
    Ok(())
}

/// One configuration's round. With `stats`, a tracer first gets a flood
/// with run-time statistics on (BPF ns per drop); then every configuration
/// gets the throughput flood with them off. Without (the scale runs): the
/// one flood only.
fn one_round(
    cfg: &Config,
    env: &Env,
    sender: &Path,
    flood: &FloodSpec,
    counter: &mut DropCounter,
    round: usize,
    mut stats: Option<&mut Stats>,
) -> Result<RoundResult> {
    let mut running = tracer::start(cfg, env)?;
    if let Some(r) = running.as_mut() {
        r.wait_attached(Duration::from_secs(60))?;
    }
    // Same settle time for every configuration, the baseline included.
    std::thread::sleep(Duration::from_millis(300));
    let (start, _) = counter.read()?;
    if let Some(r) = running.as_mut() {
        r.mark_flood_start();
    }
    let (mut sent, mut bpf_drops) = (0, 0);
    if let (Some(r), Some(st)) = (running.as_mut(), stats.as_deref_mut()) {
        st.on()?;
        let (d0, _) = counter.read()?;
        sent += flood::run(sender, flood)?.sent;
        let (d1, _) = counter.read()?;
        r.mark_flood_end();
        bpf_drops = d1 - d0;
        check_stop()?;
    }
    let stats_off = stats.map(|st| st.off()).unwrap_or(false);
    let (d0, _) = counter.read()?;
    let f = flood::run(sender, flood)?;
    let (d1, entries) = counter.read()?;
    check_stop()?;
    let report = match running {
        Some(r) => r.stop()?,
        None => tracer::Report::default(),
    };
    Ok(RoundResult {
        key: cfg.key.clone(),
        round,
        sent: sent + f.sent,
        kernel_drops: d1 - start,
        rate_drops: d1 - d0,
        seconds: f.elapsed.as_secs_f64(),
        bpf_drops,
        stats_off,
        entries,
        tracer: report,
    })
}

/// SKB_DROP_REASON_NETFILTER_DROP on this kernel, read off the tracepoint's
/// own format (its `__print_symbolic` table).
fn netfilter_drop_reason() -> Result<u32> {
    let paths = [
        "/sys/kernel/tracing/events/skb/kfree_skb/format",
        "/sys/kernel/debug/tracing/events/skb/kfree_skb/format",
    ];
    let text = paths
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok())
        .ok_or_else(|| {
            anyhow!("cannot read the skb:kfree_skb tracepoint format (is tracefs mounted?)")
        })?;
    parse_reason(&text, "NETFILTER_DROP")
        .ok_or_else(|| anyhow!("kfree_skb's format names no NETFILTER_DROP reason"))
}

fn parse_reason(format: &str, name: &str) -> Option<u32> {
    let needle = format!("\"{name}\" }}");
    let end = format.find(&needle)?;
    let open = format[..end].rfind('{')?;
    format[open + 1..end]
        .trim()
        .trim_end_matches(',')
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::parse_reason;

    #[test]
    fn reason_from_tracepoint_format() {
        let f = r#"print fmt: "x", __print_symbolic(REC->reason, { 2, "NOT_SPECIFIED" }, { 12, "NETFILTER_DROP" }, { 13, "OTHERHOST" })"#;
        assert_eq!(parse_reason(f, "NETFILTER_DROP"), Some(12));
        assert_eq!(parse_reason(f, "NOT_SPECIFIED"), Some(2));
        assert_eq!(parse_reason(f, "NOPE"), None);
    }
}
