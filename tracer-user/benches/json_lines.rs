//! The hand-written drop line writer against serde on the model type
//! (`DropLine`): the measurement that keeps `output::json::write_drop`.
//! Both produce the same bytes (a unit test holds them equal).
//!
//! `cargo bench -p tracer-user --bench json_lines [-- N]`

use std::time::Instant;

use ctdrop::{
    cause::Cause,
    events::DropEvent,
    model::DropLine,
    output::{json::write_drop, Shown},
};

mod common;
use common::drop_no;

fn main() {
    let n: u64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let events: Vec<DropEvent> = (0..1024).map(|i| drop_no(i, false)).collect();
    let shown = |e| Shown {
        ev: e,
        cause: Cause::ConntrackTableFull,
        wall_ns: 1_796_000_000_000_000_000,
        reason: "NETFILTER_DROP",
        netns_name: Some("ctdrop-rx"),
        ifname: Some("veth-rx"),
        location: "nf_hook_slow+0x9a",
    };
    let mut line = Vec::with_capacity(512);
    let mut run = |name: &str, f: &mut dyn FnMut(&Shown, &mut Vec<u8>)| {
        let mut bytes = 0usize;
        let t = Instant::now();
        for i in 0..n {
            line.clear();
            f(&shown(&events[(i % 1024) as usize]), &mut line);
            bytes += line.len();
        }
        let ns = t.elapsed().as_nanos() as f64 / n as f64;
        println!(
            "{name:<28} {ns:7.1} ns/drop  ({} bytes/line)",
            bytes as u64 / n
        );
    };
    println!("{n} drop lines per writer");
    run("write_drop (hand-written)", &mut |s, out| {
        write_drop(out, s)
    });
    run("serde_json on DropLine", &mut |s, out| {
        serde_json::to_writer(&mut *out, &DropLine::from_shown(s)).unwrap()
    });
}
