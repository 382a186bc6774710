//! What ships works where it is copied to: the release tarballs that
//! `cargo xtask dist` writes (`$CTDROP_DIST`, else target/dist; `cargo xtask
//! test` builds them first). The x86_64 binary, alone in an otherwise empty
//! root with only /proc, /sys and /run/netns mounted, checks the kernel and
//! traces a full table exactly; the aarch64 binary reads that capture under
//! qemu-user exactly as the x86_64 one does. Needs root; run single-threaded
//! under the dev lock (the scenarios fill a namespace's conntrack table).

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use ctdrop_tests::*;
use serde_json::Value;

const MAX: u64 = 64;

fn dist_dir() -> PathBuf {
    match std::env::var_os("CTDROP_DIST") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/dist"),
    }
}

/// Checks the tarball against its sha256 file, unpacks it under `into` and
/// returns the unpacked `ctdrop-VERSION-ARCH-linux/` directory.
fn unpack(arch: &str, into: &Path) -> PathBuf {
    let dist = dist_dir();
    let suffix = format!("-{arch}-linux.tar.gz");
    let name = fs::read_dir(&dist)
        .unwrap_or_else(|e| panic!("{}: {e}; run `cargo xtask dist` first", dist.display()))
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .find(|n| n.starts_with("ctdrop-") && n.ends_with(&suffix))
        .unwrap_or_else(|| {
            panic!(
                "no ctdrop-*{suffix} in {}; run `cargo xtask dist` first",
                dist.display()
            )
        });
    let sum = Command::new("sha256sum")
        .args(["-c", &format!("{name}.sha256")])
        .current_dir(&dist)
        .output()
        .unwrap();
    assert!(
        sum.status.success(),
        "{name} does not match its sha256 file: {}",
        String::from_utf8_lossy(&sum.stdout)
    );
    let tar = Command::new("tar")
        .arg("xzf")
        .arg(dist.join(&name))
        .arg("-C")
        .arg(into)
        .status()
        .unwrap();
    assert!(tar.success(), "tar xzf {name}");
    let dir = into.join(name.trim_end_matches(".tar.gz"));
    for f in [
        "ctdrop",
        "README.md",
        "LICENSE-MIT",
        "LICENSE-APACHE",
        "man/ctdrop.1",
        "man/ctdrop-live.1",
        "completions/ctdrop.bash",
        "completions/_ctdrop",
        "completions/ctdrop.fish",
    ] {
        assert!(dir.join(f).is_file(), "{name} lacks {f}");
    }
    dir
}

/// ELF e_machine and whether there is a program interpreter (PT_INTERP):
/// a static binary has none, so no libc or ld.so of the host is involved.
fn elf_machine_and_interp(bin: &Path) -> (u16, bool) {
    let b = fs::read(bin).unwrap();
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let phoff = u64::from_le_bytes(b[0x20..0x28].try_into().unwrap()) as usize;
    let (size, n) = (u16_at(0x36) as usize, u16_at(0x38) as usize);
    let interp =
        (0..n).any(|i| u32::from_le_bytes(b[phoff + i * size..][..4].try_into().unwrap()) == 3);
    (u16_at(0x12), interp)
}

/// An empty root holding only the x86_64 release binary, and mount points.
struct Root {
    dir: PathBuf,
    root: PathBuf,
}

impl Root {
    fn new() -> Root {
        let dir = scratch_dir();
        let unpacked = dir.join("unpacked");
        fs::create_dir_all(&unpacked).unwrap();
        let pkg = unpack("x86_64", &unpacked);
        let root = dir.join("root");
        fs::create_dir_all(&root).unwrap();
        fs::copy(pkg.join("ctdrop"), root.join("ctdrop")).unwrap();
        Root::with_mount_points(dir, root)
    }

