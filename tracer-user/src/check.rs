//! `ctdrop check`: what this kernel allows, found by trying, and how
//! conntrack is doing in every namespace that uses it; with `--occupancy`,
//! who holds each table and what to change.

use std::io::Write;

use anyhow::{Context, Result};

use crate::{
    advice::{self, Advice, Host, NsEvidence},
    cli::CheckArgs,
    conntrack::{
        netns::{find_namespace, NsRegistry},
        occupancy::{self, Occupancy},
        stats::CtLimits,
    },
    kernel::{
        attach::{LoadOptions, Tracer},
        btf::{DropReasons, KernelBtf},
        capabilities, tier,
    },
};

pub struct Capability {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
}

pub fn run(args: &CheckArgs) -> Result<()> {
    capabilities::require("ctdrop check", capabilities::TRACING)?;
    capabilities::require_btf(&args.btf)?;
    let btf = KernelBtf::open(&args.btf)?;
    let reasons = DropReasons::from_btf(&btf);
    let mut caps = vec![
        Capability {
            name: "kernel BTF",
            ok: true,
            detail: args.btf.display().to_string(),
        },
        Capability {
            name: "nf_conntrack module BTF",
            ok: std::path::Path::new("/sys/kernel/btf/nf_conntrack").exists(),
            detail:
                "/sys/kernel/btf/nf_conntrack (absent when conntrack is built in or not loaded)"
                    .into(),
        },
        Capability {
            name: "drop reasons",
            ok: reasons
                .as_ref()
                .map(|r| r.value("NETFILTER_DROP").is_some())
                .unwrap_or(false),
            detail: match &reasons {
                Ok(r) => format!(
                    "NETFILTER_DROP = {}",
                    r.value("NETFILTER_DROP")
                        .map(|v| v.to_string())
                        .unwrap_or("absent".into())
                ),
                Err(e) => format!("{e:#}"),
            },
        },
        Capability {
            name: "kprobe PMU",
            ok: tier::kprobes_available(),
            detail: "/sys/bus/event_source/devices/kprobe".into(),
        },
        Capability {
            name: "nf_conntrack loaded",
            ok: capabilities::conntrack_loaded(),
            detail: "/proc/sys/net/netfilter/nf_conntrack_max".into(),
        },
    ];
    let offsets = btf.offsets()?;
    let mut filter: tracer_common::FilterConfig = bytemuck::Zeroable::zeroed();
    filter.netfilter_drop_reason = reasons
        .as_ref()
        .ok()
        .and_then(|r| r.value("NETFILTER_DROP"))
        .unwrap_or(u32::MAX);
    let tracer = Tracer::load(&LoadOptions {
        btf: &btf,
        offsets,
        filter,
        ring_size: 4096,
        mode: args.mode,
        count: tracer_common::CountConfig::EVERY_DROP,
    });
    let (tp_ok, tp_detail, mechanisms) = match &tracer {
        Ok(t) => (
            true,
            format!("kfree_skb attached in {} ms", t.attach_time.as_millis()),
            t.mechanisms.clone(),
        ),
        Err(e) => (false, format!("{e:#}"), Vec::new()),
    };
    caps.insert(
        1,
        Capability {
            name: "tp_btf",
            ok: tp_ok,
            detail: tp_detail,
        },
    );
    let fentry = Tracer::try_fentry(&btf);
    caps.push(Capability {
        name: "fentry",
        ok: fentry.is_ok(),
        detail: match &fentry {
            Ok(()) => "loads (conntrack probes still use kprobes: aya 0.14 cannot fentry module functions)".into(),
            Err(e) => format!("refused: {}", format!("{e:#}").trim().trim_end_matches("Verifier output:").trim_end()),
        },
    });
    drop(tracer);
    let uses = |what: &str| {
        mechanisms
            .iter()
            .any(|m| m.chosen.as_deref().is_some_and(|c| c.contains(what)))
    };
    let tier_name = if uses("kretprobe") {
        "kprobe"
    } else if uses("bpf netfilter hooks") {
        "tracepoint+netfilter-hook"
    } else if uses("per-CPU conntrack counters") {
        "tracepoint+cpu-counters"
    } else {
        "tracepoint"
    };
    caps.push(netfilter_prog_capability(&btf));

    let limits = CtLimits::read();
    let mut registry = NsRegistry::new();
    registry.discover_all();
    let mut namespaces = Vec::new();
    let mut inodes = registry.inodes();
    inodes.sort();
    for ns in inodes {
        let name = registry.display_name(ns);
        let Some(h) = registry.get(ns) else { continue };
        if let Some(c) = h.counters() {
            let in_use = c.columns.iter().any(|(_, v)| *v != 0);
            if in_use {
                namespaces.push((ns, name, c));
            }
        }
    }

    let occupancy = if args.occupancy {
        Some(occupancy_reports(args.netns.as_deref())?)
    } else {
        None
    };

    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    if args.json {
        let v = serde_json::json!({
            "kind": "check",
            "tier": tier_name,
            "capabilities": caps.iter().map(|c| serde_json::json!({"name": c.name, "ok": c.ok, "detail": c.detail})).collect::<Vec<_>>(),
            "mechanisms": mechanisms.iter().map(|m| serde_json::json!({"signal": m.signal, "mechanism": m.chosen, "note": m.note})).collect::<Vec<_>>(),
            "conntrack": limits.map(|l| serde_json::json!({"max": l.max, "buckets": l.buckets})),
            "namespaces": namespaces.iter().map(|(ns, name, c)| serde_json::json!({
                "netns": ns, "netns_name": name, "count": c.entries(), "counters": c.columns,
            })).collect::<Vec<_>>(),
            "occupancy": occupancy.as_deref().map(occupancy_json),
        });
        writeln!(out, "{v}")?;
        return Ok(());
    }
    writeln!(out, "tier: {tier_name}")?;
    writeln!(out, "\nkernel capabilities (found by trying):")?;
    for c in &caps {
        writeln!(
            out,
            "  {:<24} {:<4} {}",
            c.name,
            if c.ok { "yes" } else { "no" },
            c.detail
        )?;
    }
    writeln!(out, "\nsignals:")?;
    for m in &mechanisms {
        match &m.chosen {
            Some(c) => writeln!(out, "  {:<14} {c}", m.signal)?,
            None => writeln!(out, "  {:<14} none: {}", m.signal, m.note)?,
        }
    }
    match limits {
        Some(l) => writeln!(
            out,
            "\nconntrack: nf_conntrack_max {} (global), buckets {}",
            l.max, l.buckets
        )?,
        None => writeln!(out, "\nconntrack: not loaded")?,
    }
    for (ns, name, c) in &namespaces {
        let fill = limits
            .map(|l| format!("{}/{}", c.entries(), l.max))
            .unwrap_or_else(|| c.entries().to_string());
        writeln!(
            out,
            "  ns {:<20} count {fill:<16} drop {} insert_failed {} early_drop {} invalid {} clashres {}",
            name.clone().unwrap_or_else(|| ns.to_string()),
            c.get("drop"),
            c.get("insert_failed"),
            c.get("early_drop"),
            c.get("invalid"),
            c.get("clashres")
        )?;
    }
    if let Some(reports) = &occupancy {
        writeln!(out)?;
        write_occupancy_human(reports, &mut out)?;
    }
    out.flush().context("writing check output")?;
    Ok(())
}

