//! Medians, the printed table and the JSON results file.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use serde_json::{json, Value};

use super::{
    tracer::{Config, Env},
    Options, RoundResult,
};

/// Medians and totals of one configuration over its rounds.
#[derive(Clone, Debug, Default)]
pub struct ConfigSummary {
    pub key: String,
    pub rounds: usize,
    pub rate: f64,
    pub ratio: Option<f64>,
    pub delivered: Option<u64>,
    pub kernel_drops: u64,
    /// Rounds where delivered == the kernel's drop counter increase.
    pub exact_rounds: usize,
    /// Rounds whose throughput flood ran with statistics still on.
    pub stats_on_rounds: usize,
    pub lost: Option<u64>,
    pub cpu_per_million: Option<f64>,
    pub peak_rss_mb: Option<f64>,
    pub attach_ms: Option<f64>,
    /// Median and min-max over rounds of the kernel time per drop.
    pub bpf_ns: Option<Spread>,
    /// Rate over the same round's (a), median and min-max.
    pub round_ratio: Option<Spread>,
    pub cpu_spread: Option<Spread>,
    /// Median of the per-round `bpf_ns / (d)'s bpf_ns` of the same round.
    pub bpf_vs_d: Option<f64>,
}

/// Median and range of one figure over the rounds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    pub fn of(v: Vec<f64>) -> Option<Spread> {
        let min = v.iter().copied().reduce(f64::min)?;
        let max = v.iter().copied().reduce(f64::max)?;
        Some(Spread {
            median: median(v)?,
            min,
            max,
        })
    }

    fn show(&self, decimals: usize) -> String {
        format!(
            "{:.d$} [{:.d$}-{:.d$}]",
            self.median,
            self.min,
            self.max,
            d = decimals
        )
    }
}

pub fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

pub fn summarize(configs: &[Config], results: &[RoundResult]) -> Vec<ConfigSummary> {
    let mut out: Vec<ConfigSummary> = configs
        .iter()
        .map(|c| {
            let rs: Vec<&RoundResult> = results.iter().filter(|r| r.key == c.key).collect();
            let opt_sum = |f: &dyn Fn(&RoundResult) -> Option<u64>| -> Option<u64> {
                rs.iter().map(|r| f(r)).sum::<Option<u64>>()
            };
            ConfigSummary {
                key: c.key.clone(),
                rounds: rs.len(),
                rate: median(rs.iter().map(|r| r.rate()).collect()).unwrap_or(0.0),
                ratio: None,
                delivered: opt_sum(&|r| r.tracer.delivered),
                kernel_drops: rs.iter().map(|r| r.kernel_drops).sum(),
                exact_rounds: rs
                    .iter()
                    .filter(|r| r.tracer.delivered == Some(r.kernel_drops))
                    .count(),
                stats_on_rounds: rs.iter().filter(|r| !r.stats_off).count(),
                lost: opt_sum(&|r| r.tracer.lost),
                cpu_per_million: median(
                    rs.iter()
                        .filter_map(|r| {
                            r.tracer
                                .cpu_s
                                .map(|c| c / (r.kernel_drops.max(1) as f64 / 1e6))
                        })
                        .collect(),
                ),
                peak_rss_mb: rs
                    .iter()
                    .filter_map(|r| r.tracer.peak_rss_kb)
                    .max()
                    .map(|k| k as f64 / 1024.0),
                attach_ms: median(rs.iter().filter_map(|r| r.tracer.attach_ms).collect()),
                bpf_ns: Spread::of(rs.iter().filter_map(|r| r.bpf_ns_per_drop()).collect()),
                round_ratio: Spread::of(
                    rs.iter()
                        .filter_map(|r| {
                            same_round(results, "a", r.round)
                                .filter(|a| a.rate() > 0.0)
                                .map(|a| r.rate() / a.rate())
                        })
                        .collect(),
                ),
                cpu_spread: Spread::of(
                    rs.iter()
                        .filter_map(|r| {
                            r.tracer
                                .cpu_s
                                .map(|c| c / (r.kernel_drops.max(1) as f64 / 1e6))
                        })
                        .collect(),
                ),
                bpf_vs_d: median(
                    rs.iter()
                        .filter_map(|r| {
                            Some(
                                r.bpf_ns_per_drop()?
                                    / same_round(results, "d", r.round)?
                                        .bpf_ns_per_drop()
                                        .filter(|d| *d > 0.0)?,
                            )
                        })
                        .collect(),
                ),
            }
        })
        .collect();
    let base = out.iter().find(|s| s.key == "a").map(|s| s.rate);
    for s in &mut out {
        s.ratio = base.filter(|b| *b > 0.0).map(|b| s.rate / b);
    }
    out
}

