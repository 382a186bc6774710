//! Binary capture records against JSON lines: bytes per drop and write cost,
//! the measurement behind the capture format (README, "Capture files").
//!
//! `cargo bench -p tracer-user --bench capture_encoding [-- N]`

use std::{
    io::{BufWriter, Write},
    time::Instant,
};

use ctdrop::{
    capture::{meta::Header, CaptureReader, CaptureWriter, Item},
    cause::Cause,
    events::DropEvent,
    output::{json::write_drop, Shown},
};

mod common;
use common::drop_no;

fn capture_header() -> Header {
    Header {
        format_version: ctdrop::capture::FORMAT_VERSION,
        ctdrop_version: "bench".into(),
        host: "bench".into(),
        kernel_release: String::new(),
        started_wall_ns: 0,
        started_mono_ns: 0,
        boot_offset_ns: 0,
        mechanisms: Default::default(),
        drop_reasons: Default::default(),
        conntrack_max: None,
        conntrack_buckets: None,
        counters_at_start: vec![],
        filter: Default::default(),
        headers: true,
        duration_s: None,
        probes: vec![],
        command: vec![],
        max_flows: None,
    }
}

struct Result_ {
    bytes_per_drop: f64,
    write_ns: f64,
    read_ns: f64,
}

fn binary(n: u64, header: bool, dir: &std::path::Path) -> Result_ {
    let path = dir.join(format!("bin-{header}.ctdrop"));
    let _ = std::fs::remove_file(&path);
    let evs: Vec<DropEvent> = (0..n).map(|i| drop_no(i, header)).collect();
    let t = Instant::now();
    let mut w = CaptureWriter::create(&path, true).unwrap();
    w.write_header(&capture_header()).unwrap();
    for ev in &evs {
        w.drop_event(
            ev,
            Cause::ConntrackTableFull,
            "nf_hook_slow+0x7d",
            Some("ctdc-rcv"),
            Some("ctdc-b"),
        )
        .unwrap();
    }
    w.flush().unwrap();
    let write_ns = t.elapsed().as_nanos() as f64 / n as f64;
    let size = std::fs::metadata(&path).unwrap().len();
    let t = Instant::now();
    let mut seen = 0u64;
    let mut r = CaptureReader::open(&path).unwrap();
    while let Some(it) = r.next_item() {
        seen += matches!(it, Item::Drop(_)) as u64;
    }
    assert_eq!(seen, n);
    let read_ns = t.elapsed().as_nanos() as f64 / seen as f64;
    Result_ {
        bytes_per_drop: size as f64 / n as f64,
        write_ns,
        read_ns,
    }
}

fn json_lines(n: u64, header: bool, dir: &std::path::Path) -> Result_ {
    let path = dir.join(format!("json-{header}.jsonl"));
    let evs: Vec<DropEvent> = (0..n).map(|i| drop_no(i, header)).collect();
    let t = Instant::now();
    let mut out = BufWriter::with_capacity(1 << 16, std::fs::File::create(&path).unwrap());
    let mut line = Vec::with_capacity(1024);
    for ev in &evs {
        let s = Shown {
            ev,
            cause: Cause::ConntrackTableFull,
            wall_ns: ev.ts_ns + 1_790_000_000_000_000_000,
            reason: "NETFILTER_DROP",
            netns_name: Some("ctdc-rcv"),
            ifname: Some("ctdc-b"),
            location: "nf_hook_slow+0x7d",
        };
        // What `live --json` writes per drop.
        line.clear();
        write_drop(&mut line, &s);
        if line.last() == Some(&b'\n') {
            line.pop();
        }
        if line.last() == Some(&b'}') {
            line.pop();
        }
        out.write_all(&line).unwrap();
        // JSON has no bytes type: headers go as hex, as a JSON capture would carry them.
        if let Some(h) = &ev.header {
            out.write_all(b",\"header\":\"").unwrap();
            for b in h.iter() {
                write!(out, "{b:02x}").unwrap();
            }
            out.write_all(b"\"").unwrap();
        }
        out.write_all(b"}\n").unwrap();
    }
    out.flush().unwrap();
    let write_ns = t.elapsed().as_nanos() as f64 / n as f64;
    let size = std::fs::metadata(&path).unwrap().len();
    let t = Instant::now();
    let text = std::fs::read_to_string(&path).unwrap();
    let mut seen = 0u64;
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        seen += v.get("kind").is_some() as u64;
    }
    let read_ns = t.elapsed().as_nanos() as f64 / seen as f64;
    Result_ {
        bytes_per_drop: size as f64 / n as f64,
        write_ns,
        read_ns,
    }
}

fn main() {
    let n: u64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let dir = std::env::temp_dir().join(format!("ctdrop-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    println!("{n} drops per run; CPU share = write cost x 300k drops/s");
    println!(
        "{:<28} {:>12} {:>12} {:>14} {:>12}",
        "encoding", "bytes/drop", "write ns", "CPU @300k/s", "read ns"
    );
    for header in [false, true] {
        for (name, r) in [
            ("binary", binary(n, header, &dir)),
            ("json lines", json_lines(n, header, &dir)),
        ] {
            let label = format!("{name}{}", if header { " + 128 B header" } else { "" });
            println!(
                "{label:<28} {:>12.1} {:>12.0} {:>13.1}% {:>12.0}",
                r.bytes_per_drop,
                r.write_ns,
                r.write_ns * 300_000.0 / 1e9 * 100.0,
                r.read_ns
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