    /// The root filesystem of the OCI image `cargo xtask image` wrote,
    /// unpacked by umoci: what a container runtime would start.
    fn from_image() -> Root {
        let dist = dist_dir();
        let name = fs::read_dir(&dist)
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .find(|n| n.ends_with("-x86_64-image.oci.tar"))
            .unwrap_or_else(|| {
                panic!(
                    "no ctdrop-*-x86_64-image.oci.tar in {}; run `cargo xtask image` first",
                    dist.display()
                )
            });
        let version = name
            .trim_start_matches("ctdrop-")
            .trim_end_matches("-x86_64-image.oci.tar");
        let dir = scratch_dir();
        let layout = dir.join("layout");
        fs::create_dir_all(&layout).unwrap();
        output(&[
            "tar",
            "xf",
            &dist.join(&name).to_string_lossy(),
            "-C",
            &layout.to_string_lossy(),
        ]);
        let bundle = dir.join("bundle");
        output(&[
            "umoci",
            "unpack",
            "--image",
            &format!("{}:ctdrop:{version}", layout.display()),
            &bundle.to_string_lossy(),
        ]);
        let config: Value =
            serde_json::from_slice(&fs::read(bundle.join("config.json")).unwrap()).unwrap();
        assert_eq!(
            config["process"]["args"],
            serde_json::json!(["/ctdrop", "check"]),
            "the image's entrypoint and command"
        );
        Root::with_mount_points(dir, bundle.join("rootfs"))
    }

    fn with_mount_points(dir: PathBuf, root: PathBuf) -> Root {
        let (machine, interp) = elf_machine_and_interp(&root.join("ctdrop"));
        assert_eq!(machine, 62, "not an x86_64 binary");
        assert!(
            !interp,
            "the release binary asks for a program interpreter: not static"
        );
        let mut entries: Vec<String> = fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        entries.sort();
        assert_eq!(entries, ["ctdrop"], "the root holds more than the binary");
        for d in ["proc", "sys", "run/netns"] {
            fs::create_dir_all(root.join(d)).unwrap();
        }
        Root { dir, root }
    }

    fn root(&self) -> PathBuf {
        self.root.clone()
    }

    /// `ctdrop ARGS` chrooted into the root. The mounts are made in a
    /// mount namespace of its own, so they vanish with the process: /proc
    /// (per-namespace counters, /proc/PID/ns/net handles), /sys (BTF,
    /// tracefs, the bpf syscall needs neither /dev nor libc) and /run/netns
    /// (`ip netns` names, and --netns NAME).
    fn argv<'a>(&'a self, root: &'a str, args: &[&'a str]) -> Vec<&'a str> {
        let script = r#"r=$1; shift
mount --rbind /proc "$r/proc" && mount --rbind /sys "$r/sys" && mount --rbind /run/netns "$r/run/netns" && exec chroot "$r" /ctdrop "$@""#;
        let mut v = vec![
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            "sh",
            root,
        ];
        v.extend_from_slice(args);
        v
    }
}

