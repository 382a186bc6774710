//! `cargo xtask dist`: the release tarballs an on-call engineer copies to a
//! sick host. One static, stripped musl binary per architecture with the
//! eBPF object embedded (tracer-user's build script does that), plus the
//! README, the licence texts, man pages and shell completions, and a
//! sha256 file. Built with the toolchains pinned in toolchains.rs, and
//! packed reproducibly (sorted names, fixed owner, the last commit's time),
//! so the same commit on a new machine yields the same tarball.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, ensure, Context as _, Result};

use crate::{
    env, proc, setup,
    toolchains::{DIST_TARGETS, RELEASE},
};

/// What one target produced (`image` packs the binary).
pub struct Artefact {
    pub binary: PathBuf,
}

pub fn run(only: &[String]) -> Result<Vec<Artefact>> {
    setup::run()?;
    for t in only {
        ensure!(
            DIST_TARGETS.contains(&t.as_str()),
            "unknown dist target {t} (known: {})",
            DIST_TARGETS.join(", ")
        );
    }
    let targets: Vec<&'static str> = DIST_TARGETS
        .iter()
        .copied()
        .filter(|t| only.is_empty() || only.iter().any(|o| o == t))
        .collect();
    let dist = env::target_dir().join("dist");
    fs::create_dir_all(&dist).with_context(|| format!("creating {}", dist.display()))?;
    let epoch = source_date_epoch()?;
    let mut built = Vec::new();
    for target in &targets {
        let binary = build(target)?;
        check_static(&binary, target)?;
        built.push((*target, binary));
    }
    // The man pages and completions come from the binary's own clap
    // definitions; any binary this host can run writes the same ones.
    let assets = dist.join("assets");
    let _ = fs::remove_dir_all(&assets);
    let runner = host_runnable(&built)?;
    proc::check(Command::new(runner).arg("__dist-assets").arg(&assets))?;
    let mut out = Vec::new();
    for (target, binary) in built {
        let tarball = pack(&dist, target, &binary, &assets, epoch)?;
        println!(
            "dist: {} ({} bytes; binary {} bytes)",
            tarball.display(),
            size(&tarball)?,
            size(&binary)?
        );
        out.push(Artefact { binary });
    }
    Ok(out)
}

/// `aarch64-unknown-linux-musl` -> `AARCH64_UNKNOWN_LINUX_MUSL`, cargo's
/// spelling of a target in environment variables.
fn env_key(target: &str) -> String {
    target.replace('-', "_").to_uppercase()
}

/// `rustup run <pinned>` so the release binary never depends on whichever
/// stable the machine happens to have. Stripping is a target-only rustflag:
/// a profile setting would also apply to build scripts and make every later
/// `cargo xtask build` rebuild them.
fn build(target: &str) -> Result<PathBuf> {
    let key = env_key(target);
    let mut cmd = Command::new("rustup");
    cmd.args([
        "run",
        RELEASE,
        "cargo",
        "build",
        "--release",
        "-p",
        "tracer-user",
    ])
    .args(["--target", target])
    .env(format!("CARGO_TARGET_{key}_RUSTFLAGS"), "-Cstrip=symbols")
    .current_dir(env::repo_root());
    // The cargo that runs xtask exports these; the pinned one must use its own.
    for var in ["CARGO", "RUSTC", "RUSTDOC", "RUSTUP_TOOLCHAIN"] {
        cmd.env_remove(var);
    }
    if !target.starts_with(std::env::consts::ARCH) {
        // Rust's musl targets bring their own libc and start files; only a
        // linker driver for the architecture is needed (Debian's
        // gcc-<arch>-linux-gnu, which setup installs).
        let arch = target.split('-').next().unwrap_or(target);
        cmd.env(
            format!("CARGO_TARGET_{key}_LINKER"),
            format!("{arch}-linux-gnu-gcc"),
        );
    }
    proc::check(&mut cmd)?;
    let bin = env::target_dir().join(target).join("release/ctdrop");
    ensure!(
        bin.is_file(),
        "cargo build succeeded but {} is missing",
        bin.display()
    );
    Ok(bin)
}

/// Static means: no program interpreter (PT_INTERP), hence no libc, no
/// ld.so, nothing of the host's userland needed. Checked on the ELF itself.
fn check_static(bin: &Path, target: &str) -> Result<()> {
    let elf = fs::read(bin).with_context(|| format!("reading {}", bin.display()))?;
    let (machine, interp) = elf_facts(&elf)
        .with_context(|| format!("{} is not a 64-bit little-endian ELF", bin.display()))?;
    let want = if target.starts_with("aarch64") {
        EM_AARCH64
    } else {
        EM_X86_64
    };
    ensure!(
        machine == want,
        "{} has ELF machine {machine}, expected {want}",
        bin.display()
    );
    ensure!(
        !interp,
        "{} has a program interpreter: it is not static",
        bin.display()
    );
    Ok(())
}

const EM_X86_64: u16 = 62;
const EM_AARCH64: u16 = 183;
const PT_INTERP: u32 = 3;

