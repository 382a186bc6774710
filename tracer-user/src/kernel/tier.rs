//! Which mechanism serves each signal on this kernel, found by trying.
//!
//! Drops always come from `tp_btf/kfree_skb`. Which of them conntrack made
//! is told, by default, at the drop itself from conntrack's own per-CPU
//! counters (`cpustat.rs`): nothing runs on packets that live. Failing
//! that, or where asked for: kprobes/kretprobes on the conntrack functions
//! (distribution kernels; they also count evictions, clashes and inserts),
//! BPF netfilter programs marking each packet around conntrack's hooks
//! (kernel 6.4+, `nfhook.rs`), or inference from the namespace's totals.

use std::collections::HashSet;

use anyhow::{anyhow, bail, Result};
use aya::{programs::KProbe, Ebpf};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Conntrack's per-CPU counters read at each drop where they can be
    /// read (nothing runs on packets that live); else kprobes, else
    /// netfilter hook marks, else inference from the namespace's totals.
    Auto,
    /// tp_btf only: conntrack causes from conntrack's per-CPU counters,
    /// read at each drop (or, where they cannot be read, inferred from the
    /// namespace's totals).
    Tracepoint,
    /// kprobes/kretprobes on the conntrack functions (fail if
    /// unavailable): also counts early_drop evictions, resolved clashes
    /// and insertions, at a cost on every packet conntrack sees.
    Kprobe,
    /// fentry/fexit (fail if unavailable).
    Fentry,
    /// BPF netfilter programs marking each packet around conntrack's hooks
    /// (kernel 6.4+; fail if unavailable). Auto picks them only where
    /// neither kprobes nor the per-CPU counters serve.
    NetfilterHook,
}

/// One signal and how it is served (or why it is not).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mechanism {
    pub signal: &'static str,
    pub chosen: Option<String>,
    pub note: String,
}

/// A conntrack-path program: which signal it serves, where it attaches.
pub struct CtProbe {
    pub program: &'static str,
    pub function: &'static str,
    pub ret: bool,
    pub signal: &'static str,
}

/// Attached return probes first (see `attach_ct_probes`).
pub const CT_PROBES: &[CtProbe] = &[
    CtProbe {
        program: "ct_in_entry",
        function: "nf_conntrack_in",
        ret: false,
        signal: "conntrack_in",
    },
    CtProbe {
        program: "ct_in_return",
        function: "nf_conntrack_in",
        ret: true,
        signal: "conntrack_in",
    },
    CtProbe {
        program: "ct_alloc_return",
        function: "__nf_conntrack_alloc",
        ret: true,
        signal: "table_full",
    },
    CtProbe {
        program: "ct_confirm_entry",
        function: "__nf_conntrack_confirm",
        ret: false,
        signal: "insert_failed",
    },
    CtProbe {
        program: "ct_confirm_return",
        function: "__nf_conntrack_confirm",
        ret: true,
        signal: "insert_failed",
    },
    CtProbe {
        program: "ct_early_drop_entry",
        function: "early_drop",
        ret: false,
        signal: "early_drop",
    },
    CtProbe {
        program: "ct_early_drop_return",
        function: "early_drop",
        ret: true,
        signal: "early_drop",
    },
    CtProbe {
        program: "ct_clash_entry",
        function: "nf_ct_resolve_clash",
        ret: false,
        signal: "clash_resolve",
    },
    CtProbe {
        program: "ct_clash_return",
        function: "nf_ct_resolve_clash",
        ret: true,
        signal: "clash_resolve",
    },
    CtProbe {
        program: "ct_hash_insert",
        function: "__nf_conntrack_hash_insert",
        ret: false,
        signal: "inserts",
    },
];

/// Signals in display order.
pub const SIGNALS: &[&str] = &[
    "drops",
    "table_full",
    "insert_failed",
    "conntrack_in",
    "early_drop",
    "clash_resolve",
    "inserts",
];

/// Whether the kernel has a kprobe PMU (perf-based kprobes, no tracefs).
pub fn kprobes_available() -> bool {
    std::path::Path::new("/sys/bus/event_source/devices/kprobe/type").exists()
}

