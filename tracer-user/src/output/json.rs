//! JSON lines. Field names are a contract: later tools read them. Unknown
//! values are `null`, never a made-up default.

use std::{borrow::Cow, io::Write};

use super::{CountsShown, ProbeShown, Shown, Sink};
use crate::events::decode::proto_name;
use crate::model::{
    counts::{CountsLine, NetnsCounts},
    DropLine, FillOrigin, ProbeKind, ProbeStatus, ProbeVerdict,
};
use crate::probe::{Status, Wire};

impl<'a> DropLine<'a> {
    /// The line of a drop the session resolved (borrowing its strings).
    pub fn from_shown(s: &'a Shown<'a>) -> DropLine<'a> {
        let ev = s.ev;
        let f = ev.flow.as_ref();
        let echo = ev.icmp.and_then(|i| i.echo);
        DropLine {
            kind: Default::default(),
            ts_ns: s.wall_ns,
            mono_ns: ev.ts_ns,
            cause: s.cause,
            reason: Cow::Borrowed(s.reason),
            netns: ev.netns,
            netns_name: s.netns_name.map(Cow::Borrowed),
            ifindex: ev.ifindex,
            ifname: s.ifname.map(Cow::Borrowed),
            proto: f.map(|f| Cow::Owned(proto_name(f.proto))),
            src: f.map(|f| f.src),
            dst: f.map(|f| f.dst),
            sport: f.and_then(|f| f.ports).map(|p| p.0),
            dport: f.and_then(|f| f.ports).map(|p| p.1),
            icmp_type: ev.icmp.map(|i| i.ty),
            icmp_code: ev.icmp.map(|i| i.code),
            icmp_id: echo.map(|e| e.0),
            icmp_seq: echo.map(|e| e.1),
            ct_count: ev.ct_fill.map(|c| c.count),
            ct_max: ev.ct_fill.map(|c| c.max),
            ct_fill: ev.ct_fill.map(fill_origin),
            has_ct: ev.ct.is_some(),
            untracked: ev.ct.map(|c| c.untracked()).unwrap_or(false),
            location: Cow::Borrowed(s.location),
            evidence: Cow::Borrowed(crate::cause::evidence(ev.source, s.cause)),
            cpu: ev.cpu,
            len: ev.skb_len,
        }
    }
}

fn fill_origin(c: crate::events::CtFill) -> FillOrigin {
    if c.sampled {
        FillOrigin::Sampled
    } else {
        FillOrigin::Kernel
    }
}

/// Writes the same object as serializing [`DropLine`] (same fields, same
/// order, `null` for unknowns), without building it: under a flood this is
/// the per-drop path, and serde's generic string escaping and the Strings
/// DropLine holds were the largest costs in its profile.
pub fn write_drop(out: &mut Vec<u8>, s: &Shown) {
    let ev = s.ev;
    let f = ev.flow.as_ref();
    let echo = ev.icmp.and_then(|i| i.echo);
    let ports = f.and_then(|f| f.ports);
    out.extend_from_slice(b"{\"kind\":\"drop\",\"ts_ns\":");
    num(out, s.wall_ns);
    out.extend_from_slice(b",\"mono_ns\":");
    num(out, ev.ts_ns);
    out.extend_from_slice(b",\"cause\":");
    string(out, s.cause.as_str());
    out.extend_from_slice(b",\"reason\":");
    string(out, s.reason);
    out.extend_from_slice(b",\"netns\":");
    opt_num(out, ev.netns);
    out.extend_from_slice(b",\"netns_name\":");
    opt_string(out, s.netns_name);
    out.extend_from_slice(b",\"ifindex\":");
    opt_num(out, ev.ifindex);
    out.extend_from_slice(b",\"ifname\":");
    opt_string(out, s.ifname);
    out.extend_from_slice(b",\"proto\":");
    match f {
        Some(f) => match f.proto {
            1 => string(out, "icmp"),
            6 => string(out, "tcp"),
            17 => string(out, "udp"),
            58 => string(out, "icmpv6"),
            132 => string(out, "sctp"),
            _ => string(out, &proto_name(f.proto)),
        },
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"src\":");
    opt_ip(out, f.map(|f| f.src));
    out.extend_from_slice(b",\"dst\":");
    opt_ip(out, f.map(|f| f.dst));
    out.extend_from_slice(b",\"sport\":");
    opt_num(out, ports.map(|p| p.0));
    out.extend_from_slice(b",\"dport\":");
    opt_num(out, ports.map(|p| p.1));
    out.extend_from_slice(b",\"icmp_type\":");
    opt_num(out, ev.icmp.map(|i| i.ty));
    out.extend_from_slice(b",\"icmp_code\":");
    opt_num(out, ev.icmp.map(|i| i.code));
    out.extend_from_slice(b",\"icmp_id\":");
    opt_num(out, echo.map(|e| e.0));
    out.extend_from_slice(b",\"icmp_seq\":");
    opt_num(out, echo.map(|e| e.1));
    out.extend_from_slice(b",\"ct_count\":");
    opt_num(out, ev.ct_fill.map(|c| c.count));
    out.extend_from_slice(b",\"ct_max\":");
    opt_num(out, ev.ct_fill.map(|c| c.max));
    out.extend_from_slice(b",\"ct_fill\":");
    opt_string(out, ev.ct_fill.map(|c| fill_origin(c).as_str()));
    out.extend_from_slice(b",\"has_ct\":");
    out.extend_from_slice(if ev.ct.is_some() { b"true" } else { b"false" });
    out.extend_from_slice(b",\"untracked\":");
    out.extend_from_slice(if ev.ct.map(|c| c.untracked()).unwrap_or(false) {
        b"true"
    } else {
        b"false"
    });
    out.extend_from_slice(b",\"location\":");
    string(out, s.location);
    out.extend_from_slice(b",\"evidence\":");
    string(out, crate::cause::evidence(s.ev.source, s.cause));
    out.extend_from_slice(b",\"cpu\":");
    num(out, ev.cpu);
    out.extend_from_slice(b",\"len\":");
    num(out, ev.skb_len);
    out.push(b'}');
}

