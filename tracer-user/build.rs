use anyhow::{anyhow, Context as _};
use aya_build::Toolchain;

// The pinned nightly (shared with xtask, which installs it).
#[allow(dead_code)]
#[path = "../toolchains.rs"]
mod toolchains;

fn main() -> anyhow::Result<()> {
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = packages
        .into_iter()
        .find(|p| p.name.as_str() == "tracer-ebpf")
        .ok_or_else(|| anyhow!("tracer-ebpf package not found"))?;
    let root = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent"))?;
    let workspace = root.parent().unwrap();
    let common = workspace.join("tracer-common");
    println!("cargo:rerun-if-changed={}", common);
    println!("cargo:rerun-if-changed={}", workspace.join("toolchains.rs"));
    aya_build::build_ebpf(
        [aya_build::Package {
            name: ebpf.name.as_str(),
            root_dir: root.as_str(),
            ..Default::default()
        }],
        Toolchain::Custom(toolchains::EBPF_NIGHTLY),
    )
}