/// Function names from /proc/kallsyms (module symbols included).
pub fn kallsyms_functions(wanted: &[&str]) -> HashSet<String> {
    let mut found = HashSet::new();
    if let Ok(text) = std::fs::read_to_string("/proc/kallsyms") {
        for line in text.lines() {
            let mut it = line.split_whitespace();
            let (_, Some(kind), Some(name)) = (it.next(), it.next(), it.next()) else {
                continue;
            };
            if matches!(kind, "t" | "T") && wanted.contains(&name) {
                found.insert(name.to_string());
            }
        }
    }
    found
}

/// Whether conntrack probes should be tried in this mode on this kernel:
/// where asked for, or in auto mode where the per-CPU counter witness
/// cannot serve (the probes on `nf_conntrack_in` run on every packet).
pub fn want_kprobes(mode: Mode, cpu_stat: bool) -> bool {
    match mode {
        Mode::Kprobe => kprobes_available(),
        Mode::Auto => kprobes_available() && !cpu_stat,
        _ => false,
    }
}

/// Whether netfilter hook marks should be tried: where asked for, or in
/// auto mode when neither the per-CPU counter witness nor kprobes serve
/// the conntrack paths (the hooks run on every packet; the witness only
/// on drops).
pub fn want_hooks(mode: Mode, cpu_stat: bool) -> bool {
    match mode {
        Mode::NetfilterHook => true,
        Mode::Auto => !kprobes_available() && !cpu_stat,
        _ => false,
    }
}

/// Mechanisms when `kfree_skb` reads conntrack's per-CPU counters.
pub fn cpu_stat_mechanisms() -> Vec<Mechanism> {
    let witness = |what: &str| {
        Some(format!(
            "tp_btf/kfree_skb reads the namespace's per-CPU conntrack counters at each netfilter drop: {what}"
        ))
    };
    SIGNALS
        .iter()
        .skip(1)
        .map(|s| {
            let (chosen, note) = match *s {
                "table_full" => (witness("`drop` rose"), String::new()),
                "insert_failed" => (
                    witness("`drop` and `insert_failed` rose (also at NOT_SPECIFIED frees of unconfirmed entries: after an NFQUEUE verdict)"),
                    String::new(),
                ),
                "conntrack_in" => (witness("`drop` and `invalid` rose"), String::new()),
                _ => (
                    None,
                    "no kprobes; per-namespace totals only, from /proc/net/stat/nf_conntrack"
                        .to_string(),
                ),
            };
            Mechanism {
                signal: s,
                chosen,
                note,
            }
        })
        .collect()
}

/// Mechanisms when the netfilter hook marks are attached.
pub fn hook_mechanisms(namespaces: usize) -> Vec<Mechanism> {
    let mark = |what: &str| {
        Some(format!("bpf netfilter hooks: {what} (IPv4+IPv6, {namespaces} namespaces at start, new ones as they appear)"))
    };
    SIGNALS
        .iter()
        .skip(1)
        .map(|s| {
            let (chosen, note) = match *s {
                "table_full" | "conntrack_in" => (mark("marks at priority -201/-199 (or the nearest free) around nf_conntrack_in on PRE_ROUTING and LOCAL_OUT"), String::new()),
                "insert_failed" => (mark("mark at INT_MAX-2 (or the nearest free below) before confirm on POST_ROUTING and LOCAL_IN, also after an NFQUEUE verdict"), String::new()),
                _ => (None, "no kprobes; per-namespace totals only, from /proc/net/stat/nf_conntrack".to_string()),
            };
            Mechanism { signal: s, chosen, note }
        })
        .collect()
}

pub fn check_mode(mode: Mode) -> Result<()> {
    match mode {
        Mode::Kprobe if !kprobes_available() => {
            bail!("--mode kprobe: this kernel has no kprobe support (no /sys/bus/event_source/devices/kprobe); use --mode tracepoint")
        }
        Mode::Fentry => bail!(
            "--mode fentry: ctdrop's conntrack probes use kprobes, because aya 0.14 cannot attach fentry to module functions (nf_conntrack is a module on distribution kernels); use --mode kprobe or auto"
        ),
        _ => Ok(()),
    }
}

