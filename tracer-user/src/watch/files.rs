//! The capture directory: file names, room left, and deleting the oldest
//! captures past `--max-files` / `--max-bytes`.

use std::{
    fs::OpenOptions,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
    time::{Duration, UNIX_EPOCH},
};

use anyhow::{Context, Result};

const PREFIX: &str = "ctdrop-";
const SUFFIX: &str = ".ctdrop";

/// Creates `dir` (0700: captures name hosts and flows) and proves it is
/// writable, so a wrong `--dir` fails at the start, not at the incident.
pub fn prepare_dir(dir: &Path) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("--dir {}: cannot create it", dir.display()))?;
    let probe = dir.join(format!(".ctdrop-write-test-{}", std::process::id()));
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&probe)
        .with_context(|| format!("--dir {}: cannot write there", dir.display()))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// `ctdrop-20261201T145254.123Z-<namespace>-<trigger>.ctdrop`: sorts by
/// time, says where and why. Characters a shell would trip on become `_`.
pub fn file_name(wall_ns: u64, subject: &str, trigger: &str) -> String {
    let t = humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_nanos(wall_ns))
        .to_string()
        .replace(['-', ':'], "");
    let clean: String = subject
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{PREFIX}{t}-{clean}-{trigger}{SUFFIX}")
}

/// A path for `name` in `dir` that does not exist yet.
pub fn free_path(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    if !p.exists() {
        return p;
    }
    let stem = name.strip_suffix(SUFFIX).unwrap_or(name);
    (2..)
        .map(|i| dir.join(format!("{stem}-{i}{SUFFIX}")))
        .find(|p| !p.exists())
        .unwrap()
}

/// Space kept free beyond a capture's own size: 5% of the filesystem, at
/// most 256 MiB. A capture never takes the last of a shared disk.
pub fn reserve(total: u64) -> u64 {
    (total / 20).min(256 << 20)
}

/// Ok when `dir` has room for about `need` bytes plus the reserve; else
/// why not, in words.
pub fn room(dir: &Path, need: u64) -> std::result::Result<(), String> {
    let c =
        std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: statvfs fills the zeroed struct it is given; the path is a
    // NUL-terminated string that outlives the call.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(format!(
            "cannot read free space: {}",
            std::io::Error::last_os_error()
        ));
    }
    let frsize = st.f_frsize as u64;
    let (avail, total) = (st.f_bavail as u64 * frsize, st.f_blocks as u64 * frsize);
    let keep = reserve(total);
    if avail < need + keep {
        return Err(format!("disk nearly full: {avail} bytes free of {total}, the capture needs about {need} and {keep} stay free"));
    }
    Ok(())
}

/// Deletes the oldest captures in `dir` (by their time-ordered names)
/// until at most `max_files` and `max_bytes` remain; `keep` (the capture
/// just written) is never deleted. Returns what was deleted, with sizes.
pub fn rotate(
    dir: &Path,
    max_files: u64,
    max_bytes: u64,
    keep: &Path,
) -> Vec<(PathBuf, u64, std::io::Result<()>)> {
    let mut caps: Vec<(String, PathBuf, u64)> = match std::fs::read_dir(dir) {
        Ok(d) => d
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let m = e.metadata().ok()?;
                (name.starts_with(PREFIX) && name.ends_with(SUFFIX) && m.is_file())
                    .then(|| (name, e.path(), m.len()))
            })
            .collect(),
        Err(_) => return Vec::new(),
    };
    caps.sort();
    let mut count = caps.len() as u64;
    let mut bytes: u64 = caps.iter().map(|c| c.2).sum();
    let mut deleted = Vec::new();
    for (_, path, len) in caps {
        if count <= max_files && bytes <= max_bytes {
            break;
        }
        if path == keep {
            continue;
        }
        let r = std::fs::remove_file(&path);
        if r.is_ok() {
            count -= 1;
            bytes -= len;
        }
        deleted.push((path, len, r));
    }
    deleted
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_sort_by_time_and_carry_namespace_and_trigger() {
        let a = file_name(1_764_600_774_123_000_000, "pod/x y", "first_drop");
        assert_eq!(a, "ctdrop-20251201T145254.123Z-pod_x_y-first_drop.ctdrop");
        let b = file_name(1_764_600_775_000_000_000, "a", "signal");
        assert!(a < b);
    }

    #[test]
    fn rotation_deletes_oldest_first_and_keeps_the_new_file() {
        let d = tempfile::tempdir().unwrap();
        let mut paths = Vec::new();
        for i in 0..4u64 {
            let p = d.path().join(file_name(
                1_000_000_000_000_000_000 + i * 1_000_000_000,
                "ns",
                "first_drop",
            ));
            std::fs::write(&p, vec![0u8; 100]).unwrap();
            paths.push(p);
        }
        std::fs::write(d.path().join("other.txt"), b"not ours").unwrap();
        let gone = rotate(d.path(), 2, u64::MAX, &paths[3]);
        assert_eq!(
            gone.iter().map(|g| g.0.clone()).collect::<Vec<_>>(),
            paths[..2].to_vec()
        );
        assert!(paths[2].exists() && paths[3].exists() && d.path().join("other.txt").exists());
        // Bytes: 200 left, at most 150 allowed: the older goes, the newest stays even alone over.
        let gone = rotate(d.path(), 10, 50, &paths[3]);
        assert_eq!(gone.len(), 1);
        assert!(!paths[2].exists() && paths[3].exists());
    }

    #[test]
    fn free_path_never_reuses_a_name() {
        let d = tempfile::tempdir().unwrap();
        let n = file_name(0, "ns", "signal");
        std::fs::write(d.path().join(&n), b"x").unwrap();
        let p = free_path(d.path(), &n);
        assert!(
            p.to_string_lossy().ends_with("-signal-2.ctdrop"),
            "{}",
            p.display()
        );
    }
}
