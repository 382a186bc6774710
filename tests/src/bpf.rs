//! What BPF objects exist (`bpftool -j prog|link|map show`) and who holds
//! them (`/proc/*/fdinfo`), to prove ctdrop leaves nothing behind.
//!
//! Other engineers may run ctdrop at the same time, so a test never compares
//! whole listings: it looks at the ids one ctdrop process held, and at
//! objects created after a point that no live process holds any more.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context, Result};
use serde_json::Value;

use crate::run;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Prog,
    Link,
    Map,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Prog, Kind::Link, Kind::Map];

    fn bpftool(self) -> &'static str {
        match self {
            Kind::Prog => "prog",
            Kind::Link => "link",
            Kind::Map => "map",
        }
    }

    fn fdinfo_key(self) -> &'static str {
        match self {
            Kind::Prog => "prog_id:",
            Kind::Link => "link_id:",
            Kind::Map => "map_id:",
        }
    }
}

/// One object as bpftool shows it.
#[derive(Clone, Debug)]
pub struct Object {
    pub kind: Kind,
    pub id: u64,
    /// Program or map name (links have none: see `prog_id`).
    pub name: String,
    /// For links: the program attached through it.
    pub prog_id: Option<u64>,
    /// The raw bpftool entry, for messages.
    pub raw: Value,
}

/// Everything bpftool lists now, by (kind, id).
pub fn objects() -> Result<BTreeMap<(Kind, u64), Object>> {
    let mut out = BTreeMap::new();
    for kind in Kind::ALL {
        let text = run(&["bpftool", "-j", kind.bpftool(), "show"])?;
        let list: Vec<Value> = serde_json::from_str(&text)
            .with_context(|| format!("bpftool {} show: not JSON: {text:.200}", kind.bpftool()))?;
        for v in list {
            let Some(id) = v["id"].as_u64() else { continue };
            let name = v["name"].as_str().unwrap_or("").to_string();
            out.insert(
                (kind, id),
                Object {
                    kind,
                    id,
                    name,
                    prog_id: v["prog_id"].as_u64(),
                    raw: v,
                },
            );
        }
    }
    Ok(out)
}

/// The highest id of each kind now: objects above it were created later.
pub fn high_water() -> Result<BTreeMap<Kind, u64>> {
    let objs = objects()?;
    Ok(Kind::ALL
        .iter()
        .map(|k| {
            (
                *k,
                objs.keys()
                    .filter(|(kk, _)| kk == k)
                    .map(|(_, id)| *id)
                    .max()
                    .unwrap_or(0),
            )
        })
        .collect())
}

/// Ids the process `pid` holds through its file descriptors.
pub fn held_by(pid: u32) -> BTreeSet<(Kind, u64)> {
    let mut out = BTreeSet::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return out;
    };
    for e in dir.flatten() {
        // An fd can close between listing and reading: skip it.
        let Ok(text) = std::fs::read_to_string(e.path()) else {
            continue;
        };
        for line in text.lines() {
            for kind in Kind::ALL {
                if let Some(v) = line.strip_prefix(kind.fdinfo_key()) {
                    if let Ok(id) = v.trim().parse() {
                        out.insert((kind, id));
                    }
                }
            }
        }
    }
    out
}

/// Ids held by any live process.
pub fn held_by_anyone() -> BTreeSet<(Kind, u64)> {
    let mut out = BTreeSet::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            if let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) {
                out.extend(held_by(pid));
            }
        }
    }
    out
}

/// Names ctdrop gives its programs (the kernel keeps 15 characters).
pub fn is_ctdrop_prog(name: &str) -> bool {
    name == "kfree_skb" || name.starts_with("ct_") || name == "fentry_probe"
}

/// ctdrop programs created after `since`, and links to them, that no live
/// process holds: nothing would ever detach or free them.
pub fn orphans_since(since: &BTreeMap<Kind, u64>) -> Result<Vec<Object>> {
    let objs = objects()?;
    let held = held_by_anyone();
    let ours: BTreeSet<u64> = objs
        .values()
        .filter(|o| o.kind == Kind::Prog && o.id > since[&Kind::Prog] && is_ctdrop_prog(&o.name))
        .map(|o| o.id)
        .collect();
    Ok(objs
        .into_values()
        .filter(|o| match o.kind {
            Kind::Prog => ours.contains(&o.id),
            Kind::Link => o.id > since[&Kind::Link] && o.prog_id.is_some_and(|p| ours.contains(&p)),
            Kind::Map => false,
        })
        .filter(|o| !held.contains(&(o.kind, o.id)))
        .collect())
}

/// Of `ids`, those bpftool still lists.
pub fn still_listed(ids: &BTreeSet<(Kind, u64)>) -> Result<Vec<Object>> {
    let objs = objects()?;
    Ok(ids.iter().filter_map(|k| objs.get(k).cloned()).collect())
}

/// Waits (at most `limit`) until nothing of `held` is listed and no ctdrop
/// program created after `since` is left without an owner: the kernel frees
/// programs and maps after an RCU grace period. What is left at the end.
pub fn wait_released(
    held: &BTreeSet<(Kind, u64)>,
    since: &BTreeMap<Kind, u64>,
    limit: std::time::Duration,
) -> Result<(Vec<Object>, Vec<Object>)> {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let left = still_listed(held)?;
        let orphans = orphans_since(since)?;
        if (left.is_empty() && orphans.is_empty()) || std::time::Instant::now() > deadline {
            return Ok((left, orphans));
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}
