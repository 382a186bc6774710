//! Who owns a network namespace, so that every output can name it after
//! its owner rather than its inode: `host` for the initial namespace, the
//! Kubernetes pod (`namespace/name`) or the container (`containerd:<id>`)
//! whose processes live in it.
//!
//! A namespace has no owner field in the kernel. What it has are processes,
//! and a process's cgroup path (`/proc/PID/cgroup`) says which pod and
//! container it belongs to, the way the kubelet and the container runtimes
//! name their cgroups:
//! - kubelet, systemd driver:
//!   `kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid, _ for ->.slice/cri-containerd-<id>.scope`
//! - kubelet, cgroupfs driver: `/kubepods/besteffort/pod<uid>/<id>`
//! - runtimes without Kubernetes: `docker-<id>.scope`, `crio-<id>.scope`,
//!   `libpod-<id>.scope` (podman), `/docker/<id>`.
//!
//! The pod's name comes from the kubelet's log directories,
//! `/var/log/pods/<namespace>_<name>_<uid>` (no API server, no credentials:
//! what the node itself knows).
//!
//! Cost: a namespace's owner is looked up once, when it is first named,
//! and kept (so every output names it alike for the whole run). Looking it
//! up reads the cgroup files of a few of its processes; which processes
//! are in which namespace comes from one read of `/proc/*/ns/net` for all
//! namespaces at once (a scan), made again only for an inode the last scan
//! did not see: a namespace created since, or one with no process (each of
//! those costs one scan, once). Drops of a named namespace cost nothing.

use std::{collections::HashMap, path::PathBuf, time::Instant};

/// Where the kubelet keeps one directory per pod, `<ns>_<name>_<uid>`.
const PODS_DIR: &str = "/var/log/pods";
/// Overrides [`PODS_DIR`] (a kubelet with another `podLogsDir`, tests).
pub const PODS_DIR_ENV: &str = "CTDROP_PODS_DIR";
/// Processes per namespace whose cgroups are read (a pod's processes all
/// share its cgroup; a few cover a guest that entered with `nsenter`).
const PIDS_PER_NS: usize = 8;
/// `PF_KTHREAD` in `/proc/PID/stat`'s flags.
const PF_KTHREAD: u64 = 0x0020_0000;

/// What a process's cgroup paths say about whose it is.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CgroupHints {
    /// Kubernetes pod UID, as in the pod's metadata (dashes, lower case).
    pub pod_uid: Option<String>,
    /// The container runtime (`containerd`, `crio`, `docker`, `podman`,
    /// `container` when the path does not say) and the container's id.
    pub container: Option<(&'static str, String)>,
}

impl CgroupHints {
    fn merge(&mut self, other: CgroupHints) {
        if self.pod_uid.is_none() {
            self.pod_uid = other.pod_uid;
        }
        if self.container.is_none() {
            self.container = other.container;
        }
    }
}

/// A pod UID as written in a cgroup name: a UUID (the systemd driver writes
/// `_` for `-`), or the 32 hex digits of a static pod's config hash.
fn pod_uid(s: &str) -> Option<String> {
    let uid = s.replace('_', "-").to_ascii_lowercase();
    let hex = |c: char| c.is_ascii_hexdigit();
    let uuid = uid.len() == 36
        && uid.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => hex(c),
        });
    (uuid || (uid.len() == 32 && uid.chars().all(hex))).then_some(uid)
}

/// A container id: 64 hex digits (docker, containerd, CRI-O and podman all
/// use them).
fn container_id(s: &str) -> Option<String> {
    (s.len() == 64 && s.chars().all(|c| c.is_ascii_hexdigit())).then(|| s.to_ascii_lowercase())
}

/// Scope (or cgroupfs directory) prefixes of the runtimes, and the name
/// ctdrop gives each.
const RUNTIME_PREFIXES: [(&str, &str); 5] = [
    ("cri-containerd-", "containerd"),
    ("nerdctl-", "containerd"),
    ("crio-", "crio"),
    ("docker-", "docker"),
    ("libpod-", "podman"),
];

