//! bpf-linker must link against the very LLVM that nightly rustc emits
//! bitcode for; a mismatch shows up as obscure link errors in the eBPF build.
//! So we build it against nightly's own libLLVM and remember which one.

use std::{
    fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _, Result};

use crate::{
    env, proc,
    toolchains::{BPF_LINKER, EBPF_NIGHTLY},
};

/// Nightly's shared LLVM library, e.g. `libLLVM.so.22.1-rust-1.97.0-nightly`.
struct Llvm {
    file: String,
    major: u32,
    path: PathBuf,
}

pub fn ensure(sysroot: &Path) -> Result<()> {
    let llvm = find_llvm(sysroot)?;
    let marker = env::cache_dir()?.join("bpf-linker.llvm");
    if linker_version().as_deref() == Some(BPF_LINKER)
        && recorded(&marker).as_deref() == Some(llvm.file.as_str())
    {
        println!("setup: bpf-linker {BPF_LINKER} ok (llvm {})", llvm.major);
        return Ok(());
    }
    install(&llvm)?;
    match linker_version() {
        Some(v) if v == BPF_LINKER => {}
        Some(v) => bail!("installed bpf-linker {BPF_LINKER} but `bpf-linker --version` says {v}"),
        None => bail!("bpf-linker was installed but `bpf-linker --version` fails"),
    }
    fs::write(&marker, format!("{}\n", llvm.file))
        .with_context(|| format!("writing {}", marker.display()))?;
    println!(
        "setup: bpf-linker {BPF_LINKER} ok (llvm {}, rebuilt)",
        llvm.major
    );
    Ok(())
}

fn find_llvm(sysroot: &Path) -> Result<Llvm> {
    let lib = sysroot.join("lib");
    let mut found: Vec<(String, u32)> = fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|name| llvm_major(&name).map(|m| (name, m)))
        .collect();
    found.sort();
    let Some((file, major)) = found.into_iter().next() else {
        bail!("no libLLVM.so.<major>.* in {}", lib.display());
    };
    Ok(Llvm {
        path: lib.join(&file),
        file,
        major,
    })
}

/// The major version in `libLLVM.so.<major>.<rest>`; the other spelling
/// (`libLLVM-22-….so`) is a linker script, not the library.
fn llvm_major(name: &str) -> Option<u32> {
    let (digits, _) = name.strip_prefix("libLLVM.so.")?.split_once('.')?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// `bpf-linker 0.13.0` -> `0.13.0`; None when it is missing or broken.
fn linker_version() -> Option<String> {
    let out = proc::probe(
        Command::new("bpf-linker")
            .arg("--version")
            .stderr(Stdio::null()),
    )?;
    Some(out.split_whitespace().nth(1)?.to_owned())
}

fn recorded(marker: &Path) -> Option<String> {
    Some(fs::read_to_string(marker).ok()?.trim().to_owned())
}

fn install(llvm: &Llvm) -> Result<()> {
    println!(
        "setup: building bpf-linker {BPF_LINKER} against {EBPF_NIGHTLY}'s llvm {} (about a minute)",
        llvm.major
    );
    let prefix = llvm_prefix(llvm)?;
    proc::check(
        Command::new("rustup")
            .args([
                "run",
                EBPF_NIGHTLY,
                "cargo",
                "install",
                "--quiet",
                "--force",
                "--locked",
                "bpf-linker",
                "--version",
                &format!("={BPF_LINKER}"),
            ])
            .args([
                "--no-default-features",
                "--features",
                &format!("llvm-{}", llvm.major),
            ])
            .env("LLVM_PREFIX", &prefix)
            // Outside the repo so our .cargo/config.toml plays no part.
            .current_dir(env::cache_dir()?),
    )
    .with_context(|| format!("building bpf-linker for llvm {}", llvm.major))
}

/// A fake LLVM install whose lib/ points at nightly's library. It must
/// stay: bpf-linker records `<prefix>/lib` as its runtime library path.
fn llvm_prefix(llvm: &Llvm) -> Result<PathBuf> {
    let prefix = env::cache_dir()?.join("llvm");
    let lib = prefix.join("lib");
    fs::create_dir_all(&lib).with_context(|| format!("creating {}", lib.display()))?;
    for name in ["libLLVM.so", llvm.file.as_str()] {
        let link = lib.join(name);
        if link.symlink_metadata().is_ok() {
            fs::remove_file(&link).with_context(|| format!("removing {}", link.display()))?;
        }
        symlink(&llvm.path, &link).with_context(|| format!("linking {}", link.display()))?;
    }
    Ok(prefix)
}

#[cfg(test)]
mod tests {
    use super::llvm_major;

    #[test]
    fn reads_major_from_the_library_name() {
        assert_eq!(llvm_major("libLLVM.so.22.1-rust-1.97.0-nightly"), Some(22));
        assert_eq!(llvm_major("libLLVM.so.19.1"), Some(19));
        assert_eq!(llvm_major("libLLVM-22-rust-1.97.0-nightly.so"), None);
        assert_eq!(llvm_major("libLLVM.so"), None);
        assert_eq!(llvm_major("libLLVM.so.22"), None);
    }
}
