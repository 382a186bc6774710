//! Medians, the printed table and the JSON results file.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use serde_json::{json, Value};

use super::{tracer::{Config, Env}, Options, RoundResult};

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
    pub lost: Option<u64>,
    pub cpu_per_million: Option<f64>,
    pub peak_rss_mb: Option<f64>,
    pub attach_ms: Option<f64>,
}

pub fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 })
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
                exact_rounds: rs.iter().filter(|r| r.tracer.delivered == Some(r.kernel_drops)).count(),
                lost: opt_sum(&|r| r.tracer.lost),
                cpu_per_million: median(
                    rs.iter().filter_map(|r| r.tracer.cpu_s.map(|c| c / (r.kernel_drops.max(1) as f64 / 1e6))).collect(),
                ),
                peak_rss_mb: rs.iter().filter_map(|r| r.tracer.peak_rss_kb).max().map(|k| k as f64 / 1024.0),
                attach_ms: median(rs.iter().filter_map(|r| r.tracer.attach_ms).collect()),
            }
        })
        .collect();
    let base = out.iter().find(|s| s.key == "a").map(|s| s.rate);
    for s in &mut out {
        s.ratio = base.filter(|b| *b > 0.0).map(|b| s.rate / b);
    }
    out
}

pub fn progress_line(r: &RoundResult) -> String {
    let t = &r.tracer;
    format!(
        "bench: round {} ({:<9}) {:>9.0} drops/s  kernel {:>9}  delivered {:>9}  lost {:>7}  cpu {:>6}  rss {:>7}  attach {:>7}",
        r.round + 1,
        r.key,
        r.rate(),
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

pub fn print_table(configs: &[Config], env: &Env, summary: &[ConfigSummary], scale: &[RoundResult], opts: &Options) {
    println!();
    println!(
        "bench: {} rounds x {:.1} s per configuration, medians; flood = 1 sender, sendmmsg, a new UDP flow per packet, receiver's conntrack table full",
        opts.rounds, opts.seconds
    );
    println!(
        "{:<4} {:<58} {:>10} {:>7} {:>24} {:>9} {:>11} {:>9} {:>9}",
        "", "configuration", "drops/s", "vs (a)", "delivered / kernel drop", "lost", "CPU s/Mdrop", "peak RSS", "attach"
    );
    for (c, s) in configs.iter().zip(summary) {
        let mut d = c.describe(env);
        d.truncate(58);
        println!(
            "{:<4} {:<58} {:>10.0} {:>7} {:>24} {:>9} {:>11} {:>9} {:>9}",
            format!("({})", c.key),
            d,
            s.rate,
            dash(s.ratio, |r| format!("{r:.3}")),
            dash(s.delivered, |d| format!("{d} / {} ({}/{})", s.kernel_drops, s.exact_rounds, s.rounds)),
            dash(s.lost, |l| l.to_string()),
            dash(s.cpu_per_million, |c| format!("{c:.2}")),
            dash(s.peak_rss_mb, |m| format!("{m:.1} MB")),
            dash(s.attach_ms, |a| format!("{a:.0} ms")),
        );
    }
    println!("(delivered / kernel drop: summed over rounds, then (rounds where they were equal / rounds))");
    for r in scale {
        let notes: Vec<String> = r.tracer.notes.iter().map(|(k, v)| format!("{k} {v}")).collect();
        println!(
            "scale ({}): {} distinct flows dropped at {:.0}/s, delivered {}, peak RSS {}, {}",
            r.key,
            r.kernel_drops,
            r.rate(),
            dash(r.tracer.delivered, |d| d.to_string()),
            dash(r.tracer.peak_rss_kb, |k| format!("{:.1} MB", k as f64 / 1024.0)),
            notes.join(", ")
        );
    }
}

fn round_json(r: &RoundResult) -> Value {
    let t = &r.tracer;
    json!({
        "config": r.key, "round": r.round + 1, "sent": r.sent, "kernel_drops": r.kernel_drops,
        "seconds": r.seconds, "drops_per_s": r.rate(), "entries": r.entries,
        "delivered": t.delivered, "lost": t.lost, "cpu_s": t.cpu_s, "peak_rss_kb": t.peak_rss_kb,
        "attach_ms": t.attach_ms, "own_attach_ms": t.own_attach_ms,
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
    let ts = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
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
            })
        })
        .collect();
    let doc = json!({
        "unix_time": ts,
        "machine": machine(),
        "git": crate::proc::probe(std::process::Command::new("git").args(["rev-parse", "--short", "HEAD"]).current_dir(crate::env::repo_root())).map(|s| s.trim().to_string()),
        "rounds": opts.rounds, "seconds_per_round": opts.seconds, "sender_cpu": opts.cpu,
        "ctdrop_args": opts.ctdrop_args,
        "configs": cfgs,
        "runs": results.iter().map(round_json).collect::<Vec<_>>(),
        "scale": scale.iter().map(round_json).collect::<Vec<_>>(),
    });
    std::fs::write(&path, serde_json::to_string_pretty(&doc)? + "\n").with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

fn machine() -> Value {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string();
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo.lines().find_map(|l| l.strip_prefix("model name")).map(|l| l.trim_start_matches([' ', '\t', ':']).to_string());
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
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
