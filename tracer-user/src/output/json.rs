//! JSON lines. Field names are a contract: later tools read them. Unknown
//! values are `null`, never a made-up default.

use serde::Serialize;

use std::io::Write;

use super::{ProbeShown, Shown, Sink};
use crate::probe::{Status, Wire};
use crate::events::decode::proto_name;

#[derive(Serialize)]
pub struct DropJson<'a> {
    pub kind: &'static str,
    pub ts_ns: u64,
    pub mono_ns: u64,
    pub cause: &'static str,
    pub reason: &'a str,
    pub netns: Option<u32>,
    pub netns_name: Option<&'a str>,
    pub ifindex: Option<u32>,
    pub ifname: Option<&'a str>,
    pub proto: Option<String>,
    pub src: Option<String>,
    pub dst: Option<String>,
    pub sport: Option<u16>,
    pub dport: Option<u16>,
    pub icmp_type: Option<u8>,
    pub icmp_code: Option<u8>,
    pub icmp_id: Option<u16>,
    pub icmp_seq: Option<u16>,
    pub ct_count: Option<u64>,
    pub ct_max: Option<u64>,
    pub ct_fill: Option<&'static str>,
    pub has_ct: bool,
    pub untracked: bool,
    pub location: &'a str,
    /// What the cause rests on: a conntrack probe saw it, or it was inferred.
    pub evidence: &'static str,
    pub cpu: u32,
    pub len: u32,
}

impl<'a> DropJson<'a> {
    pub fn from_shown(s: &'a Shown<'a>) -> DropJson<'a> {
        let ev = s.ev;
        let f = ev.flow.as_ref();
        let echo = ev.icmp.and_then(|i| i.echo);
        DropJson {
            kind: "drop",
            ts_ns: s.wall_ns,
            mono_ns: ev.ts_ns,
            cause: s.cause.as_str(),
            reason: s.reason,
            netns: ev.netns,
            netns_name: s.netns_name,
            ifindex: ev.ifindex,
            ifname: s.ifname,
            proto: f.map(|f| proto_name(f.proto)),
            src: f.map(|f| f.src.to_string()),
            dst: f.map(|f| f.dst.to_string()),
            sport: f.and_then(|f| f.ports).map(|p| p.0),
            dport: f.and_then(|f| f.ports).map(|p| p.1),
            icmp_type: ev.icmp.map(|i| i.ty),
            icmp_code: ev.icmp.map(|i| i.code),
            icmp_id: echo.map(|e| e.0),
            icmp_seq: echo.map(|e| e.1),
            ct_count: ev.ct_fill.map(|c| c.count),
            ct_max: ev.ct_fill.map(|c| c.max),
            ct_fill: ev.ct_fill.map(|c| if c.sampled { "sampled" } else { "kernel" }),
            has_ct: ev.ct.is_some(),
            untracked: ev.ct.map(|c| c.untracked()).unwrap_or(false),
            location: s.location,
            evidence: crate::cause::evidence(ev.source, s.cause),
            cpu: ev.cpu,
            len: ev.skb_len,
        }
    }
}

pub fn probe_json(p: &ProbeShown) -> serde_json::Value {
    let o = p.outcome;
    let (status, rtt_ns, drop) = match &o.status {
        Status::Ok { rtt_ns } => ("ok", Some(*rtt_ns), None),
        Status::Late { rtt_ns } => ("late", Some(*rtt_ns), None),
        Status::Lost { drop } => ("lost", None, drop.as_ref()),
    };
    let (kind, icmp_id, icmp_seq, local_port) = match o.wire {
        Wire::Echo { id, seq } => ("icmp", Some(id), Some(seq), None),
        Wire::Port { proto, local, .. } => (if proto == 6 { "tcp" } else { "udp" }, None, None, Some(local)),
    };
    let verdict = match (&o.status, drop) {
        (Status::Lost { .. }, Some(d)) => Some(crate::output::human::verdict(d)),
        (Status::Lost { .. }, None) => Some("no drop seen on this host".to_string()),
        _ => None,
    };
    serde_json::json!({
        "kind": "probe",
        "ts_ns": p.wall_ns,
        "host": p.label,
        "probe": kind,
        "seq": o.number,
        "icmp_id": icmp_id,
        "icmp_seq": icmp_seq,
        "local_port": local_port,
        "status": status,
        "rtt_ms": rtt_ns.map(|n| n as f64 / 1e6),
        "cause": drop.map(|d| d.cause.as_str()),
        "verdict": verdict,
        "drop": drop.map(|d| d.json.clone()),
    })
}

/// JSON lines on a writer (stdout for `live --json`).
pub struct JsonSink<W: Write> {
    out: W,
}

impl<W: Write> JsonSink<W> {
    pub fn new(out: W) -> Self {
        JsonSink { out }
    }
}

impl<W: Write> Sink for JsonSink<W> {
    fn drop_event(&mut self, s: &Shown) -> std::io::Result<()> {
        serde_json::to_writer(&mut self.out, &DropJson::from_shown(s))?;
        self.out.write_all(b"\n")
    }

    fn probe(&mut self, p: &ProbeShown) -> std::io::Result<()> {
        serde_json::to_writer(&mut self.out, &probe_json(p))?;
        self.out.write_all(b"\n")
    }

    fn summary(&mut self, s: &crate::summary::Summary) -> std::io::Result<()> {
        serde_json::to_writer(&mut self.out, &s.to_json())?;
        self.out.write_all(b"\n")
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}