fn same_round<'a>(results: &'a [RoundResult], key: &str, round: usize) -> Option<&'a RoundResult> {
    results.iter().find(|r| r.key == key && r.round == round)
}

pub fn progress_line(r: &RoundResult) -> String {
    let t = &r.tracer;
    format!(
        "bench: round {} ({:<9}) {:>9.0} drops/s  bpf {:>8}  kernel {:>9}  delivered {:>9}  lost {:>7}  cpu {:>6}  rss {:>7}  attach {:>7}",
        r.round + 1,
        r.key,
        r.rate(),
        r.bpf_ns_per_drop().map(|n| format!("{n:.0}ns/d")).unwrap_or_else(|| "-".into()),
        r.kernel_drops,
        t.delivered.map(|d| d.to_string()).unwrap_or_else(|| "-".into()),
        t.lost.map(|d| d.to_string()).unwrap_or_else(|| "-".into()),
        t.cpu_s.map(|c| format!("{c:.2}s")).unwrap_or_else(|| "-".into()),
        t.peak_rss_kb.map(|k| format!("{:.1}MB", k as f64 / 1024.0)).unwrap_or_else(|| "-".into()),
        t.attach_ms.map(|a| format!("{a:.0}ms")).unwrap_or_else(|| "-".into()),
    )
}

fn dash<T>(v: Option<T>, f: impl Fn(T) -> String) -> String {
    v.map(f).unwrap_or_else(|| "-".into())
}

pub fn print_table(
    configs: &[Config],
    env: &Env,
    summary: &[ConfigSummary],
    scale: &[RoundResult],
    opts: &Options,
) {
    println!();
    println!(
        "bench: {} rounds x {:.1} s per flood, medians; flood = 1 sender, sendmmsg, a new UDP flow per packet, receiver's conntrack table full; a tracer's round is two floods: BPF run-time statistics on (BPF ns/drop), then off (drops/s)",
        opts.rounds, opts.seconds
    );
    println!("bench: load at start {}", opts.load_at_start);
    println!("bench: load at end   {}", load());
    println!(
        "{:<4} {:<44} {:>18} {:>6} {:>10} {:>19} {:>26} {:>7} {:>17} {:>9} {:>7}",
        "",
        "configuration",
        "BPF ns/drop",
        "vs (d)",
        "drops/s",
        "vs (a)",
        "delivered / kernel drop",
        "lost",
        "CPU s/Mdrop",
        "peak RSS",
        "attach"
    );
    for (c, s) in configs.iter().zip(summary) {
        let mut d = c.describe(env);
        d.truncate(44);
        println!(
            "{:<4} {:<44} {:>18} {:>6} {:>10.0} {:>19} {:>26} {:>7} {:>17} {:>9} {:>7}",
            format!("({})", c.key),
            d,
            dash(s.bpf_ns, |b| b.show(0)),
            dash(s.bpf_vs_d, |r| format!("{r:.2}")),
            s.rate,
            dash(s.round_ratio, |r| r.show(3)),
            dash(s.delivered, |d| format!(
                "{d} / {} ({}/{})",
                s.kernel_drops, s.exact_rounds, s.rounds
            )),
            dash(s.lost, |l| l.to_string()),
            dash(s.cpu_spread, |c| c.show(2)),
            dash(s.peak_rss_mb, |m| format!("{m:.1} MB")),
            dash(s.attach_ms, |a| format!("{a:.0} ms")),
        );
    }
    println!("(BPF ns/drop: kernel run time of the tracer's own programs (bpf_stats run_time_ns) / the receiver's conntrack `drop` increase; median [min-max] over rounds)");
    println!("(vs (d): median over rounds of BPF ns/drop / bpftrace map-count's in the same round; vs (a): drops/s / the same round's untraced rate)");
    println!("(delivered / kernel drop: summed over rounds (both floods), then (rounds where they were equal / rounds))");
    let stats_on: usize = summary.iter().map(|s| s.stats_on_rounds).sum();
    if stats_on > 0 {
        println!("(note: in {stats_on} rounds run-time statistics stayed on during the throughput flood, held by someone else: those drops/s include their cost)");
    }
    for r in scale {
        let notes: Vec<String> = r
            .tracer
            .notes
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        println!(
            "scale ({}): {} distinct flows dropped at {:.0}/s, delivered {}, peak RSS {}, {}",
            r.key,
            r.kernel_drops,
            r.rate(),
            dash(r.tracer.delivered, |d| d.to_string()),
            dash(r.tracer.peak_rss_kb, |k| format!(
                "{:.1} MB",
                k as f64 / 1024.0
            )),
            notes.join(", ")
        );
    }
}

