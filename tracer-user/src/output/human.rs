//! One readable line per drop, for an operator's terminal.

use std::fmt::Write;

use super::Shown;
use crate::events::decode::proto_name;

/// Local wall-clock time of day with microseconds.
pub fn clock(wall_ns: u64) -> String {
    let secs = (wall_ns / 1_000_000_000) as libc::time_t;
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    unsafe { libc::localtime_r(&secs, &mut tm) };
    format!("{:02}:{:02}:{:02}.{:06}", tm.tm_hour, tm.tm_min, tm.tm_sec, (wall_ns % 1_000_000_000) / 1000)
}

pub fn netns_label(netns: Option<u32>, name: Option<&str>) -> String {
    match (netns, name) {
        (Some(_), Some(n)) => n.to_string(),
        (Some(i), None) => i.to_string(),
        (None, _) => "?".into(),
    }
}

pub fn drop_line(s: &Shown, out: &mut String) {
    let ev = s.ev;
    let _ = write!(out, "{} ns {} if {}", clock(s.wall_ns), netns_label(ev.netns, s.netns_name), s.ifname.map(str::to_string).unwrap_or_else(|| ev.ifindex.map(|i| format!("#{i}")).unwrap_or_else(|| "-".into())));
    match &ev.flow {
        Some(f) => {
            let _ = write!(out, " {}", proto_name(f.proto));
            match f.ports {
                Some((sp, dp)) => {
                    let _ = write!(out, " {} -> {}", sock(&f.src, sp), sock(&f.dst, dp));
                }
                None => {
                    let _ = write!(out, " {} -> {}", f.src, f.dst);
                }
            }
        }
        None => out.push_str(" (no IP header)"),
    }
    if let Some(i) = ev.icmp {
        match i.echo {
            Some((id, seq)) => {
                let _ = write!(out, " {} id {id} seq {seq}", if i.ty == 8 || i.ty == 128 { "echo-request" } else { "echo-reply" });
            }
            None => {
                let _ = write!(out, " type {} code {}", i.ty, i.code);
            }
        }
    }
    let _ = write!(out, "  {}", s.cause);
    if s.cause == crate::cause::Cause::Other {
        let _ = write!(out, " ({})", s.reason);
    }
    if let Some(c) = ev.ct_fill {
        let _ = write!(out, "  ct {}/{}", c.count, c.max);
    }
    let _ = write!(out, "  at {}", s.location);
}

fn sock(a: &std::net::IpAddr, port: u16) -> String {
    match a {
        std::net::IpAddr::V4(v) => format!("{v}:{port}"),
        std::net::IpAddr::V6(v) => format!("[{v}]:{port}"),
    }
}