/// Attaches every conntrack probe whose function exists; returns the
/// mechanism per signal. In `Mode::Kprobe`, failing to attach the
/// drop-path probes is an error.
pub fn attach_ct_probes(ebpf: &mut Ebpf, mode: Mode) -> Result<Vec<Mechanism>> {
    let functions: Vec<&str> = CT_PROBES.iter().map(|p| p.function).collect();
    let present = kallsyms_functions(&functions);
    let mut failures: Vec<(&'static str, String)> = Vec::new();
    let mut attached: Vec<&'static str> = Vec::new();
    let mut links = Vec::new();
    // Return probes before entry probes: a kretprobe catches only calls that
    // enter after it is attached, so a call then either meets both probes
    // or only the return one (its pop finds an empty stash). Entry probes
    // first left, under a flood, every call entered in between with a push
    // and no pop: the per-CPU stash stayed too deep for good and every later
    // conntrack drop went without its verdict (all 20,060 table-full drops
    // called rule drops when ctdrop started during a flood on 6.12).
    let ordered = CT_PROBES
        .iter()
        .filter(|p| p.ret)
        .chain(CT_PROBES.iter().filter(|p| !p.ret));
    for p in ordered {
        if !present.contains(p.function) {
            failures.push((
                p.signal,
                format!(
                    "{} not in /proc/kallsyms (inlined, renamed or nf_conntrack not loaded)",
                    p.function
                ),
            ));
            continue;
        }
        let r = (|| -> Result<()> {
            let prog: &mut KProbe = ebpf
                .program_mut(p.program)
                .ok_or_else(|| anyhow!("no program {}", p.program))?
                .try_into()?;
            prog.load().map_err(|e| anyhow!("{e}"))?;
            let link = prog.attach(p.function, 0).map_err(|e| anyhow!("{e}"))?;
            links.push((p.program, link));
            Ok(())
        })();
        match r {
            Ok(()) => attached.push(p.program),
            Err(e) => failures.push((
                p.signal,
                format!(
                    "{} on {}: {e:#}",
                    if p.ret { "kretprobe" } else { "kprobe" },
                    p.function
                ),
            )),
        }
    }
    let mut out = Vec::new();
    for signal in SIGNALS.iter().skip(1) {
        let progs: Vec<&CtProbe> = CT_PROBES.iter().filter(|p| p.signal == *signal).collect();
        let all_ok = progs.iter().all(|p| attached.contains(&p.program));
        let why = failures
            .iter()
            .find(|(s, _)| s == signal)
            .map(|(_, w)| w.clone());
        if all_ok {
            let kinds: Vec<String> = progs
                .iter()
                .map(|p| {
                    format!(
                        "{}/{}",
                        if p.ret { "kretprobe" } else { "kprobe" },
                        p.function
                    )
                })
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            out.push(Mechanism {
                signal,
                chosen: Some(kinds.join(" + ")),
                note: String::new(),
            });
        } else {
            // Detach the half that did attach, so a stash never fills
            // without its pair.
            for p in &progs {
                while let Some(i) = links.iter().position(|(name, _)| *name == p.program) {
                    let (_, link) = links.swap_remove(i);
                    if let Some(Ok(prog)) = ebpf.program_mut(p.program).map(<&mut KProbe>::try_from)
                    {
                        let _ = prog.detach(link);
                    }
                }
            }
            out.push(Mechanism {
                signal,
                chosen: None,
                note: why.unwrap_or_else(|| "not attached".into()),
            });
        }
    }
    if mode == Mode::Kprobe {
        for must in ["table_full", "insert_failed", "conntrack_in"] {
            if let Some(m) = out.iter().find(|m| m.signal == must && m.chosen.is_none()) {
                bail!("--mode kprobe: cannot watch {must}: {}", m.note);
            }
        }
    }
    Ok(out)
}

/// Mechanisms when no conntrack probe is attached.
pub fn tracepoint_mechanisms(why: &str) -> Vec<Mechanism> {
    SIGNALS
        .iter()
        .skip(1)
        .map(|s| {
            let (chosen, note) = match *s {
                "table_full" => (
                    Some("inferred: NETFILTER_DROP without an entry while the namespace table is at nf_conntrack_max, cross-checked with its `drop` counter".to_string()),
                    why.to_string(),
                ),
                "insert_failed" | "early_drop" | "clash_resolve" | "inserts" => {
                    (None, format!("{why}; per-namespace totals only, from /proc/net/stat/nf_conntrack"))
                }
                _ => (None, why.to_string()),
            };
            Mechanism { signal: s, chosen, note }
        })
        .collect()
}