/// The hints in one cgroup path (`/kubepods.slice/...`). Paths of processes
/// outside our cgroup namespace start with `/..`; only the names matter.
pub fn cgroup_hints(path: &str) -> CgroupHints {
    let mut hints = CgroupHints::default();
    let mut under_kubepods = false;
    let mut parent = "";
    for seg in path.split('/').filter(|s| !s.is_empty() && *s != "..") {
        if hints.pod_uid.is_none() {
            if let Some(slice) = seg.strip_suffix(".slice") {
                // kubepods-pod<uid>.slice, kubepods-burstable-pod<uid>.slice
                if slice.contains("kubepods") {
                    hints.pod_uid = slice.rsplit_once("-pod").and_then(|(_, u)| pod_uid(u));
                }
            } else if under_kubepods {
                hints.pod_uid = seg.strip_prefix("pod").and_then(pod_uid);
            }
        }
        under_kubepods |= seg.starts_with("kubepods") || seg.contains("-kubepods");
        let name = seg.strip_suffix(".scope").unwrap_or(seg);
        // crio-conmon-<id>.scope is CRI-O's monitor, in the host namespace.
        let tagged = RUNTIME_PREFIXES.iter().find_map(|(prefix, runtime)| {
            let id = name.strip_prefix(prefix)?;
            Some((*runtime, container_id(id)?))
        });
        let bare = container_id(seg).and_then(|id| match parent {
            "docker" => Some(("docker", id)),
            _ if under_kubepods => Some(("container", id)),
            _ => None,
        });
        if let Some(c) = tagged.or(bare) {
            hints.container = Some(c);
        }
        parent = seg;
    }
    hints
}

/// The hints in a whole `/proc/PID/cgroup` (every hierarchy's line: on a
/// cgroup v1 or hybrid host the pod shows in the v1 controllers' paths).
pub fn proc_cgroup_hints(text: &str) -> CgroupHints {
    let mut hints = CgroupHints::default();
    for line in text.lines() {
        // hierarchy-ID:controllers:path; the path may itself hold ':'.
        if let Some(path) = line.splitn(3, ':').nth(2) {
            hints.merge(cgroup_hints(path));
        }
    }
    hints
}

/// A kubelet pod log directory name, `<namespace>_<name>_<uid>`, as
/// (uid, `namespace/name`). Namespace and pod names cannot hold `_`.
pub fn pod_dir_entry(dir_name: &str) -> Option<(String, String)> {
    let (ns, rest) = dir_name.split_once('_')?;
    let (name, uid) = rest.rsplit_once('_')?;
    if ns.is_empty() || name.is_empty() || name.contains('_') {
        return None;
    }
    Some((pod_uid(uid)?, format!("{ns}/{name}")))
}

/// An `ip netns` name a runtime made up rather than a person: containerd's
/// `cni-<uuid>`, podman's `netns-<uuid>`, CRI-O's bare `<uuid>`. The
/// container's own id says more than those.
pub fn generated_netns_name(name: &str) -> bool {
    let uuid = name
        .strip_prefix("cni-")
        .or_else(|| name.strip_prefix("netns-"))
        .unwrap_or(name);
    uuid.len() == 36 && pod_uid(uuid).is_some()
}

/// The one name of a namespace, from what is known of it, in this order:
/// `host`; its pod (`namespace/name`, else `pod:<uid>`); an `ip netns`
/// name someone chose; its container (`runtime:<12 hex>`); an `ip netns`
/// name a runtime generated. None: outputs show the inode.
pub fn choose(
    host: bool,
    hints: &CgroupHints,
    pod_name: Option<&str>,
    netns_name: Option<&str>,
) -> Option<String> {
    if host {
        return Some("host".into());
    }
    if let Some(n) = pod_name {
        return Some(n.into());
    }
    if let Some(uid) = &hints.pod_uid {
        return Some(format!("pod:{uid}"));
    }
    if let Some(n) = netns_name.filter(|n| !generated_netns_name(n)) {
        return Some(n.into());
    }
    if let Some((runtime, id)) = &hints.container {
        return Some(format!("{runtime}:{}", &id[..12]));
    }
    netns_name.map(str::to_string)
}

