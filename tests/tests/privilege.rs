//! Least privilege: `live` needs CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN,
//! CAP_SYS_PTRACE and CAP_NET_ADMIN, not root. Run as an unprivileged uid (nobody) holding
//! exactly that set as ambient capabilities it counts a full table exactly;
//! with any one of them missing it refuses in one line naming it. Needs
//! root (to hand out the capabilities); run under the dev lock.

use std::time::Duration;

use ctdrop_tests::*;

const MAX: u64 = 64;
const NOBODY: &str = "65534";

/// The set ctdrop documents for tracing, in setpriv's spelling.
const TRACING: &[&str] = &["bpf", "perfmon", "sys_admin", "sys_ptrace", "net_admin"];

/// `setpriv` turning this (root) test into uid/gid nobody with exactly
/// `caps` inheritable and ambient, hence effective in ctdrop after exec.
fn as_nobody_with(caps: &[&str]) -> Vec<String> {
    let set: String = caps.iter().map(|c| format!(",+{c}")).collect();
    vec![
        "setpriv".into(),
        format!("--reuid={NOBODY}"),
        format!("--regid={NOBODY}"),
        "--clear-groups".into(),
        format!("--inh-caps=-all{set}"),
        format!("--ambient-caps=-all{set}"),
    ]
}

#[test]
fn live_as_nobody_with_exactly_the_tracing_capabilities_counts_a_full_table_exactly() {
    const N: u16 = 100;
    let (topo, _max) = full_table_pair(MAX);
    let bin = ctdrop_bin().to_string_lossy().into_owned();
    let mut argv = as_nobody_with(TRACING);
    argv.extend([
        bin,
        "live".into(),
        "--json".into(),
        "--netns".into(),
        topo.receiver.name.clone(),
    ]);
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let c = Ctdrop::spawn_argv(&argv).unwrap();
    let status = std::fs::read_to_string(format!("/proc/{}/status", c.pid())).unwrap();
    assert!(
        status.lines().any(|l| l
            .split_whitespace()
            .eq(["Uid:", NOBODY, NOBODY, NOBODY, NOBODY])),
        "not running as nobody:\n{status}"
    );
    let before = ct_stats(&topo.receiver).unwrap();
    send_udp_flows(&topo.sender, topo.receiver_addr, 20_000, N).unwrap();
    let after = settled_ct_stats(&topo.receiver, "drop").unwrap();
    let out = c.stop().unwrap();
    assert!(out.status.success(), "{:?}\n{}", out.status, out.stderr);
    let rx = topo.receiver.inode().unwrap();
    let drop_delta = after["drop"] - before["drop"];
    assert_flows_dropped_exact(&out, rx, drop_delta, N);
}

#[test]
fn live_without_any_one_tracing_capability_refuses_naming_it() {
    for (i, missing) in TRACING.iter().enumerate() {
        let rest: Vec<&str> = TRACING
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, c)| *c)
            .collect();
        // CAP_SYS_ADMIN stands in for CAP_BPF and CAP_PERFMON in the kernel,
        // so those two can only be missing when it is missing too.
        let rest: Vec<&str> = if matches!(*missing, "bpf" | "perfmon") {
            rest.into_iter().filter(|c| *c != "sys_admin").collect()
        } else {
            rest
        };
        let prefix = as_nobody_with(&rest);
        let prefix: Vec<&str> = prefix.iter().map(String::as_str).collect();
        let out = run_ctdrop(
            &prefix,
            &["live", "--duration", "1s"],
            Duration::from_secs(30),
        )
        .unwrap();
        let name = format!("CAP_{}", missing.to_uppercase());
        let lines = out.stderr_lines();
        assert!(!out.status.success(), "ran without {name}: {}", out.stderr);
        assert_eq!(
            lines.len(),
            1,
            "without {name}: not one line: {}",
            out.stderr
        );
        let missing_part = lines[0]
            .split("missing:")
            .nth(1)
            .unwrap_or_else(|| panic!("without {name}: {}", lines[0]));
        assert!(
            missing_part.contains(&name),
            "without {name}, the error names something else: {}",
            lines[0]
        );
    }
}