/// A namespace's table snapshot and the advice it leads to.
pub struct OccupancyReport {
    pub occupancy: Occupancy,
    pub advice: Vec<Advice>,
}

/// Snapshots of the namespace given, or of every namespace we can find
/// whose table has entries, each with its advice. A check sees one moment:
/// the table as it is now is the peak it knows.
pub fn occupancy_reports(netns: Option<&str>) -> Result<Vec<OccupancyReport>> {
    if !capabilities::conntrack_loaded() {
        return Ok(Vec::new());
    }
    let snaps = match netns {
        Some(arg) => vec![occupancy::snapshot_arg(Some(arg))?],
        None => {
            let mut registry = NsRegistry::new();
            registry.discover_all();
            let mut inodes = registry.inodes();
            inodes.sort();
            let mut v = Vec::new();
            for ns in inodes {
                let busy = registry
                    .get(ns)
                    .and_then(|h| h.counters())
                    .map(|c| c.entries() > 0)
                    .unwrap_or(false);
                if let (true, Some((_, path))) = (busy, find_namespace(ns)) {
                    v.push(occupancy::snapshot(
                        &path,
                        Some(ns),
                        registry.display_name(ns),
                    )?);
                }
            }
            v
        }
    };
    let limits = CtLimits::read();
    let host = Host::detect();
    Ok(snaps
        .into_iter()
        .map(|o| {
            let ev = NsEvidence {
                netns: o.netns,
                netns_name: o.netns_name.clone(),
                peak_entries: o.entries,
                occupancy: Some(&o),
                limits,
                ..Default::default()
            };
            let advice = advice::for_namespace(&ev, &host);
            OccupancyReport {
                occupancy: o,
                advice,
            }
        })
        .collect())
}

pub fn occupancy_json(reports: &[OccupancyReport]) -> serde_json::Value {
    reports
        .iter()
        .map(|r| {
            let mut v = r.occupancy.to_json();
            v["advice"] = advice::to_json(&r.advice);
            v
        })
        .collect::<Vec<_>>()
        .into()
}

pub fn write_occupancy_human(
    reports: &[OccupancyReport],
    out: &mut dyn Write,
) -> std::io::Result<()> {
    if reports.is_empty() {
        writeln!(out, "occupancy: no namespace has conntrack entries")?;
    }
    for r in reports {
        r.occupancy.write_human(out)?;
        advice::write_human(&r.advice, out)?;
    }
    Ok(())
}

/// Whether this kernel loads BPF_PROG_TYPE_NETFILTER programs, found by
/// loading a two-instruction one.
fn netfilter_prog_capability(btf: &KernelBtf) -> Capability {
    let r = crate::kernel::nfhook::HookAbi::from_btf(btf)
        .and_then(|abi| crate::kernel::nfhook::supported(&abi));
    Capability {
        name: "bpf netfilter prog",
        ok: r.is_ok(),
        detail: match r {
            Ok(()) => {
                "BPF_PROG_TYPE_NETFILTER loads (hook marks around conntrack, kernel 6.4+)".into()
            }
            Err(e) => format!("{e:#}"),
        },
    }
}
