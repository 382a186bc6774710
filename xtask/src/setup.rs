//! `cargo xtask setup`: each step checks first and only acts when something
//! is missing, so a second run costs well under a second.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _, Result};

use crate::{
    bpf_linker, proc,
    toolchains::{DIST_TARGETS, EBPF_NIGHTLY, RELEASE},
};

/// Debian packages the build, tests and demo shell out to.
pub const APT_PACKAGES: &[&str] = &[
    "iptables",              // reproduce the incident's rules (NOTRACK, state match)
    "nftables",              // nft -c checks the NOTRACK rules ctdrop advises
    "conntrack",             // list/flush the table the tests fill up
    "bpftool",               // inspect what ctdrop loaded when a test fails
    "iproute2",              // `ip netns` for the throwaway namespaces
    "iputils-ping",          // the lost pings themselves
    "kmod",                  // modprobe nf_conntrack
    "procps",                // sysctl nf_conntrack_max / _count
    "tshark",                // cross-check drops against a capture
    "prometheus",            // promtool, to validate the metrics output
    "bpftrace",              // the one-liners `cargo xtask bench` measures ctdrop against
    "linux-perf",            // `perf` to profile ctdrop when a bench target is missed
    "systemd",               // systemd-analyze verify for deploy/systemd (tests/tests/watch.rs)
    "tmux",                  // drive `ctdrop top` in a real terminal (tests/tests/see.rs)
    "chromium",              // open the HTML report headless: screenshot, no fetches, numbers
    "aha",                   // tmux pane with colours -> HTML, for the `top` screenshot
    "gcc-aarch64-linux-gnu", // linker driver for the aarch64 musl release binary (dist)
    "qemu-user-static",      // runs that aarch64 binary in the ship tests
    "buildah",               // `cargo xtask image`: the FROM scratch OCI archive
    "podman",                // runs `ctdrop check` in that image (ship tests)
    "umoci",                 // unpacks the image when containers cannot run
];

/// Without this the wireshark-common postinst asks whether non-root users
/// may capture, and the install hangs on a prompt.
const TSHARK_PRESEED: &str = "wireshark-common wireshark-common/install-setuid boolean false\n";

pub fn run() -> Result<()> {
    apt_packages()?;
    let sysroot = nightly()?;
    bpf_linker::ensure(&sysroot)?;
    release_toolchain()?;
    lint_components()?;
    pip_tools()
}

/// rustfmt and clippy for the lint gate of `cargo xtask test`: on the
/// toolchain that runs cargo here, and clippy on the eBPF nightly too.
fn lint_components() -> Result<()> {
    let active = proc::probe(
        Command::new("rustup")
            .args(["show", "active-toolchain"])
            .stderr(Stdio::null()),
    )
    .and_then(|s| s.split_whitespace().next().map(str::to_owned))
    .context("cannot tell rustup's active toolchain")?;
    for (toolchain, components) in [
        (active.as_str(), &["rustfmt", "clippy"][..]),
        (EBPF_NIGHTLY, &["clippy"][..]),
    ] {
        let have = proc::probe(
            Command::new("rustup")
                .args(["component", "list", "--installed", "--toolchain", toolchain])
                .stderr(Stdio::null()),
        )
        .unwrap_or_default();
        let missing: Vec<&str> = components
            .iter()
            .copied()
            .filter(|c| !have.lines().any(|l| l.starts_with(&format!("{c}-"))))
            .collect();
        if missing.is_empty() {
            continue;
        }
        println!("setup: adding {} to {toolchain}", missing.join(" "));
        proc::check(
            Command::new("rustup")
                .args(["component", "add", "--toolchain", toolchain])
                .args(&missing),
        )?;
    }
    println!("setup: lint components ok");
    Ok(())
}

/// PyPI tools the tests run: kubernetes-validate checks the DaemonSet
/// against the Kubernetes schemas offline (they ship inside the package).
fn pip_tools() -> Result<()> {
    const KUBERNETES_VALIDATE: &str = "1.37.0";
    let have = proc::probe(
        Command::new("kubernetes-validate")
            .arg("--version")
            .stderr(Stdio::null()),
    );
    if have.as_deref().map(str::trim) == Some(KUBERNETES_VALIDATE) {
        println!("setup: kubernetes-validate {KUBERNETES_VALIDATE} ok");
        return Ok(());
    }
    println!("setup: pip: installing kubernetes-validate {KUBERNETES_VALIDATE}");
    proc::check(
        Command::new("python3")
            .args(["-m", "pip", "install", "--quiet"])
            .arg(format!("kubernetes-validate=={KUBERNETES_VALIDATE}")),
    )
}