/// (e_machine, has PT_INTERP) of an ELF64 little-endian file.
fn elf_facts(elf: &[u8]) -> Option<(u16, bool)> {
    let u16_at = |o: usize| Some(u16::from_le_bytes(elf.get(o..o + 2)?.try_into().ok()?));
    let u32_at = |o: usize| Some(u32::from_le_bytes(elf.get(o..o + 4)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(elf.get(o..o + 8)?.try_into().ok()?));
    if elf.get(..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    let phoff = usize::try_from(u64_at(0x20)?).ok()?;
    let (phentsize, phnum) = (usize::from(u16_at(0x36)?), usize::from(u16_at(0x38)?));
    let mut interp = false;
    for i in 0..phnum {
        interp |= u32_at(phoff + i * phentsize)? == PT_INTERP;
    }
    Some((u16_at(0x12)?, interp))
}

fn host_runnable(built: &[(&'static str, PathBuf)]) -> Result<PathBuf> {
    built
        .iter()
        .find(|(t, _)| t.starts_with(std::env::consts::ARCH))
        .map(|(_, b)| b.clone())
        .with_context(|| {
            format!(
                "the man pages are written by running ctdrop: also build the {} target",
                std::env::consts::ARCH
            )
        })
}

/// `ctdrop-VERSION-ARCH-linux/` with everything in it, packed, and its
/// sha256 beside it in `sha256sum -c` format.
fn pack(dist: &Path, target: &str, binary: &Path, assets: &Path, epoch: u64) -> Result<PathBuf> {
    let arch = target.split('-').next().unwrap_or(target);
    let name = format!("ctdrop-{}-{arch}-linux", env!("CARGO_PKG_VERSION"));
    let stage = dist.join(&name);
    let _ = fs::remove_dir_all(&stage);
    fs::create_dir_all(&stage).with_context(|| format!("creating {}", stage.display()))?;
    copy(binary, &stage.join("ctdrop"))?;
    let root = env::repo_root();
    for doc in ["README.md", "LICENSE-MIT", "LICENSE-APACHE"] {
        copy(&root.join(doc), &stage.join(doc))?;
    }
    proc::check(
        Command::new("cp")
            .arg("-r")
            .arg(assets.join("man"))
            .arg(assets.join("completions"))
            .arg(&stage),
    )?;
    let tarball = dist.join(format!("{name}.tar.gz"));
    proc::check(
        Command::new("tar")
            .args(["--sort=name", "--owner=0", "--group=0", "--numeric-owner"])
            .arg(format!("--mtime=@{epoch}"))
            .args(["--use-compress-program", "gzip -n -9", "-cf"])
            .arg(&tarball)
            .arg("-C")
            .arg(dist)
            .arg(&name),
    )?;
    let file = format!("{name}.tar.gz");
    let sum = proc::probe(Command::new("sha256sum").arg(&file).current_dir(dist))
        .with_context(|| format!("sha256sum {file} failed"))?;
    fs::write(dist.join(format!("{file}.sha256")), sum).context("writing the sha256 file")?;
    Ok(tarball)
}

fn copy(from: &Path, to: &Path) -> Result<()> {
    fs::copy(from, to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    Ok(())
}

fn size(p: &Path) -> Result<u64> {
    Ok(fs::metadata(p)
        .with_context(|| format!("stat {}", p.display()))?
        .len())
}

/// The last commit's time, so packing the same commit twice gives the same
/// bytes; SOURCE_DATE_EPOCH wins, as everywhere else.
pub fn source_date_epoch() -> Result<u64> {
    if let Some(v) = std::env::var_os("SOURCE_DATE_EPOCH") {
        return v
            .to_string_lossy()
            .parse()
            .context("SOURCE_DATE_EPOCH is not a number");
    }
    let out = proc::probe(
        Command::new("git")
            .args(["log", "-1", "--format=%ct"])
            .current_dir(env::repo_root()),
    );
    match out.as_deref().map(str::trim) {
        Some(t) if !t.is_empty() => t.parse().context("git log --format=%ct"),
        _ => {
            bail!("cannot read the last commit's time (not a git checkout?): set SOURCE_DATE_EPOCH")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{elf_facts, env_key};

    #[test]
    fn env_key_is_cargos_spelling() {
        assert_eq!(
            env_key("aarch64-unknown-linux-musl"),
            "AARCH64_UNKNOWN_LINUX_MUSL"
        );
    }

    #[test]
    fn elf_facts_reads_machine_and_interpreter() {
        // A minimal ELF64 header with one PT_INTERP program header at 0x40.
        let mut elf = vec![0u8; 0x40 + 56];
        elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
        elf[0x12..0x14].copy_from_slice(&62u16.to_le_bytes());
        elf[0x20..0x28].copy_from_slice(&0x40u64.to_le_bytes());
        elf[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        elf[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        elf[0x40..0x44].copy_from_slice(&3u32.to_le_bytes());
        assert_eq!(elf_facts(&elf), Some((62, true)));
        elf[0x40..0x44].copy_from_slice(&1u32.to_le_bytes());
        assert_eq!(elf_facts(&elf), Some((62, false)));
        assert_eq!(elf_facts(b"not an elf"), None);
    }
}