impl Drop for Root {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Traces (live or capture, chrooted) while 100 new flows hit the full
/// table; asserts one table-full record per kernel drop and returns them.
fn traced_in_root(root: &Root, topo: &Topology, args: &[&str]) -> CtdropOutput {
    const N: u16 = 100;
    let r = root.root().to_string_lossy().into_owned();
    let c = Ctdrop::spawn_argv(&root.argv(&r, args)).unwrap();
    let before = ct_stats(&topo.receiver).unwrap();
    send_udp_flows(&topo.sender, topo.receiver_addr, 20_000, N).unwrap();
    let after = settled_ct_stats(&topo.receiver, "drop").unwrap();
    let out = c.stop().unwrap();
    assert!(
        out.status.success(),
        "chrooted ctdrop failed: {:?}\n{}",
        out.status,
        out.stderr
    );
    let rx = topo.receiver.inode().unwrap();
    let drop_delta = after["drop"] - before["drop"];
    assert_flows_dropped_exact(&out, rx, drop_delta, N);
    out
}

fn scratch_dir() -> PathBuf {
    PathBuf::from(format!(
        "/tmp/ctdrop-ship-{}-{}",
        std::process::id(),
        next_id()
    ))
}

/// Runs a command line to its end; stdout, and an assertion on success.
fn output(argv: &[&str]) -> Vec<u8> {
    let o = Command::new(argv[0]).args(&argv[1..]).output().unwrap();
    assert!(
        o.status.success(),
        "{argv:?}: {:?}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    o.stdout
}

fn check_in(root: &Root) {
    let r = root.root().to_string_lossy().into_owned();
    let out = String::from_utf8(output(&root.argv(&r, &["check"]))).unwrap();
    assert!(
        out.contains("kernel BTF               yes"),
        "no BTF in the root:\n{out}"
    );
    assert!(
        out.contains("tp_btf                   yes"),
        "tp_btf not attached from the root:\n{out}"
    );
    assert!(
        out.contains("drops          tp_btf/kfree_skb"),
        "no drop signal:\n{out}"
    );
}

#[test]
fn static_binary_alone_in_an_empty_root_runs_check() {
    check_in(&Root::new());
}

/// Containers cannot start on this machine (crun's setrlimit is refused:
/// the sandbox withholds CAP_SYS_RESOURCE), so the image is proven the way
/// a runtime would start it: umoci unpacks its root filesystem and the
/// configured command runs chrooted there, with /proc, /sys and /run/netns
/// mounted as the DaemonSet mounts them.
#[test]
fn image_unpacked_by_umoci_runs_check_from_its_own_root() {
    check_in(&Root::from_image());
}

#[test]
fn static_binary_in_an_empty_root_traces_a_full_table_exactly() {
    let root = Root::new();
    let (topo, _max) = full_table_pair(MAX);
    traced_in_root(
        &root,
        &topo,
        &["live", "--json", "--netns", &topo.receiver.name],
    );
}

#[test]
fn aarch64_binary_under_qemu_reports_and_exports_a_capture_like_x86_64() {
    let root = Root::new();
    let (topo, _max) = full_table_pair(MAX);
    let live = traced_in_root(
        &root,
        &topo,
        &[
            "capture",
            "-o",
            "/drops.ctdrop",
            "--headers",
            "--json",
            "--netns",
            &topo.receiver.name,
        ],
    );
    let drops = live.drops().len() as u64;
    let cap = root
        .root()
        .join("drops.ctdrop")
        .to_string_lossy()
        .into_owned();
    let arm = unpack("aarch64", &root.dir.join("unpacked"))
        .join("ctdrop")
        .to_string_lossy()
        .into_owned();
    assert_eq!(
        elf_machine_and_interp(Path::new(&arm)),
        (183, false),
        "not a static aarch64 binary"
    );
    let x86 = root.root().join("ctdrop").to_string_lossy().into_owned();
    let both = |args: &[&str]| {
        let mut a = vec!["qemu-aarch64-static", arm.as_str()];
        a.extend_from_slice(args);
        let mut x = vec![x86.as_str()];
        x.extend_from_slice(args);
        (output(&a), output(&x))
    };
    let (ha, hx) = both(&["--help"]);
    assert!(
        String::from_utf8_lossy(&ha).contains("Usage: ctdrop"),
        "aarch64 --help"
    );
    assert_eq!(ha, hx, "--help differs between architectures");
    let (ra, rx) = both(&["report", &cap, "--format", "json"]);
    assert_eq!(ra, rx, "the report differs between architectures");
    let report: Value = serde_json::from_slice(&ra).unwrap();
    assert!(
        report
            .to_string()
            .contains(&format!("\"drops_total\":{drops}")),
        "the aarch64 report does not count the {drops} drops captured: {report}"
    );
    // export: the same pcap-ng bytes, one packet per drop, readable by tshark.
    let (pa, px) = (root.dir.join("arm.pcapng"), root.dir.join("x86.pcapng"));
    let (pa_s, px_s) = (
        pa.to_string_lossy().into_owned(),
        px.to_string_lossy().into_owned(),
    );
    output(&["qemu-aarch64-static", &arm, "export", &cap, "--pcap", &pa_s]);
    output(&[&x86, "export", &cap, "--pcap", &px_s]);
    assert_eq!(
        fs::read(&pa).unwrap(),
        fs::read(&px).unwrap(),
        "pcap-ng differs between architectures"
    );
    let frames = output(&["tshark", "-r", &pa_s, "-T", "fields", "-e", "frame.number"]);
    assert_eq!(
        String::from_utf8_lossy(&frames).lines().count() as u64,
        drops,
        "packets in the aarch64 export vs drops"
    );
}

/// The DaemonSet passes the Kubernetes schemas (strict: no unknown field),
/// runs `watch` as documented, and adds exactly the capabilities ctdrop
/// itself names when it refuses to trace without them.
#[test]
fn daemonset_passes_the_kubernetes_schemas_and_asks_for_exactly_ctdrops_capabilities() {
    let manifest =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes/ctdrop-daemonset.yaml");
    let m = manifest.to_string_lossy().into_owned();
    let v = String::from_utf8(output(&["kubernetes-validate", "--strict", &m])).unwrap();
    assert!(v.contains("passed for resource daemonset/ctdrop"), "{v}");
    let json = output(&[
        "python3",
        "-c",
        "import json,sys,yaml; print(json.dumps(list(yaml.safe_load_all(open(sys.argv[1])))))",
        &m,
    ]);
    let docs: Vec<Value> = serde_json::from_slice(&json).unwrap();
    let ds = docs
        .iter()
        .find(|d| d["kind"] == "DaemonSet")
        .expect("no DaemonSet");
    let pod = &ds["spec"]["template"];
    assert_eq!(pod["spec"]["hostNetwork"], true);
    assert_eq!(pod["spec"]["hostPID"], true);
    assert_eq!(
        pod["metadata"]["annotations"]["prometheus.io/scrape"],
        "true"
    );
    assert_eq!(pod["metadata"]["annotations"]["prometheus.io/port"], "9469");
    let c = &pod["spec"]["containers"][0];
    assert_eq!(
        c["args"],
        serde_json::json!([
            "watch",
            "--dir",
            "/var/lib/ctdrop",
            "--metrics",
            "0.0.0.0:9469"
        ])
    );
    assert_eq!(c["securityContext"]["privileged"], false);
    assert_eq!(
        c["securityContext"]["capabilities"]["drop"],
        serde_json::json!(["ALL"])
    );
    let mut added: Vec<String> = c["securityContext"]["capabilities"]["add"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| format!("CAP_{}", s.as_str().unwrap()))
        .collect();
    added.sort();
    let mounts = c["volumeMounts"].as_array().unwrap();
    let mount = |path: &str| {
        mounts
            .iter()
            .find(|m| m["mountPath"] == path)
            .unwrap_or_else(|| panic!("no {path} mount"))
    };
    let btf = mount("/sys/kernel/btf");
    assert_eq!(btf["readOnly"], true);
    assert!(
        mounts.iter().any(|m| m["mountPath"] == "/var/lib/ctdrop"),
        "no hostPath for captures"
    );
    // The kubelet's pods directory, read-only where ctdrop looks for it
    // (pod names, conntrack/owner.rs), from the node's own.
    let pods = mount("/var/log/pods");
    assert_eq!(pods["readOnly"], true);
    assert!(
        pod["spec"]["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["name"] == pods["name"] && v["hostPath"]["path"] == "/var/log/pods"),
        "the pods mount is not the node's /var/log/pods"
    );
    // What ctdrop asks for: its refusal with no capability at all lists them.
    let bin = ctdrop_bin().to_string_lossy().into_owned();
    let o = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--ambient-caps=-all",
            &bin,
            "live",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    let listed = err
        .split(" needs ")
        .nth(1)
        .and_then(|r| r.split(';').next())
        .unwrap_or_else(|| panic!("no capability list in: {err}"));
    let mut wanted: Vec<String> = listed.split(", ").map(|s| s.trim().to_owned()).collect();
    wanted.sort();
    assert_eq!(
        added, wanted,
        "the DaemonSet's capabilities vs what ctdrop requires"
    );
}
