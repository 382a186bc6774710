//! What this kernel and this process allow, found by looking (never by
//! version numbers). Each failure becomes one line an operator can act on.

use std::path::Path;

use anyhow::{bail, Result};

pub const DEFAULT_BTF: &str = "/sys/kernel/btf/vmlinux";

/// Refuses early, with one clear line, when we cannot load programs.
pub fn require_root() -> Result<()> {
    if unsafe { libc::geteuid() } != 0 {
        bail!("ctdrop needs root (CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN) to load kernel programs: run it with sudo");
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
    if Path::new("/sys/kernel/tracing/events").exists() || Path::new("/sys/kernel/debug/tracing/events").exists() {
        return Ok(());
    }
    let target = std::ffi::CString::new("/sys/kernel/tracing").unwrap();
    let fstype = std::ffi::CString::new("tracefs").unwrap();
    let rc = unsafe { libc::mount(fstype.as_ptr(), target.as_ptr(), fstype.as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        bail!(
            "tracefs is not mounted and mounting it failed ({}): mount -t tracefs tracefs /sys/kernel/tracing",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}
