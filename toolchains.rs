//! The one place this project's toolchains are pinned, so a new machine
//! (CI is one on every run) builds exactly what this one builds.
//!
//! Read by `cargo xtask setup`, which installs exactly these, by
//! `cargo xtask dist`, and by tracer-user/build.rs, which builds the eBPF
//! crate with `EBPF_NIGHTLY`. Plain Rust constants, `#[path]`-included by
//! each of them, so no parser is needed. Change them together: bpf-linker
//! links against the LLVM of `EBPF_NIGHTLY` (setup rebuilds it when that
//! LLVM changes).

/// aya-build compiles the eBPF crate with this nightly and `-Z build-std=core`.
pub const EBPF_NIGHTLY: &str = "nightly-2026-05-20";

/// The bpf-linker crate version `cargo install` builds against that nightly's LLVM.
pub const BPF_LINKER: &str = "0.13.0";

/// The stable toolchain `cargo xtask dist` builds the release binaries with.
pub const RELEASE: &str = "1.95.0";

/// Targets `cargo xtask dist` builds (rustup targets of `RELEASE`).
pub const DIST_TARGETS: &[&str] = &["x86_64-unknown-linux-musl", "aarch64-unknown-linux-musl"];