fn num(out: &mut Vec<u8>, n: impl itoa::Integer) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

fn opt_num(out: &mut Vec<u8>, n: Option<impl itoa::Integer>) {
    match n {
        Some(n) => num(out, n),
        None => out.extend_from_slice(b"null"),
    }
}

fn string(out: &mut Vec<u8>, s: &str) {
    // Names from the kernel are plain ASCII; anything else takes serde's path.
    if s.bytes()
        .all(|b| b >= 0x20 && b != b'"' && b != b'\\' && b < 0x7f)
    {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        let _ = serde_json::to_writer(&mut *out, s);
    }
}

fn opt_string(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => string(out, s),
        None => out.extend_from_slice(b"null"),
    }
}

fn opt_ip(out: &mut Vec<u8>, ip: Option<std::net::IpAddr>) {
    match ip {
        Some(std::net::IpAddr::V4(a)) => {
            let o = a.octets();
            out.push(b'"');
            for (i, b) in o.iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                num(out, *b);
            }
            out.push(b'"');
        }
        Some(a @ std::net::IpAddr::V6(_)) => {
            use std::io::Write as _;
            let _ = write!(out, "\"{a}\"");
        }
        None => out.extend_from_slice(b"null"),
    }
}

impl ProbeVerdict {
    /// The verdict of a probe the session matched.
    pub fn from_shown(p: &ProbeShown) -> ProbeVerdict {
        let o = p.outcome;
        let (status, rtt_ns, drop) = match &o.status {
            Status::Ok { rtt_ns } => (ProbeStatus::Ok, Some(*rtt_ns), None),
            Status::Late { rtt_ns } => (ProbeStatus::Late, Some(*rtt_ns), None),
            Status::Lost { drop } => (ProbeStatus::Lost, None, drop.as_deref()),
        };
        let (probe, icmp_id, icmp_seq, local_port) = match o.wire {
            Wire::Echo { id, seq } => (ProbeKind::Icmp, Some(id), Some(seq), None),
            Wire::Port { proto, local, .. } => (
                if proto == 6 {
                    ProbeKind::Tcp
                } else {
                    ProbeKind::Udp
                },
                None,
                None,
                Some(local),
            ),
        };
        let verdict = match (status, drop) {
            (ProbeStatus::Lost, Some(d)) => Some(crate::output::human::verdict(d)),
            (ProbeStatus::Lost, None) => Some("no drop seen on this host".to_string()),
            _ => None,
        };
        ProbeVerdict {
            kind: Default::default(),
            ts_ns: p.wall_ns,
            host: p.label.to_string(),
            probe,
            seq: o.number,
            icmp_id,
            icmp_seq,
            local_port,
            status,
            rtt_ms: rtt_ns.map(|n| n as f64 / 1e6),
            cause: drop.map(|d| d.cause),
            verdict,
            drop: drop.map(|d| d.line.clone()),
        }
    }
}

impl CountsLine {
    /// Count mode's line for one period.
    pub fn from_shown(c: &CountsShown) -> CountsLine {
        CountsLine {
            kind: Default::default(),
            ts_ns: c.wall_ns,
            interval_s: c.interval_s,
            drops: c.drops,
            drops_total: c.drops_total,
            drops_by_cause: c
                .by_cause
                .iter()
                .map(|(cause, n)| (cause.as_str().to_string(), *n))
                .collect(),
            drops_by_netns: c
                .by_netns
                .iter()
                .map(|(ns, name, n, fill)| NetnsCounts {
                    netns: *ns,
                    netns_name: name.clone(),
                    drops: *n,
                    ct_count: fill.map(|f| f.count),
                    ct_max: fill.map(|f| f.max),
                })
                .collect(),
        }
    }
}

/// JSON lines on a writer (stdout for `live --json`).
pub struct JsonSink<W: Write> {
    out: W,
    /// Reused for every drop line: no allocation per drop.
    line: Vec<u8>,
}

