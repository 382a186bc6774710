//! A conntrack table snapshot as ctdrop emits it: who held the table (by
//! protocol and state, liveness, top sources, destinations and destination
//! ports). Stored typed in captures, carried by reports and the summary.
//! The builder that folds dumped entries into one is
//! `crate::conntrack::occupancy::OccupancyBuilder`.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::events::decode::parse_proto;

/// Entries per (protocol, state).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateRow {
    pub proto: String,
    /// Cow: a name from the tables here, or read back from a capture file.
    pub state: std::borrow::Cow<'static, str>,
    pub entries: u64,
    pub unreplied: u64,
    pub assured: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddrRow {
    pub addr: IpAddr,
    pub entries: u64,
    pub unreplied: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortRow {
    /// The protocol's name (`udp`, `proto33`); [`PortRow::proto_num`] is
    /// its number.
    pub proto: String,
    pub port: u16,
    pub entries: u64,
    pub unreplied: u64,
    pub assured: u64,
    /// Distinct sources in this port's entries (capped count, see builder).
    pub sources: u64,
}

impl PortRow {
    /// The IP protocol number, read from the name (0 if it names none).
    /// Derived, not stored: a snapshot read back from a capture gets the
    /// same number as the live one.
    pub fn proto_num(&self) -> u8 {
        parse_proto(&self.proto).unwrap_or(0)
    }
}

/// What a snapshot found, ready to show (and, as JSON, stored in captures).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Occupancy {
    pub netns: Option<u32>,
    pub netns_name: Option<String>,
    pub entries: u64,
    /// Global `nf_conntrack_max` at the time of the snapshot.
    pub max: Option<u64>,
    pub unreplied: u64,
    pub replied: u64,
    pub assured: u64,
    /// Entries with source or destination NAT applied.
    pub nat: u64,
    /// Whether the namespace has NAT rules (iptables or nft); None when
    /// neither tool could tell.
    pub nat_rules: Option<bool>,
    pub unreadable: u64,
    pub by_proto_state: Vec<StateRow>,
    pub top_sources: Vec<AddrRow>,
    pub top_destinations: Vec<AddrRow>,
    pub top_dst_ports: Vec<PortRow>,
    /// Wall-clock (unix ns) when the dump started.
    pub taken_ns: u64,
    pub elapsed_ms: f64,
    /// CPU time of the dump and summary (kernel and user): the part that
    /// does not depend on how busy the host is.
    pub cpu_ms: f64,
}

impl Occupancy {
    /// A snapshot read back from its JSON (a capture file's block).
    pub fn from_stored(json: &[u8]) -> serde_json::Result<Occupancy> {
        serde_json::from_slice(json)
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }

    pub fn label(&self) -> String {
        self.netns_name
            .clone()
            .or_else(|| self.netns.map(|n| n.to_string()))
            .unwrap_or_else(|| "this namespace".into())
    }
}