/// The inode in a `/proc/PID/ns/net` link (`net:[4026531840]`).
fn ns_link_inode(link: &std::path::Path) -> Option<u32> {
    let target = std::fs::read_link(link).ok()?;
    let s = target.to_str()?;
    s.strip_prefix("net:[")?.strip_suffix(']')?.parse().ok()
}

/// The initial network namespace: that of kernel threads (`kthreadd`,
/// PID 2 in the node's PID namespace), which never leave it. None when
/// ctdrop cannot see the node's processes (its own PID namespace).
fn initial_netns() -> Option<u32> {
    let stat = std::fs::read_to_string("/proc/2/stat").ok()?;
    // Fields after the command's closing parenthesis: state is the first,
    // flags the seventh.
    let flags: u64 = stat
        .rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(6)?
        .parse()
        .ok()?;
    if flags & PF_KTHREAD == 0 {
        return None;
    }
    ns_link_inode(std::path::Path::new("/proc/2/ns/net"))
}

/// A look at every process's network namespace.
struct Scan {
    at: Instant,
    pids: HashMap<u32, Vec<u32>>,
}

impl Scan {
    fn now() -> Scan {
        let at = Instant::now();
        let mut pids: HashMap<u32, Vec<u32>> = HashMap::new();
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for e in dir.flatten() {
                let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                    continue;
                };
                if let Some(ns) = ns_link_inode(&e.path().join("ns/net")) {
                    let v = pids.entry(ns).or_default();
                    if v.len() < PIDS_PER_NS {
                        v.push(pid);
                    }
                }
            }
        }
        Scan { at, pids }
    }
}

/// Owners' names by namespace inode, looked up once each (see the module
/// documentation for when `/proc` is read).
pub struct Owners {
    pods_dir: PathBuf,
    /// The initial namespace, looked up on first use.
    host: Option<Option<u32>>,
    /// Final answers (None: nothing known, the inode is shown).
    names: HashMap<u32, Option<String>>,
    /// Pod UID to `namespace/name`, read from `pods_dir` when a UID is
    /// missing from it, at most once per scan.
    pods: HashMap<String, String>,
    pods_read: Option<Instant>,
    scan: Option<Scan>,
}

impl Default for Owners {
    fn default() -> Self {
        Self::new()
    }
}

impl Owners {
    pub fn new() -> Owners {
        let pods_dir = std::env::var_os(PODS_DIR_ENV)
            .filter(|p| !p.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(PODS_DIR));
        Owners {
            pods_dir,
            host: None,
            names: HashMap::new(),
            pods: HashMap::new(),
            pods_read: None,
            scan: None,
        }
    }

    /// The name kept for `inum`, if it was settled already (Some(None):
    /// nothing is known of it).
    pub fn known(&self, inum: u32) -> Option<Option<String>> {
        self.names.get(&inum).cloned()
    }

    /// The name of namespace `inum`, whose `ip netns` name (if any) is
    /// `netns_name`; see [`choose`] for the order. The first answer is
    /// kept: every output shows the same name for the whole run.
    pub fn name(&mut self, inum: u32, netns_name: Option<&str>) -> Option<String> {
        if let Some(n) = self.known(inum) {
            return n;
        }
        let name = if *self.host.get_or_insert_with(initial_netns) == Some(inum) {
            Some("host".into())
        } else {
            // A namespace the last scan saw has processes to ask; any
            // other (new since, or with no process at all) needs a scan.
            if !self
                .scan
                .as_ref()
                .is_some_and(|s| s.pids.contains_key(&inum))
            {
                self.scan = Some(Scan::now());
            }
            let pids = self
                .scan
                .as_ref()
                .and_then(|s| s.pids.get(&inum))
                .cloned()
                .unwrap_or_default();
            let hints = pids_hints(&pids);
            let pod_name = hints.pod_uid.as_deref().and_then(|u| self.pod_name(u));
            choose(false, &hints, pod_name.as_deref(), netns_name)
        };
        self.names.insert(inum, name.clone());
        name
    }