impl<W: Write> JsonSink<W> {
    pub fn new(out: W) -> Self {
        JsonSink {
            out,
            line: Vec::with_capacity(512),
        }
    }
}

impl<W: Write> Sink for JsonSink<W> {
    fn drop_event(&mut self, s: &Shown) -> std::io::Result<()> {
        self.line.clear();
        write_drop(&mut self.line, s);
        self.line.push(b'\n');
        self.out.write_all(&self.line)
    }

    fn probe(&mut self, p: &ProbeShown) -> std::io::Result<()> {
        serde_json::to_writer(&mut self.out, &ProbeVerdict::from_shown(p))?;
        self.out.write_all(b"\n")
    }

    fn counts(&mut self, c: &CountsShown) -> std::io::Result<()> {
        serde_json::to_writer(&mut self.out, &CountsLine::from_shown(c))?;
        self.out.write_all(b"\n")
    }

    fn occupancy(&mut self, o: &crate::conntrack::occupancy::Occupancy) -> std::io::Result<()> {
        let mut v = o.to_json();
        v["kind"] = "occupancy".into();
        serde_json::to_writer(&mut self.out, &v)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        cause::Cause,
        events::{CtFill, CtRef, DropEvent, Flow, Icmp},
    };

    fn ev() -> DropEvent {
        DropEvent {
            ts_ns: 77,
            cpu: 1,
            reason: 12,
            location: 0,
            skb: 0,
            source: tracer_common::source::KFREE_SKB,
            netns: Some(4026532000),
            ifindex: Some(3),
            skb_len: 40,
            flow: Some(Flow {
                src: "198.18.0.1".parse().unwrap(),
                dst: "198.18.255.2".parse().unwrap(),
                proto: 17,
                ports: Some((5000, 65535)),
            }),
            icmp: None,
            ct: None,
            ct_fill: Some(CtFill {
                count: 64,
                max: 64,
                sampled: true,
                counted_drop: None,
            }),
            truncated: false,
            header: None,
        }
    }

    fn same_as_serde(ev: &DropEvent, name: Option<&str>, ifname: Option<&str>, location: &str) {
        let s = Shown {
            ev,
            cause: Cause::ConntrackTableFull,
            wall_ns: 1_700_000_000_000_000_000,
            reason: "NETFILTER_DROP",
            netns_name: name,
            ifname,
            location,
        };
        let mut out = Vec::new();
        write_drop(&mut out, &s);
        let ours: serde_json::Value = serde_json::from_slice(&out).expect("valid JSON");
        let theirs = serde_json::to_value(DropLine::from_shown(&s)).unwrap();
        assert_eq!(ours, theirs);
        // Field order is part of what readers see.
        let line = String::from_utf8(out).unwrap();
        assert_eq!(
            line,
            serde_json::to_string(&DropLine::from_shown(&s)).unwrap()
        );
        // A reader of the line gets the typed drop back, whole.
        let back: DropLine = serde_json::from_str(&line).expect("the model reads the line");
        assert_eq!(back, DropLine::from_shown(&s));
        // The drop inside a lost probe's verdict is the same bytes.
        let verdict = ProbeVerdict {
            kind: Default::default(),
            ts_ns: 1,
            host: "198.18.0.2".into(),
            probe: ProbeKind::Udp,
            seq: 1,
            icmp_id: None,
            icmp_seq: None,
            local_port: Some(40000),
            status: ProbeStatus::Lost,
            rtt_ms: None,
            cause: Some(s.cause),
            verdict: Some("v".into()),
            drop: Some(DropLine::from_shown(&s).into_owned()),
        };
        let v = serde_json::to_string(&verdict).unwrap();
        assert!(v.ends_with(&format!(",\"drop\":{line}}}")), "{v}");
        let back: ProbeVerdict = serde_json::from_str(&v).expect("the model reads the verdict");
        assert_eq!(back, verdict);
    }

    #[test]
    fn hand_written_drop_lines_equal_serde_ones() {
        same_as_serde(&ev(), Some("rx"), Some("veth0"), "nf_hook_slow+0x9a");
        let mut e = ev();
        e.flow = Some(Flow {
            src: "2001:db8::1".parse().unwrap(),
            dst: "::ffff:1.2.3.4".parse().unwrap(),
            proto: 58,
            ports: None,
        });
        e.icmp = Some(Icmp {
            ty: 128,
            code: 0,
            echo: Some((7, 65535)),
        });
        e.ct = Some(CtRef {
            info: 7,
            status: None,
            zone: 0,
        });
        e.ct_fill = None;
        e.netns = None;
        e.ifindex = None;
        same_as_serde(&e, None, None, "0xffffffff81000000");
        e.flow = None;
        e.icmp = None;
        // Names needing escapes take serde's path and still match.
        same_as_serde(&e, Some("we\"ird\\ns\u{1}"), Some("é"), "x");
        e.flow = Some(Flow {
            src: "0.0.0.0".parse().unwrap(),
            dst: "255.255.255.255".parse().unwrap(),
            proto: 47,
            ports: None,
        });
        same_as_serde(&e, None, None, "x");
    }
}