/// The pinned stable toolchain and the musl targets `cargo xtask dist`
/// builds for; rustup skips what is already there.
fn release_toolchain() -> Result<()> {
    let have = proc::probe(
        Command::new("rustup")
            .args(["target", "list", "--installed", "--toolchain", RELEASE])
            .stderr(Stdio::null()),
    )
    .unwrap_or_default();
    if DIST_TARGETS
        .iter()
        .all(|t| have.lines().any(|l| l.trim() == *t))
    {
        println!("setup: {RELEASE} ok (targets {})", DIST_TARGETS.join(" "));
        return Ok(());
    }
    println!(
        "setup: installing {RELEASE} with targets {}",
        DIST_TARGETS.join(" ")
    );
    proc::check(Command::new("rustup").args([
        "toolchain",
        "install",
        RELEASE,
        "--profile",
        "minimal",
        "--target",
        // One comma-separated value: rustup 1.29 takes a single
        // value per --target and reads a second word as another
        // toolchain name ("invalid toolchain name").
        &DIST_TARGETS.join(","),
    ]))
}

fn apt_packages() -> Result<()> {
    let missing = missing_packages()?;
    if missing.is_empty() {
        println!("setup: apt packages ok ({})", APT_PACKAGES.len());
        return Ok(());
    }
    println!("setup: apt: installing {}", missing.join(" "));
    install_packages(&missing)?;
    let still = missing_packages()?;
    if !still.is_empty() {
        bail!(
            "apt packages still not installed after apt-get install: {}",
            still.join(" ")
        );
    }
    println!("setup: apt packages ok (installed {})", missing.join(" "));
    Ok(())
}

/// One dpkg-query for all packages keeps the no-op path fast.
fn missing_packages() -> Result<Vec<&'static str>> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Package} ${Status}\n"])
        .args(APT_PACKAGES)
        .stderr(Stdio::null())
        .output()
        .context("cannot run dpkg-query (setup supports Debian-based systems only)")?;
    // Exits non-zero when some package is unknown; the known ones are still listed.
    let listing = String::from_utf8_lossy(&out.stdout);
    let installed: Vec<&str> = listing
        .lines()
        .filter(|l| l.ends_with(" install ok installed"))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    Ok(APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| !installed.contains(p))
        .collect())
}

fn install_packages(pkgs: &[&str]) -> Result<()> {
    proc::check(Command::new("apt-get").args(["update", "-q"]))
        .context("apt-get update (root needed)")?;
    if pkgs.contains(&"tshark") {
        preseed_tshark()?;
    }
    proc::check(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(pkgs),
    )
    .with_context(|| format!("installing apt packages {}", pkgs.join(" ")))
}

fn preseed_tshark() -> Result<()> {
    let mut child = Command::new("debconf-set-selections")
        .stdin(Stdio::piped())
        .spawn()
        .context("cannot run debconf-set-selections")?;
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(TSHARK_PRESEED.as_bytes())
        .context("writing the tshark debconf preseed")?;
    let st = child.wait().context("waiting for debconf-set-selections")?;
    if !st.success() {
        bail!("debconf-set-selections failed ({st}): preseeding wireshark-common");
    }
    Ok(())
}

/// aya-build compiles the eBPF crate with the pinned nightly and `-Z build-std=core`,
/// which needs rust-src. Returns the nightly sysroot.
fn nightly() -> Result<PathBuf> {
    let sysroot = match nightly_sysroot() {
        Some(s) => s,
        None => {
            println!("setup: installing {EBPF_NIGHTLY}");
            proc::check(Command::new("rustup").args([
                "toolchain",
                "install",
                EBPF_NIGHTLY,
                "--profile",
                "minimal",
            ]))?;
            nightly_sysroot().with_context(|| {
                format!("{EBPF_NIGHTLY} still unusable after `rustup toolchain install`")
            })?
        }
    };
    if !has_rust_src(&sysroot) {
        println!("setup: adding rust-src to {EBPF_NIGHTLY}");
        proc::check(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            EBPF_NIGHTLY,
        ]))?;
    }
    println!("setup: {EBPF_NIGHTLY} ok (with rust-src)");
    Ok(sysroot)
}

fn nightly_sysroot() -> Option<PathBuf> {
    // Auto-install off: a probe must not silently pull a full default-profile toolchain.
    let out = proc::probe(
        Command::new("rustup")
            .env("RUSTUP_AUTO_INSTALL", "0")
            .args(["run", EBPF_NIGHTLY, "rustc", "--print", "sysroot"])
            .stderr(Stdio::null()),
    )?;
    Some(PathBuf::from(out.trim())).filter(|p| p.is_dir())
}

fn has_rust_src(sysroot: &Path) -> bool {
    sysroot.join("lib/rustlib/src/rust/library").is_dir()
}
