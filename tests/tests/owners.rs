//! Namespaces named after their owners, in every output: a namespace whose
//! process sits in a cgroup named the way the kubelet names them is shown as
//! its pod (`namespace/name`, from a pods directory laid out like
//! `/var/log/pods`), one whose process sits in a container runtime's scope
//! as that container, an `ip netns` one by its name, the initial one as
//! `host`, and one nobody can be told apart by as its inode. Each is checked
//! per record in JSON and human lines, in both summaries and in /metrics,
//! against the kernel's own drop counter of that namespace. Needs root and a
//! cgroup v2 hierarchy (found in /proc/self/mountinfo, or
//! `$CTDROP_CGROUP_ROOT`).

use std::{
    collections::BTreeMap,
    fs::File,
    net::{Ipv4Addr, UdpSocket},
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use ctdrop_tests::{in_netns, parse_ct_stats, run, ConntrackMaxGuard, Ctdrop, Scratch};
use serde_json::Value;

/// Entries each namespace may hold (the global limit, held against each
/// namespace's own count): every new flow past them is a table-full drop.
const MAX: u64 = 16;
/// New UDP flows sent in each namespace while ctdrop runs.
const FLOWS: u16 = 40;

/// Where cgroup v2 is mounted: `$CTDROP_CGROUP_ROOT`, else the `cgroup2`
/// mount under /sys/fs/cgroup (the root itself on a unified host,
/// `/sys/fs/cgroup/unified` on a hybrid one).
fn cgroup2_root() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("CTDROP_CGROUP_ROOT").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    info.lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let mount = left.split_whitespace().nth(4)?;
            (right.split_whitespace().next()? == "cgroup2").then(|| PathBuf::from(mount))
        })
        .find(|m| m.starts_with("/sys/fs/cgroup"))
        .ok_or_else(|| anyhow!("no cgroup2 mount under /sys/fs/cgroup (set CTDROP_CGROUP_ROOT)"))
}

/// Removes a cgroup directory tree, deepest first (a cgroup directory is
/// removed with rmdir, its interface files with it). A cgroup whose last
/// process was just reaped may still be busy for a moment: retried.
fn remove_cgroup_tree(dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    for _ in 0..50 {
        match std::fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
    eprintln!("ctdrop-tests: cleanup: cannot remove {}", dir.display());
}

/// This test's cgroups, under `<cgroup2>/ctdt-owners-<pid>`, removed on
/// drop (after the processes in them are gone), and leftovers of earlier
/// runs whose process is dead removed on creation.
struct Cgroups {
    top: PathBuf,
}

impl Cgroups {
    fn new() -> Result<Cgroups> {
        let root = cgroup2_root()?;
        for e in std::fs::read_dir(&root)?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(pid) = name.strip_prefix("ctdt-owners-") {
                if !Path::new("/proc").join(pid).exists() {
                    remove_cgroup_tree(&e.path());
                }
            }
        }
        let top = root.join(format!("ctdt-owners-{}", std::process::id()));
        std::fs::create_dir(&top).with_context(|| format!("creating {}", top.display()))?;
        Ok(Cgroups { top })
    }

    /// Creates `<top>/<rel>` and moves `pid` into it.
    fn put(&self, rel: &str, pid: u32) -> Result<()> {
        let dir = self.top.join(rel);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::write(dir.join("cgroup.procs"), pid.to_string())
            .with_context(|| format!("moving {pid} into {}", dir.display()))
    }
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        remove_cgroup_tree(&self.top);
    }
}

/// A network namespace held by a `sleep` inside it (as a pod's sandbox is
/// held by its pause process), set up to fill its own conntrack table over
/// loopback from `addr`. With `keep_name` false its `ip netns` name is
/// removed once the process holds it: then only /proc finds it.
struct Held {
    sleep: Option<Child>,
    name: Option<String>,
    path: PathBuf,
    inode: u32,
    addr: Ipv4Addr,
}

