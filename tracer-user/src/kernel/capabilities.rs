//! What this kernel and this process allow, found by looking (never by
//! version numbers). Each failure becomes one line an operator can act on.

use std::path::Path;

use anyhow::{bail, Result};

pub const DEFAULT_BTF: &str = "/sys/kernel/btf/vmlinux";

/// One capability a subcommand needs, and what for (said in the error).
pub struct Need {
    pub bit: u32,
    pub name: &'static str,
    pub why: &'static str,
}

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_PTRACE: u32 = 19;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// What tracing (`live`, `capture`, `check`) needs, found by running `live`
/// as an unprivileged uid with one capability fewer each time
/// (tests/tests/ship.rs keeps it exact).
pub const TRACING: &[Need] = &[
    Need { bit: CAP_BPF, name: "CAP_BPF", why: "load the kernel programs and maps" },
    Need { bit: CAP_PERFMON, name: "CAP_PERFMON", why: "attach to kfree_skb and read kernel memory from BPF" },
    Need {
        bit: CAP_SYS_ADMIN,
        name: "CAP_SYS_ADMIN",
        why: "enter other network namespaces (setns) to read their conntrack counters and interface names",
    },
    Need {
        bit: CAP_SYS_PTRACE,
        name: "CAP_SYS_PTRACE",
        why: "find unnamed namespaces through other users' /proc/PID/ns/net",
    },
    Need {
        bit: CAP_NET_ADMIN,
        name: "CAP_NET_ADMIN",
        why: "dump a full conntrack table over netlink for its snapshot (EPERM without)",
    },
];

/// Refuses early, with one line naming every missing capability, when this
/// process cannot do what `what` needs. Root has them all; a service can be
/// given exactly these (systemd AmbientCapabilities=, a pod's
/// securityContext.capabilities.add, `setpriv --ambient-caps`).
pub fn require(what: &str, needs: &[Need]) -> Result<()> {
    let eff = effective().unwrap_or(0);
    let missing: Vec<&Need> = needs.iter().filter(|n| !has(eff, n.bit)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let list: Vec<String> = missing
        .iter()
        .map(|n| format!("{} (to {})", n.name, n.why))
        .collect();
    let all: Vec<&str> = needs.iter().map(|n| n.name).collect();
    bail!(
        "{what} needs {}; missing: {}. Run it as root or grant exactly those capabilities",
        all.join(", "),
        list.join("; ")
    )
}

/// The kernel lets CAP_SYS_ADMIN stand in for CAP_BPF and CAP_PERFMON
/// (bpf_capable(), perfmon_capable()); kernels before 5.8 know only it.
fn has(eff: u64, bit: u32) -> bool {
    let set = |b: u32| eff & (1u64 << b) != 0;
    set(bit) || (matches!(bit, CAP_BPF | CAP_PERFMON) && set(CAP_SYS_ADMIN))
}

/// This process's effective capability set (`CapEff` in /proc/self/status).
fn effective() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_cap_eff(&status)
}

fn parse_cap_eff(status: &str) -> Option<u64> {
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))?
        .trim();
    u64::from_str_radix(hex, 16).ok()
}

/// Refuses early, with one clear line, unless root: for `demo`, which
/// creates namespaces, changes sysctls and runs iptables and ping.
pub fn require_root() -> Result<()> {
    // SAFETY: geteuid has no arguments and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("ctdrop demo needs root (it creates network namespaces and changes sysctls): run it with sudo");
    }
    Ok(())
}

pub fn require_btf(path: &Path) -> Result<()> {
    match std::fs::File::open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "no kernel BTF at {} (kernel built without CONFIG_DEBUG_INFO_BTF?): point --btf at a BTF file for this kernel",
            path.display()
        ),
        Err(e) => bail!("cannot read kernel BTF at {}: {e}", path.display()),
    }
}

/// Whether nf_conntrack is loaded (built in or as a module) on this host.
pub fn conntrack_loaded() -> bool {
    Path::new("/proc/sys/net/netfilter/nf_conntrack_max").exists()
}

/// tracefs is only needed by classic tracepoints and legacy kprobe
/// attachment; mount it when it is missing so those tiers can be tried.
pub fn ensure_tracefs() -> Result<()> {
    if Path::new("/sys/kernel/tracing/events").exists()
        || Path::new("/sys/kernel/debug/tracing/events").exists()
    {
        return Ok(());
    }
    let target = std::ffi::CString::new("/sys/kernel/tracing").unwrap();
    let fstype = std::ffi::CString::new("tracefs").unwrap();
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        bail!(
            "tracefs is not mounted and mounting it failed ({}): mount -t tracefs tracefs /sys/kernel/tracing",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_eff_is_read_from_proc_status() {
        let status = "Name:\tctdrop\nCapInh:\t0000000000000000\nCapEff:\t000000c000200000\n";
        assert_eq!(parse_cap_eff(status), Some(0xc0_0020_0000));
        assert_eq!(parse_cap_eff("Name: x\n"), None);
    }

    #[test]
    fn sys_admin_stands_in_for_bpf_and_perfmon_only() {
        let admin = 1u64 << CAP_SYS_ADMIN;
        assert!(has(admin, CAP_BPF) && has(admin, CAP_PERFMON));
        assert!(!has(admin, CAP_SYS_PTRACE));
        assert!(!has(1u64 << CAP_BPF, CAP_PERFMON));
    }
}
