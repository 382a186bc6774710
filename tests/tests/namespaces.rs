//! Many namespaces, few file descriptors: a busy node has a namespace per
//! pod, and the common soft limit `ulimit -n 1024` must not decide whether
//! ctdrop starts or how exact it is. Needs root.

use std::{
    collections::BTreeMap,
    io::Write,
    net::{Ipv4Addr, UdpSocket},
    os::unix::fs::MetadataExt,
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{bail, Result};
use ctdrop_tests::{run_ctdrop, ConntrackMaxGuard, Ctdrop};

const NAMESPACES: usize = 600;
/// Entries each namespace may hold: every datagram past them is a
/// table-full drop on its way out.
const MAX: u64 = 16;
const DATAGRAMS: u16 = 56;

/// Namespaces `ctdt-<pid>-m<n>`, made and removed with one `ip -batch` each
/// (600 `ip netns add` processes take minutes on a loaded machine).
struct ManyNetns {
    names: Vec<String>,
}

fn ip_batch(lines: &[String]) -> Result<()> {
    let mut child = Command::new("ip")
        .args(["-force", "-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()?;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(lines.join("\n").as_bytes())?;
    let st = child.wait()?;
    if !st.success() {
        bail!("ip -batch failed: {st}");
    }
    Ok(())
}

impl ManyNetns {
    fn new(n: usize) -> Result<ManyNetns> {
        let pid = std::process::id();
        let names: Vec<String> = (0..n).map(|i| format!("ctdt-{pid}-m{i}")).collect();
        let me = ManyNetns { names };
        ip_batch(
            &me.names
                .iter()
                .map(|n| format!("netns add {n}"))
                .collect::<Vec<_>>(),
        )?;
        // Loopback up and conntrack on (a state rule registers its hooks),
        // four namespaces at a time, from threads that entered each one.
        let chunks: Vec<Vec<PathBuf>> = me
            .paths()
            .chunks(n.div_ceil(4))
            .map(|c| c.to_vec())
            .collect();
        let workers: Vec<_> = chunks
            .into_iter()
            .map(|paths| {
                std::thread::spawn(move || -> Result<()> {
                    for p in paths {
                        ctlab::in_netns(&p, || {
                            run_here(&["ip", "link", "set", "lo", "up"])?;
                            run_here(&ctlab::accept_ct_rule(
                                "iptables",
                                "OUTPUT",
                                "ESTABLISHED,RELATED",
                            ))
                        })?;
                    }
                    Ok(())
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap()?;
        }
        Ok(me)
    }

    fn paths(&self) -> Vec<PathBuf> {
        self.names
            .iter()
            .map(|n| PathBuf::from("/run/netns").join(n))
            .collect()
    }

    fn inodes(&self) -> Vec<u32> {
        self.paths()
            .iter()
            .map(|p| std::fs::metadata(p).unwrap().ino() as u32)
            .collect()
    }
}

impl Drop for ManyNetns {
    fn drop(&mut self) {
        if let Err(e) = ip_batch(
            &self
                .names
                .iter()
                .map(|n| format!("netns del {n}"))
                .collect::<Vec<_>>(),
        ) {
            eprintln!("ctdrop-tests: cleanup: {e:#}");
        }
    }
}

fn run_here(cmd: &[&str]) -> Result<()> {
    let out = Command::new(cmd[0])
        .args(&cmd[1..])
        .stdin(Stdio::null())
        .output()?;
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// Every namespace's kernel `drop` counter.
fn drop_counters(paths: &[PathBuf]) -> Result<Vec<u64>> {
    paths
        .iter()
        .map(|p| Ok(ctlab::ct_stats_at(p)?["drop"]))
        .collect()
}

/// In each namespace, `DATAGRAMS` new UDP flows over loopback: the first
/// `MAX` fill the table, the rest are dropped on the way out.
fn flood_each(paths: &[PathBuf]) -> Result<()> {
    for p in paths {
        ctlab::in_netns(p, || {
            let sock = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
            for port in 0..DATAGRAMS {
                let _ = sock.send_to(b"ctdrop-tests ns", (Ipv4Addr::LOCALHOST, 20000 + port));
            }
            Ok(())
        })?;
    }
    Ok(())
}

/// ctdrop under `ulimit -n 1024` (soft and hard) traces 600 namespaces'
/// table-full drops, each namespace's count equal to its own kernel counter.
fn traced_exactly_under_1024_descriptors(many: &ManyNetns, env: &[(&str, &str)]) {
    let paths = many.paths();
    let inodes = many.inodes();
    let before = drop_counters(&paths).unwrap();
    let c = Ctdrop::spawn_nofile(&["live", "--json"], env, (1024, 1024)).unwrap();
    flood_each(&paths).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let after = drop_counters(&paths).unwrap();
    let out = c.stop().unwrap();
    assert!(out.status.success(), "{}", out.stderr);
    let s = out.summary().unwrap();
    assert_eq!(s["events_lost"], 0, "{}", out.stderr);
    let mut per_ns: BTreeMap<u64, u64> = BTreeMap::new();
    for d in out.drops() {
        if d["cause"] == "conntrack_table_full" {
            *per_ns.entry(d["netns"].as_u64().unwrap()).or_default() += 1;
        }
    }
    let mut wrong = Vec::new();
    let mut total = 0;
    for (i, ino) in inodes.iter().enumerate() {
        let kernel = after[i] - before[i];
        let ours = per_ns.get(&(*ino as u64)).copied().unwrap_or(0);
        total += kernel;
        if kernel != ours || kernel == 0 {
            wrong.push(format!("{}: kernel {kernel}, ctdrop {ours}", many.names[i]));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {NAMESPACES} namespaces differ: {:?}\nstderr: {}",
        wrong.len(),
        &wrong[..wrong.len().min(10)],
        out.stderr
    );
    eprintln!("{NAMESPACES} namespaces, {total} table-full drops, each namespace exact");
}

#[test]
fn six_hundred_namespaces_under_ulimit_1024_are_traced_exactly_per_namespace() {
    let many = ManyNetns::new(NAMESPACES).unwrap();
    let _max = ConntrackMaxGuard::set(MAX).unwrap();
    traced_exactly_under_1024_descriptors(&many, &[]);
    // Fewer files than namespaces: the least recently used are closed and
    // reopened as their drops come in, and every count is still exact.
    std::thread::sleep(Duration::from_secs(1));
    traced_exactly_under_1024_descriptors(&many, &[("CTDROP_TEST_MAX_NS_HANDLES", "64")]);
}

#[test]
fn the_soft_descriptor_limit_is_raised_to_the_hard_limit() {
    let c = Ctdrop::spawn_nofile(&["live", "--json"], &[], (1024, 4096)).unwrap();
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", c.pid())).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap()
        .to_string();
    let out = c.stop().unwrap();
    assert!(out.status.success(), "{}", out.stderr);
    let nums: Vec<&str> = line.split_whitespace().skip(3).take(2).collect();
    assert_eq!(nums, ["4096", "4096"], "{line}");
}

#[test]
fn out_of_descriptors_names_the_limit_not_a_map() {
    let out = run_ctdrop(
        &["prlimit", "--nofile=24:24", "--"],
        &["live", "--duration", "1s"],
        Duration::from_secs(30),
    )
    .unwrap();
    assert!(!out.status.success());
    let lines = out.stderr_lines();
    assert_eq!(lines.len(), 1, "one line: {}", out.stderr);
    assert!(
        lines[0].contains("out of file descriptors") && lines[0].contains("ulimit -n"),
        "{}",
        out.stderr
    );
}

/// The test harness's guard (ctlab, shared with the demo) will not lower
/// the global limit while a namespace that is not the test's own holds
/// entries: one line names it and its count, and the limit is unchanged.
#[test]
fn the_harness_refuses_to_lower_the_limit_while_another_namespace_holds_entries() {
    // Named unlike this process's own namespaces (`*-<pid>-*`).
    let name = format!("ctdt-busy{}-0", std::process::id());
    run_here(&["ip", "netns", "add", &name]).unwrap();
    let path = PathBuf::from("/run/netns").join(&name);
    let r = std::panic::catch_unwind(|| {
        ctlab::in_netns(&path, || {
            run_here(&["ip", "link", "set", "lo", "up"])?;
            run_here(&ctlab::accept_ct_rule(
                "iptables",
                "OUTPUT",
                "ESTABLISHED,RELATED",
            ))?;
            let sock = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
            for port in 0..50u16 {
                sock.send_to(b"busy", (Ipv4Addr::LOCALHOST, 30000 + port))?;
            }
            Ok(())
        })
        .unwrap();
        let before = ctdrop_tests::read_conntrack_max().unwrap();
        let err = ConntrackMaxGuard::set(64)
            .err()
            .expect("lowering was not refused");
        let msg = format!("{err:#}");
        assert!(
            msg.contains(&format!("namespace {name} holds 50 conntrack entries")),
            "{msg}"
        );
        assert!(!msg.contains('\n'), "one line: {msg}");
        assert_eq!(ctdrop_tests::read_conntrack_max().unwrap(), before);
        // Raising (or keeping) the limit harms nobody and is allowed.
        drop(ConntrackMaxGuard::set(before).unwrap());
    });
    let _ = run_here(&["ip", "netns", "del", &name]);
    if let Err(e) = r {
        std::panic::resume_unwind(e);
    }
}