impl Held {
    fn new(tag: &str, n: u8, keep_name: bool) -> Result<Held> {
        let name = format!("ctdt-{}-{tag}", std::process::id());
        run(&["ip", "netns", "add", &name])?;
        // From here on, dropping `me` cleans up whatever was made.
        let mut me = Held {
            sleep: None,
            name: Some(name.clone()),
            path: Path::new("/run/netns").join(&name),
            inode: 0,
            addr: Ipv4Addr::new(198, 19, 200, n),
        };
        let exec = |cmd: &[&str]| {
            let mut full = vec!["ip", "netns", "exec", &name];
            full.extend_from_slice(cmd);
            run(&full)
        };
        exec(&["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"])?;
        exec(&["ip", "link", "set", "lo", "up"])?;
        exec(&["ip", "addr", "add", &format!("{}/32", me.addr), "dev", "lo"])?;
        // A state rule turns conntrack on in the namespace.
        let rule = "iptables -A OUTPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT";
        exec(&rule.split(' ').collect::<Vec<_>>())?;
        let ns = File::open(&me.path)?;
        let fd = ns.as_raw_fd();
        let mut cmd = Command::new("sleep");
        cmd.arg("3600").stdin(Stdio::null());
        // SAFETY: prctl and setns are async-signal-safe and change only the
        // child, between fork and exec; `fd` stays open until spawn returns.
        unsafe {
            cmd.pre_exec(move || {
                // Dies with the test process, even when that is killed.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0
                    || libc::setns(fd, libc::CLONE_NEWNET) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            })
        };
        let child = cmd.spawn().context("starting sleep in the namespace")?;
        drop(ns);
        me.path = PathBuf::from(format!("/proc/{}/ns/net", child.id()));
        me.sleep = Some(child);
        me.inode = ns_inode(&me.path)?;
        if !keep_name {
            me.name = None;
            run(&["ip", "netns", "del", &name])?;
        }
        Ok(me)
    }

    fn pid(&self) -> u32 {
        self.sleep.as_ref().map_or(0, Child::id)
    }

    fn drops(&self) -> Result<u64> {
        in_netns(&self.path, || {
            Ok(parse_ct_stats(&std::fs::read_to_string(
                "/proc/thread-self/net/stat/nf_conntrack",
            )?)?["drop"])
        })
    }

    /// `FLOWS` new UDP flows to itself: the first `MAX` fill the table, the
    /// rest are dropped on their way out.
    fn flood(&self) -> Result<()> {
        let addr = self.addr;
        in_netns(&self.path, move || {
            let sock = UdpSocket::bind((addr, 0))?;
            for port in 0..FLOWS {
                let _ = sock.send_to(b"ctdrop-tests owners", (addr, 21000 + port));
            }
            Ok(())
        })
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(c) = &mut self.sleep {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(n) = &self.name {
            if let Err(e) = run(&["ip", "netns", "del", n]) {
                eprintln!("ctdrop-tests: cleanup: {e:#}");
            }
        }
    }
}

fn ns_inode(p: &Path) -> Result<u32> {
    let link = std::fs::read_link(p)?;
    let s = link.to_string_lossy();
    s.strip_prefix("net:[")
        .and_then(|s| s.strip_suffix(']'))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("{} -> {s}", p.display()))
}

/// 64 hex digits, different for each `seed`: a container id.
fn container_id(seed: u32) -> String {
    format!("{:08x}", seed ^ 0x5eed_0000).repeat(8)
}

/// A UUID made from `seed` and this process: a pod UID.
fn pod_uid(seed: u32) -> String {
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        std::process::id(),
        seed,
        seed,
        seed,
        u64::from(seed) * 7919
    )
}

/// What one namespace must be called, and by which inode.
struct Expect {
    what: &'static str,
    inode: u32,
    /// None: nothing is known, the inode is shown.
    name: Option<String>,
}

impl Expect {
    fn label(&self) -> String {
        self.name.clone().unwrap_or_else(|| self.inode.to_string())
    }
}

fn get_metrics(port: u16) -> Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let (head, body) = resp
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("bad response {resp:?}"))?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("{head}");
    }
    Ok(body.to_string())
}

/// `metric{labels} value` lines of `body` for `family`, by their `netns` label.
fn by_netns(body: &str, family: &str) -> BTreeMap<String, String> {
    body.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(family)?.strip_prefix('{')?;
            let (labels, value) = rest.split_once("} ")?;
            let ns = labels.split("netns=\"").nth(1)?.split('"').next()?;
            Some((ns.to_string(), value.trim().to_string()))
        })
        .collect()
}