fn round_json(r: &RoundResult) -> Value {
    let t = &r.tracer;
    json!({
        "config": r.key, "round": r.round + 1, "sent": r.sent, "kernel_drops": r.kernel_drops,
        "seconds": r.seconds, "drops_per_s": r.rate(), "throughput_drops": r.rate_drops,
        "bpf_stats_drops": r.bpf_drops, "stats_off_for_throughput": r.stats_off, "entries": r.entries,
        "delivered": t.delivered, "lost": t.lost, "cpu_s": t.cpu_s, "peak_rss_kb": t.peak_rss_kb,
        "attach_ms": t.attach_ms, "own_attach_ms": t.own_attach_ms,
        "bpf_run_time_ns": t.bpf.as_ref().map(|b| b.run_time_ns), "bpf_run_cnt": t.bpf.as_ref().map(|b| b.run_cnt),
        "bpf_programs": t.bpf.as_ref().map(|b| b.programs),
        "bpf_by_program": t.bpf.as_ref().map(|b| b.by_prog.iter().map(|p| json!({
            "id": p.id, "name": p.name, "run_time_ns": p.run_time_ns, "run_cnt": p.run_cnt,
        })).collect::<Vec<_>>()), "bpf_ns_per_drop": r.bpf_ns_per_drop(),
        "notes": t.notes.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<serde_json::Map<_, _>>(),
    })
}

pub fn write_json(
    dir: &Path,
    configs: &[Config],
    env: &Env,
    summary: &[ConfigSummary],
    results: &[RoundResult],
    scale: &[RoundResult],
    opts: &Options,
) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let path = dir.join(format!("results-{ts}.json"));
    let cfgs: Vec<Value> = configs
        .iter()
        .zip(summary)
        .map(|(c, s)| {
            json!({
                "key": c.key, "command": c.describe(env), "rounds": s.rounds,
                "drops_per_s_median": s.rate, "ratio_to_a": s.ratio,
                "delivered": s.delivered, "kernel_drops": s.kernel_drops, "exact_rounds": s.exact_rounds,
                "lost": s.lost, "cpu_s_per_million_drops_median": s.cpu_per_million,
                "peak_rss_mb_max": s.peak_rss_mb, "attach_ms_median": s.attach_ms,
                "bpf_ns_per_drop": s.bpf_ns.map(spread_json), "bpf_ns_vs_d_median": s.bpf_vs_d,
                "ratio_to_same_round_a": s.round_ratio.map(spread_json),
                "cpu_s_per_million_drops": s.cpu_spread.map(spread_json),
            })
        })
        .collect();
    let doc = json!({
        "unix_time": ts,
        "machine": machine(),
        "git": crate::proc::probe(std::process::Command::new("git").args(["rev-parse", "--short", "HEAD"]).current_dir(crate::env::repo_root())).map(|s| s.trim().to_string()),
        "load_at_start": opts.load_at_start, "load_at_end": load(),
        "rounds": opts.rounds, "seconds_per_round": opts.seconds, "sender_cpu": opts.cpu,
        "ctdrop_args": opts.ctdrop_args,
        "configs": cfgs,
        "runs": results.iter().map(round_json).collect::<Vec<_>>(),
        "scale": scale.iter().map(round_json).collect::<Vec<_>>(),
    });
    std::fs::write(&path, serde_json::to_string_pretty(&doc)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

fn spread_json(s: Spread) -> Value {
    json!({ "median": s.median, "min": s.min, "max": s.max })
}

/// `/proc/loadavg`: 1, 5, 15-minute load averages (other users of the
/// machine move the throughput ratios, hence printed with every run).
pub fn load() -> String {
    let s = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    s.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

fn machine() -> Value {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string());
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    json!({ "kernel": kernel, "cpus": cpus, "cpu_model": model })
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn medians() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(vec![]), None);
    }
}
