//! `cargo xtask image`: a `FROM scratch` OCI image holding only the static
//! x86_64 release binary, built with buildah (a Debian package; no daemon)
//! into an OCI archive under target/dist. `podman load` or
//! `skopeo copy oci-archive:... docker://...` take it from there.

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, Result};

use crate::{dist, env, proc};

pub fn run() -> Result<PathBuf> {
    let target = "x86_64-unknown-linux-musl";
    let built = dist::run(&[target.to_owned()])?;
    let bin = &built.first().context("dist built nothing")?.binary;
    let version = env!("CARGO_PKG_VERSION");
    let archive = env::target_dir()
        .join("dist")
        .join(format!("ctdrop-{version}-x86_64-image.oci.tar"));
    let _ = std::fs::remove_file(&archive);
    let ctr = proc::probe(Command::new("buildah").args(["from", "scratch"]))
        .context("`buildah from scratch` failed (apt-get install buildah)")?
        .trim()
        .to_owned();
    let result = (|| {
        proc::check_quiet(
            Command::new("buildah")
                .arg("copy")
                .arg(&ctr)
                .arg(bin)
                .arg("/ctdrop"),
        )?;
        proc::check_quiet(
            Command::new("buildah")
                .args(["config", "--arch", "amd64", "--os", "linux"])
                .args(["--entrypoint", r#"["/ctdrop"]"#, "--cmd", "check"])
                .args([
                    "--label",
                    &format!("org.opencontainers.image.version={version}"),
                ])
                .args([
                    "--label",
                    "org.opencontainers.image.licenses=MIT OR Apache-2.0",
                ])
                .args(["--label", "org.opencontainers.image.title=ctdrop"])
                .arg(&ctr),
        )?;
        let epoch = dist::source_date_epoch()?;
        proc::check_quiet(
            Command::new("buildah")
                .args(["commit", "--quiet", "--timestamp", &epoch.to_string()])
                .arg(&ctr)
                .arg(format!(
                    "oci-archive:{}:ctdrop:{version}",
                    archive.display()
                )),
        )
    })();
    // The working container is buildah's scratch state, never an artefact.
    let _ = proc::check_quiet(Command::new("buildah").arg("rm").arg(&ctr));
    result?;
    let size = std::fs::metadata(&archive)
        .with_context(|| format!("stat {}", archive.display()))?
        .len();
    println!(
        "image: {} ({size} bytes; ctdrop:{version}, FROM scratch)",
        archive.display()
    );
    Ok(archive)
}