/// Drops the human output shows in namespace `label`: its drop lines and
/// the counts of its fold lines.
fn human_drops(stdout: &str, label: &str) -> u64 {
    let line = format!(" ns {label} if ");
    let fold = format!(" drops: conntrack_table_full in ns {label}");
    stdout
        .lines()
        .map(|l| {
            if l.contains(&line) {
                return 1;
            }
            let Some((head, tail)) = l.split_once(&fold) else {
                return 0;
            };
            if !(tail.is_empty() || tail.starts_with(',')) {
                return 0;
            }
            head.rsplit_once("+ ")
                .and_then(|(_, n)| n.parse().ok())
                .unwrap_or(0)
        })
        .sum()
}

#[test]
fn pods_containers_netns_names_host_and_unknown_namespaces_are_named_alike_in_every_output() {
    let host = ns_inode(Path::new("/proc/2/ns/net")).unwrap();
    let pid = std::process::id();
    let scratch = Scratch::new();
    let pods = scratch.0.join("pods");
    std::fs::create_dir_all(&pods).unwrap();
    // Two pods of ours, and one whose UID no process here has (a decoy the
    // lookup must not pick).
    let (pod_ns, pod_name, uid_systemd) = ("ctdt-shop", format!("cart-{pid}"), pod_uid(1));
    let (pod2_ns, pod2_name, uid_cgroupfs) = ("ctdt-batch", format!("report-{pid}"), pod_uid(2));
    for (ns, name, uid) in [
        (pod_ns, pod_name.as_str(), &uid_systemd),
        (pod2_ns, pod2_name.as_str(), &uid_cgroupfs),
        ("ctdt-other", "decoy", &pod_uid(3)),
    ] {
        std::fs::create_dir(pods.join(format!("{ns}_{name}_{uid}"))).unwrap();
    }
    let cid = container_id(pid);

    // Locals drop in reverse: the processes go before their cgroups.
    let cgroups = Cgroups::new().unwrap();
    let pod = Held::new("pod", 1, true).unwrap();
    let pod2 = Held::new("pod2", 2, false).unwrap();
    let runtime = Held::new("docker", 3, false).unwrap();
    let unknown = Held::new("anon", 4, false).unwrap();
    let named = Held::new("plain", 5, true).unwrap();
    // kubelet, systemd driver, containerd; the namespace also has an
    // `ip netns` name (as containerd pins `cni-<uuid>`): the pod wins.
    cgroups
        .put(
            &format!(
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-{}.scope",
                uid_systemd.replace('-', "_"),
                container_id(1)
            ),
            pod.pid(),
        )
        .unwrap();
    // kubelet, cgroupfs driver.
    cgroups
        .put(
            &format!("kubepods/burstable/pod{uid_cgroupfs}/{}", container_id(2)),
            pod2.pid(),
        )
        .unwrap();
    // docker without Kubernetes.
    cgroups
        .put(&format!("system.slice/docker-{cid}.scope"), runtime.pid())
        .unwrap();
    // The others in a cgroup that says nothing, wherever the test runs.
    cgroups.put("plain", unknown.pid()).unwrap();
    cgroups.put("plain", named.pid()).unwrap();

    let expect = [
        Expect {
            what: "pod (systemd driver)",
            inode: pod.inode,
            name: Some(format!("{pod_ns}/{pod_name}")),
        },
        Expect {
            what: "pod (cgroupfs driver)",
            inode: pod2.inode,
            name: Some(format!("{pod2_ns}/{pod2_name}")),
        },
        Expect {
            what: "docker container",
            inode: runtime.inode,
            name: Some(format!("docker:{}", &cid[..12])),
        },
        Expect {
            what: "nothing known",
            inode: unknown.inode,
            name: None,
        },
        Expect {
            what: "ip netns name",
            inode: named.inode,
            name: named.name.clone(),
        },
    ];
    let held = [&pod, &pod2, &runtime, &unknown, &named];

    let _max = ConntrackMaxGuard::set(MAX).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let env = [("CTDROP_PODS_DIR", pods.to_str().unwrap())];
    let json = Ctdrop::spawn_env(
        &["live", "--json", "--metrics", &format!("127.0.0.1:{port}")],
        &env,
    )
    .unwrap();
    let human = Ctdrop::spawn_env(&["live"], &env).unwrap();
    let before: Vec<u64> = held.iter().map(|h| h.drops().unwrap()).collect();
    for h in held {
        h.flood().unwrap();
    }
    let after: Vec<u64> = held.iter().map(|h| h.drops().unwrap()).collect();
    // Every namespace's drops on /metrics, and the host's table gauge
    // (refreshed once a second): wait until they are all there.
    let deadline = Instant::now() + Duration::from_secs(20);
    let body = loop {
        let b = get_metrics(port).unwrap();
        let drops = by_netns(&b, "ctdrop_drops_total");
        let gauges = by_netns(&b, "ctdrop_conntrack_entries");
        let complete = expect
            .iter()
            .zip(before.iter().zip(&after))
            .all(|(e, (b, a))| {
                drops.get(&e.label()).and_then(|v| v.parse::<u64>().ok()) == Some(a - b)
            });
        let full = expect
            .iter()
            .all(|e| gauges.get(&e.label()).map(String::as_str) == Some(&*MAX.to_string()));
        if complete && full && gauges.contains_key("host") {
            break b;
        }
        if Instant::now() > deadline {
            break b;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let out = json.stop().unwrap();
    let hout = human.stop().unwrap();
    assert!(out.status.success(), "{}", out.stderr);
    assert!(hout.status.success(), "{}", hout.stderr);
    let s = out.summary().unwrap();
    assert_eq!(s["events_lost"], 0, "{s}");

    let drops = by_netns(&body, "ctdrop_drops_total");
    let gauges = by_netns(&body, "ctdrop_conntrack_entries");
    let mut with_counters = 0;
    for (i, e) in expect.iter().enumerate() {
        let kernel = after[i] - before[i];
        let what = e.what;
        let label = e.label();
        assert!(kernel >= 10, "{what}: only {kernel} drops in the kernel");
        // JSON, per record: the inode, and the name (null when none).
        let recs = out.drops_in(e.inode);
        assert_eq!(
            recs.len() as u64,
            kernel,
            "{what}: records vs kernel; {}",
            out.stderr
        );
        let want = e.name.as_deref().map_or(Value::Null, Value::from);
        for r in &recs {
            assert_eq!(r["netns_name"], want, "{what}: {r}");
        }
        // The JSON summary: names by inode, kernel counters.
        assert_eq!(s["netns_names"][e.inode.to_string()], want, "{what}: {s}");
        // (Kernel counters are checked for namespaces found at start by
        // name or as our own; an unnamed one has none.)
        if let Some(kc) = out.kernel_counters(e.inode).unwrap() {
            assert_eq!(kc["netns_name"], want, "{what}: {kc}");
            with_counters += 1;
        }
        // Human lines, per record: `ns <label> if`, or counted in a fold
        // line `+ N drops: conntrack_table_full in ns <label>` (10 lines a
        // second per namespace are shown, the rest folded).
        assert_eq!(
            human_drops(&hout.stdout, &label),
            kernel,
            "{what}: human lines for {label}:\n{}",
            hout.stdout
        );
        // The human summary's table: the label leads its row.
        assert!(
            hout.stdout
                .lines()
                .any(|l| l.trim_start().starts_with(&format!("{label} "))),
            "{what}: no {label} row in the human summary:\n{}",
            hout.stdout
        );
        // /metrics: the drops under the label, never under the inode.
        assert_eq!(
            drops.get(&label).map(String::as_str),
            Some(kernel.to_string().as_str()),
            "{what}: ctdrop_drops_total for {label}:\n{body}"
        );
        assert_eq!(
            gauges.get(&label).map(String::as_str),
            Some(MAX.to_string().as_str()),
            "{what}:\n{body}"
        );
        if e.name.is_some() {
            assert!(
                !body.contains(&format!("netns=\"{}\"", e.inode)),
                "{what}: its inode is a label too:\n{body}"
            );
        }
    }
    assert!(with_counters >= 2, "no kernel counters to compare: {s}");
    // The initial namespace: `host`, never its inode.
    assert!(gauges.contains_key("host"), "no host gauge:\n{body}");
    assert!(
        !body.contains(&format!("netns=\"{host}\"")),
        "the host's inode is a label:\n{body}"
    );
}
