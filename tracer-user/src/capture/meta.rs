//! The header and trailer blocks of a capture: their types are the
//! model's ([`crate::model::capture`]); here is how the capture fills them
//! in and reads them.

pub use crate::model::capture::{
    CaptureFilter, CounterDelta, Header, NsCounters, Trailer, WatchTrailer,
};

use crate::conntrack::stats::CtCounters;

impl NsCounters {
    pub fn ct(&self) -> CtCounters {
        CtCounters {
            columns: self.counters.clone(),
        }
    }
}

impl CaptureFilter {
    /// From the kernel filter in force.
    pub fn from_config(f: &tracer_common::FilterConfig) -> CaptureFilter {
        let netns_all: Vec<u32> = f.netns[..f.n_netns as usize].to_vec();
        let hosts = crate::filter::nets(f);
        let ports: Vec<u16> = f.ports[..f.n_ports as usize].to_vec();
        CaptureFilter {
            netns: netns_all.first().copied(),
            proto: (f.l4_proto != 0).then_some(f.l4_proto),
            host: hosts.first().cloned(),
            port: ports.first().copied(),
            all_reasons: f.all_reasons != 0,
            netns_all,
            hosts,
            ports,
            interfaces: f.ifs[..f.n_ifs as usize]
                .iter()
                .map(|i| (i.netns, i.ifindex))
                .collect(),
        }
    }

    /// Only some conntrack drops were traced.
    pub fn narrows(&self) -> bool {
        self.netns.is_some()
            || self.proto.is_some()
            || self.host.is_some()
            || self.port.is_some()
            || !self.interfaces.is_empty()
    }
}

/// `uname -r`.
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}
