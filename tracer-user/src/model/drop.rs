//! A dropped packet as ctdrop emits it: a `live --json` line, the `drop`
//! of a lost probe's verdict, a CSV row.

use std::{borrow::Cow, net::IpAddr};

use serde::{Deserialize, Serialize};

use super::DropKind;
use crate::cause::Cause;

/// One drop. Field names and order are a contract (later tools read them);
/// unknown values are `null`, never a made-up default. Strings borrow from
/// the session while a line is written, and are owned when the line is
/// kept (a lost probe's drop) or read back.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DropLine<'a> {
    pub kind: DropKind,
    /// Unix-epoch nanoseconds.
    pub ts_ns: u64,
    /// CLOCK_MONOTONIC nanoseconds (the kernel's timestamp).
    pub mono_ns: u64,
    pub cause: Cause,
    /// The kernel's drop reason name.
    pub reason: Cow<'a, str>,
    pub netns: Option<u32>,
    pub netns_name: Option<Cow<'a, str>>,
    pub ifindex: Option<u32>,
    pub ifname: Option<Cow<'a, str>>,
    pub proto: Option<Cow<'a, str>>,
    pub src: Option<IpAddr>,
    pub dst: Option<IpAddr>,
    pub sport: Option<u16>,
    pub dport: Option<u16>,
    pub icmp_type: Option<u8>,
    pub icmp_code: Option<u8>,
    pub icmp_id: Option<u16>,
    pub icmp_seq: Option<u16>,
    /// The namespace's table fill near the drop.
    pub ct_count: Option<u64>,
    pub ct_max: Option<u64>,
    pub ct_fill: Option<FillOrigin>,
    #[serde(default)]
    pub has_ct: bool,
    #[serde(default)]
    pub untracked: bool,
    pub location: Cow<'a, str>,
    /// What the cause rests on: a conntrack probe saw it, or it was inferred.
    /// (Captures written before it existed read with an empty one.)
    #[serde(default)]
    pub evidence: Cow<'a, str>,
    pub cpu: u32,
    pub len: u32,
}

/// Where a drop's table fill came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FillOrigin {
    /// Read by userspace near the drop.
    Sampled,
    /// Read by the kernel at the drop.
    Kernel,
}

impl FillOrigin {
    pub fn as_str(self) -> &'static str {
        match self {
            FillOrigin::Sampled => "sampled",
            FillOrigin::Kernel => "kernel",
        }
    }
}

fn owned(s: Cow<'_, str>) -> Cow<'static, str> {
    Cow::Owned(s.into_owned())
}

impl DropLine<'_> {
    /// The same line, owning its strings (to keep it past the session's
    /// borrow).
    pub fn into_owned(self) -> DropLine<'static> {
        DropLine {
            kind: self.kind,
            ts_ns: self.ts_ns,
            mono_ns: self.mono_ns,
            cause: self.cause,
            reason: owned(self.reason),
            netns: self.netns,
            netns_name: self.netns_name.map(owned),
            ifindex: self.ifindex,
            ifname: self.ifname.map(owned),
            proto: self.proto.map(owned),
            src: self.src,
            dst: self.dst,
            sport: self.sport,
            dport: self.dport,
            icmp_type: self.icmp_type,
            icmp_code: self.icmp_code,
            icmp_id: self.icmp_id,
            icmp_seq: self.icmp_seq,
            ct_count: self.ct_count,
            ct_max: self.ct_max,
            ct_fill: self.ct_fill,
            has_ct: self.has_ct,
            untracked: self.untracked,
            location: owned(self.location),
            evidence: owned(self.evidence),
            cpu: self.cpu,
            len: self.len,
        }
    }
}