    /// `namespace/name` of the pod with `uid`, from the pods directory.
    fn pod_name(&mut self, uid: &str) -> Option<String> {
        let stale = match (&self.pods_read, &self.scan) {
            (None, _) => true,
            (Some(read), Some(scan)) => *read < scan.at,
            (Some(_), None) => false,
        };
        if !self.pods.contains_key(uid) && stale {
            self.pods_read = Some(Instant::now());
            if let Ok(dir) = std::fs::read_dir(&self.pods_dir) {
                self.pods = dir
                    .flatten()
                    .filter_map(|e| pod_dir_entry(&e.file_name().to_string_lossy()))
                    .collect();
            }
        }
        self.pods.get(uid).cloned()
    }
}

/// The hints of the first of `pids` that has any, a pod's before a
/// container's.
fn pids_hints(pids: &[u32]) -> CgroupHints {
    let mut hints = CgroupHints::default();
    for pid in pids {
        if let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/cgroup")) {
            hints.merge(proc_cgroup_hints(&text));
            if hints.pod_uid.is_some() {
                break;
            }
        }
    }
    hints
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0b9c3d2e-5f6a-4b7c-8d9e-0f1a2b3c4d5e";
    const ID: &str = "4f797c539e6c745de61a93ca3ff892358ecbcaccd8414d5db545c38428142970";

    fn pod(uid: &str) -> CgroupHints {
        CgroupHints {
            pod_uid: Some(uid.into()),
            container: None,
        }
    }

    #[test]
    fn systemd_driver_paths_give_the_pod_uid_with_dashes_and_the_runtime_id() {
        for (qos, runtime_scope, runtime) in [
            ("besteffort", "cri-containerd", "containerd"),
            ("burstable", "crio", "crio"),
            ("", "docker", "docker"),
        ] {
            let (slice, pod_slice) = if qos.is_empty() {
                (
                    String::new(),
                    format!("kubepods-pod{}.slice", UID.replace('-', "_")),
                )
            } else {
                (
                    format!("kubepods-{qos}.slice/"),
                    format!("kubepods-{qos}-pod{}.slice", UID.replace('-', "_")),
                )
            };
            let path = format!("/kubepods.slice/{slice}{pod_slice}/{runtime_scope}-{ID}.scope");
            assert_eq!(
                cgroup_hints(&path),
                CgroupHints {
                    pod_uid: Some(UID.into()),
                    container: Some((runtime, ID.into())),
                },
                "{path}"
            );
        }
    }

    #[test]
    fn cgroupfs_driver_paths_give_the_pod_uid_and_an_unnamed_runtime() {
        for path in [
            format!("/kubepods/besteffort/pod{UID}/{ID}"),
            format!("/kubepods/pod{UID}/{ID}"),
            // seen from inside another cgroup namespace
            format!("/../../kubepods/burstable/pod{UID}/{ID}"),
        ] {
            assert_eq!(
                cgroup_hints(&path),
                CgroupHints {
                    pod_uid: Some(UID.into()),
                    container: Some(("container", ID.into())),
                },
                "{path}"
            );
        }
        // The pod's own cgroup (the sandbox has no container scope yet).
        assert_eq!(cgroup_hints(&format!("/kubepods/pod{UID}")), pod(UID));
    }

    #[test]
    fn static_pods_have_a_32_hex_uid() {
        let hash = "3ab2c5e6f7a8b9c0d1e2f3a4b5c6d7e8";
        assert_eq!(
            cgroup_hints(&format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{hash}.slice"
            )),
            pod(hash)
        );
    }

    #[test]
    fn runtime_scopes_without_kubernetes_give_the_runtime_id() {
        for (path, runtime) in [
            (format!("/system.slice/docker-{ID}.scope"), "docker"),
            (format!("/docker/{ID}"), "docker"),
            (format!("/machine.slice/libpod-{ID}.scope"), "podman"),
            (format!("/libpod_parent/libpod-{ID}"), "podman"),
            (format!("/system.slice/crio-{ID}.scope"), "crio"),
            (
                format!("/system.slice/cri-containerd-{ID}.scope"),
                "containerd",
            ),
        ] {
            assert_eq!(
                cgroup_hints(&path),
                CgroupHints {
                    pod_uid: None,
                    container: Some((runtime, ID.into())),
                },
                "{path}"
            );
        }
    }

    #[test]
    fn other_paths_say_nothing() {
        for path in [
            "/",
            "/user.slice/user-0.slice/session-3.scope",
            "/system.slice/sshd.service",
            // a 32-hex directory that is not a pod
            "/process_api/b3c378efeb155c1b7db3d756a47399ab",
            // a bare id outside docker and kubepods
            &format!("/default/{ID}"),
            // CRI-O's monitor, not a container
            &format!("/system.slice/crio-conmon-{ID}.scope"),
            // not a UUID
            "/kubepods/besteffort/podnot-a-uid",
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1234.slice",
            &format!("/docker-{}.scope", &ID[..63]),
        ] {
            assert_eq!(cgroup_hints(path), CgroupHints::default(), "{path}");
        }
    }

    #[test]
    fn proc_cgroup_files_are_read_on_every_hierarchy() {
        // cgroup v1 / hybrid: the pod is in the controllers' lines only.
        let text =
            format!("12:memory:/kubepods/besteffort/pod{UID}/{ID}\n1:name=systemd:/\n0::/\n");
        assert_eq!(proc_cgroup_hints(&text).pod_uid.as_deref(), Some(UID));
        let v2 = format!("0::/system.slice/docker-{ID}.scope\n");
        assert_eq!(
            proc_cgroup_hints(&v2).container,
            Some(("docker", ID.to_string()))
        );
        assert_eq!(proc_cgroup_hints(""), CgroupHints::default());
    }

    #[test]
    fn pod_log_directories_give_namespace_and_name() {
        assert_eq!(
            pod_dir_entry(&format!("kube-system_coredns-5d78c9869d-x7k2p_{UID}")),
            Some((UID.into(), "kube-system/coredns-5d78c9869d-x7k2p".into()))
        );
        for bad in [
            "kube-system_coredns",
            &format!("_coredns_{UID}"),
            &format!("kube-system__{UID}"),
            "a_b_c",
        ] {
            assert_eq!(pod_dir_entry(bad), None, "{bad}");
        }
    }

    #[test]
    fn names_follow_host_pod_chosen_name_container_generated_name() {
        let both = CgroupHints {
            pod_uid: Some(UID.into()),
            container: Some(("containerd", ID.into())),
        };
        let container = CgroupHints {
            pod_uid: None,
            container: Some(("docker", ID.into())),
        };
        let none = CgroupHints::default();
        let cni = format!("cni-{UID}");
        assert_eq!(
            choose(true, &both, Some("a/b"), Some("x")).as_deref(),
            Some("host")
        );
        assert_eq!(
            choose(false, &both, Some("a/b"), Some(&cni)).as_deref(),
            Some("a/b")
        );
        assert_eq!(
            choose(false, &both, None, Some("x")),
            Some(format!("pod:{UID}"))
        );
        assert_eq!(
            choose(false, &container, None, Some("lab")).as_deref(),
            Some("lab")
        );
        assert_eq!(
            choose(false, &container, None, Some(&cni)).as_deref(),
            Some("docker:4f797c539e6c")
        );
        assert_eq!(choose(false, &none, None, Some(&cni)), Some(cni.clone()));
        assert_eq!(choose(false, &none, None, None), None);
        assert!(generated_netns_name(&format!("netns-{UID}")));
        assert!(generated_netns_name(UID));
        assert!(!generated_netns_name("ctdt-123-4"));
    }
}
