//! Command line: clap definitions and argument parsing only.

use std::{path::PathBuf, time::Duration};

use anyhow::{anyhow, Result};
use clap::{Args, Parser, Subcommand};

use crate::{flows::DEFAULT_MAX_FLOWS, kernel::capabilities::DEFAULT_BTF};

/// Default cap on drop records held in memory. A record costs about 200
/// bytes there, so the cap bounds the recorder at about 40 MB whatever the
/// flood; past it drops are counted (metric, capture trailer), not kept.
pub const DEFAULT_BUFFER_RECORDS: usize = 200_000;

#[derive(Parser, Debug)]
#[command(
    name = "ctdrop",
    version,
    about = "Which packets the Linux connection tracker dropped, for which flows, why, and which lost pings those were"
)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Command,
    /// More diagnostics on stderr: -v debug, -vv trace and the kernel
    /// programs' own (--bpf-log). RUST_LOG, when set, decides instead.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Only warnings and errors on stderr; results, the `attached` line and
    /// an error that ends the run still show. (live --quiet is another
    /// thing: no per-drop lines on stdout.)
    #[arg(
        short = 'q',
        long = "log-quiet",
        global = true,
        conflicts_with = "verbose"
    )]
    pub log_quiet: bool,
    /// Diagnostics of the kernel programs (drops whose packet they could
    /// not parse, failed map lookups) as `ctdrop: debug: bpf:` lines. Off,
    /// the verifier removes them from the programs.
    #[arg(long, global = true)]
    pub bpf_log: bool,
}

impl Cli {
    pub fn verbosity(&self) -> crate::logging::Verbosity {
        crate::logging::Verbosity {
            verbose: self.verbose,
            quiet: self.log_quiet,
            bpf_log: self.bpf_log,
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Trace drops live until Ctrl-C, SIGTERM or --duration, then summarize.
    Live(LiveArgs),
    /// One screen during an incident: table fill per namespace, drops/s by
    /// cause, top flows and ports, probes (q quits).
    Top(TopArgs),
    /// Record drops and probe verdicts to a capture file for later reports.
    Capture(CaptureArgs),
    /// Summarize a capture file, or compare two (--before/--after).
    Report(ReportArgs),
    /// Export a capture's packet headers as pcap-ng (needs capture --headers).
    Export(ExportArgs),
    /// Tell what this kernel allows and how conntrack is doing per namespace.
    Check(CheckArgs),
    /// The incident, reproduced in throwaway namespaces and explained.
    Demo(DemoArgs),
    /// Always on: a flight recorder that writes a capture per incident.
    Watch(WatchArgs),
}

#[derive(Args, Debug, Clone)]
pub struct TraceArgs {
    /// Only drops in this network namespace: a name from `ip netns list`, a
    /// path (/proc/PID/ns/net, /run/netns/X), a PID, or an inode (repeatable).
    #[arg(long, value_name = "NAME|PATH|PID|INODE")]
    pub netns: Vec<String>,
    /// Only drops of packets on this interface (repeatable; looked up in the
    /// --netns namespaces, else in this host's and every named one).
    #[arg(long, value_name = "NAME")]
    pub ifname: Vec<String>,
    /// Only this L4 protocol: tcp, udp, icmp, icmpv6, sctp or a number.
    #[arg(long, value_parser = parse_proto)]
    pub proto: Option<u8>,
    /// Only packets from or to this address or prefix: 198.18.0.2,
    /// 10.0.0.0/8, 2001:db8::/32 (repeatable).
    #[arg(long, value_name = "ADDR[/LEN]", value_parser = crate::filter::parse_net)]
    pub host: Vec<crate::filter::Net>,
    /// Only packets from or to this TCP/UDP port (repeatable).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub port: Vec<u16>,
    /// Report every kernel drop, not only netfilter's.
    #[arg(long)]
    pub all_reasons: bool,
    /// Ring buffer size in bytes (a power of two, at least a page).
    #[arg(long, value_parser = parse_size, default_value = "4M")]
    pub ring_size: u64,
    /// Kernel BTF to read struct layouts from.
    #[arg(long, default_value = DEFAULT_BTF)]
    pub btf: PathBuf,
    /// Flows kept in detail; drops beyond that still count in every total
    /// (0: totals only, no per-flow table).
    #[arg(long, default_value_t = DEFAULT_MAX_FLOWS)]
    pub max_flows: usize,
    /// How to watch conntrack: auto picks the best this kernel allows.
    #[arg(long, value_enum, default_value = "auto")]
    pub mode: crate::kernel::tier::Mode,
}

impl TraceArgs {
    /// The filter options, for `filter::fill`.
    pub fn filters(&self) -> crate::filter::Wanted<'_> {
        crate::filter::Wanted {
            host: &self.host,
            port: &self.port,
            netns: &self.netns,
            ifname: &self.ifname,
            proto: self.proto,
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct ProbeArgs {
    /// Ping this host (repeatable); each down probe is explained.
    #[arg(long = "ping", value_name = "HOST")]
    pub ping: Vec<String>,
    /// Probe a new connection per interval: tcp:HOST:PORT or udp:HOST:PORT (repeatable).
    #[arg(long = "probe", value_name = "KIND:HOST:PORT")]
    pub probe: Vec<String>,
    /// Time between probes.
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    pub interval: Duration,
    /// A probe with no answer after this long is lost.
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    pub timeout: Duration,
    /// Keep one ICMP id (classic ping; reuses one conntrack entry).
    #[arg(long)]
    pub same_id: bool,
    /// Send probes from this named network namespace.
    #[arg(long, value_name = "NAME")]
    pub from_netns: Option<String>,
    /// Stop after this many probes per target.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub count: Option<u64>,
}

impl ProbeArgs {
    pub fn targets(&self) -> Result<Vec<crate::probe::TargetSpec>> {
        let mut v = Vec::new();
        for p in &self.ping {
            v.push(crate::probe::target::parse_ping(p)?);
        }
        for p in &self.probe {
            v.push(crate::probe::target::parse_probe(p)?);
        }
        if let Some(ns) = &self.from_netns {
            crate::conntrack::netns::resolve_netns_arg(ns)?;
        }
        Ok(v)
    }
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Color {
    Auto,
    Always,
    Never,
}

impl Color {
    pub fn resolve(self, tty: bool) -> bool {
        match self {
            Color::Auto => tty && std::env::var_os("NO_COLOR").is_none(),
            Color::Always => true,
            Color::Never => false,
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct LiveArgs {
    #[command(flatten)]
    pub trace: TraceArgs,
    #[command(flatten)]
    pub probe: ProbeArgs,
    /// Colours in human output.
    #[arg(long, value_enum, default_value = "auto")]
    pub color: Color,
    /// JSON lines: one object per drop, then one summary object.
    #[arg(long)]
    pub json: bool,
    /// No per-drop lines (human output): probe verdicts, table snapshots,
    /// warnings and the summary only. Implied by --metrics without --json.
    #[arg(long, conflicts_with = "json")]
    pub quiet: bool,
    /// Stop after this long (e.g. 10s, 2m).
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Count drops in the kernel instead of sending a record per drop: exact
    /// totals per cause and namespace every --report-every, top flows at the
    /// end; the cheapest mode under a flood. No per-drop lines, no probes.
    #[arg(long, conflicts_with_all = ["ping", "probe"])]
    pub count_only: bool,
    /// How often --count-only prints what was counted.
    #[arg(long, value_parser = parse_duration, default_value = "1s", requires = "count_only")]
    pub report_every: Duration,
    /// --count-only keeps per-flow detail for 1 in N drops on average
    /// (random gaps), so a flood costs no per-flow work per packet: top
    /// flows are estimates (sampled counts times N) and say so. Totals per
    /// cause and namespace count every drop whatever N is. 1 = every drop
    /// (exact per-flow counts, about twice the kernel time per drop).
    #[arg(long, value_name = "N", default_value_t = tracer_common::DEFAULT_FLOW_SAMPLE,
          value_parser = clap::value_parser!(u32).range(1..=tracer_common::MAX_FLOW_SAMPLE as i64),
          requires = "count_only")]
    pub flow_sample: u32,
    /// Serve Prometheus metrics on http://ADDR:PORT/metrics (a bare PORT
    /// listens on 127.0.0.1 only).
    #[arg(long, value_name = "ADDR:PORT", conflicts_with = "count_only")]
    pub metrics: Option<String>,
}

#[derive(Args, Debug, Clone)]
pub struct TopArgs {
    #[command(flatten)]
    pub trace: TraceArgs,
    #[command(flatten)]
    pub probe: ProbeArgs,
    /// Stop after this long (e.g. 10s, 2m); else at q, Ctrl-C or SIGTERM.
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
}

#[derive(Args, Debug, Clone)]
pub struct CaptureArgs {
    #[command(flatten)]
    pub trace: TraceArgs,
    #[command(flatten)]
    pub probe: ProbeArgs,
    /// The capture file to write (created mode 0600).
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    pub output: PathBuf,
    /// Stop after this long (e.g. 30s); else at Ctrl-C or SIGTERM.
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Replace FILE if it exists.
    #[arg(long)]
    pub force: bool,
    /// Also keep the first 128 bytes of each dropped packet's network
    /// header (for `ctdrop export --pcap`); costs ring and file space.
    #[arg(long)]
    pub headers: bool,
    /// Also print every drop and probe as JSON lines on stdout, as `live --json`.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportFormat {
    Table,
    Markdown,
    Json,
    Csv,
    Prometheus,
    /// One self-contained page with the timeline plot (inline SVG, no fetches).
    Html,
}

#[derive(Args, Debug, Clone)]
pub struct ReportArgs {
    /// The capture file to summarize.
    #[arg(value_name = "FILE", required_unless_present_all = ["before", "after"], conflicts_with_all = ["before", "after"])]
    pub file: Option<PathBuf>,
    /// Capture taken before a change; compared with --after.
    #[arg(long, value_name = "FILE", requires = "after")]
    pub before: Option<PathBuf>,
    /// Capture taken after the change.
    #[arg(long, value_name = "FILE", requires = "before")]
    pub after: Option<PathBuf>,
    /// table and markdown are for people (markdown pastes into a ticket);
    /// csv is one row per drop; prometheus is the text exposition.
    #[arg(long, value_enum, default_value = "table")]
    pub format: ReportFormat,
    /// Flows listed in the top-flows table.
    #[arg(long, default_value_t = 10)]
    pub top: usize,
    /// Write the report to this file instead of stdout (e.g. report.html).
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    pub output: Option<PathBuf>,
}

#[derive(Args, Debug, Clone)]
pub struct ExportArgs {
    /// The capture file (taken with --headers).
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
    /// Write the dropped packets' headers here as pcap-ng.
    #[arg(long, value_name = "OUT.pcapng")]
    pub pcap: PathBuf,
    /// Replace OUT if it exists.
    #[arg(long)]
    pub force: bool,
}

impl LiveArgs {
    /// `live` arguments from a list, as a user would type them (the demo
    /// runs a live session this way, with every default in place).
    pub fn from_args(args: &[&str]) -> Result<LiveArgs> {
        #[derive(Parser)]
        struct Wrap {
            #[command(flatten)]
            live: LiveArgs,
        }
        let argv = std::iter::once("ctdrop").chain(args.iter().copied());
        Ok(Wrap::try_parse_from(argv)
            .map_err(|e| anyhow!("bad live arguments: {e}"))?
            .live)
    }
}

#[derive(Args, Debug, Clone)]
pub struct WatchArgs {
    #[command(flatten)]
    pub trace: TraceArgs,
    #[command(flatten)]
    pub probe: ProbeArgs,
    /// Where incident captures go (created 0700 if missing).
    #[arg(long, value_name = "DIR", default_value = "/var/lib/ctdrop")]
    pub dir: PathBuf,
    /// Drops kept from before the trigger.
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    pub pre: Duration,
    /// Recording goes on until this long after the incident's last drop.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub post: Duration,
    /// Trigger when a namespace drops this many conntrack_table_full or
    /// conntrack_insert_failed packets within a second (default: on the first one).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub trigger_rate: Option<u64>,
    /// Also trigger when a namespace's table reaches PCT % of
    /// nf_conntrack_max, before any drop (checked once a second).
    #[arg(long, value_name = "PCT", value_parser = clap::value_parser!(u8).range(1..=100))]
    pub trigger_fill: Option<u8>,
    /// Keep at most this many captures in DIR (oldest deleted first).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_files: u64,
    /// Keep at most this many bytes of captures in DIR (oldest deleted first).
    #[arg(long, value_parser = parse_size, default_value = "1G")]
    pub max_bytes: u64,
    /// Drop records held in memory at most (pre-trigger window and the
    /// incident being recorded); past it, drops are counted, not kept, and
    /// each capture's trailer says how many of its drops were not kept.
    #[arg(long, default_value_t = DEFAULT_BUFFER_RECORDS)]
    pub buffer_records: usize,
    /// Serve Prometheus metrics on http://ADDR:PORT/metrics (a bare PORT
    /// listens on 127.0.0.1 only).
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics: Option<String>,
}

#[derive(Args, Debug, Clone)]
pub struct CheckArgs {
    /// Kernel BTF to read struct layouts from.
    #[arg(long, default_value = DEFAULT_BTF)]
    pub btf: PathBuf,
    #[arg(long)]
    pub json: bool,
    /// Tier to try, as for `live`.
    #[arg(long, value_enum, default_value = "auto")]
    pub mode: crate::kernel::tier::Mode,
    /// Who holds the conntrack table (a snapshot per namespace), with advice.
    #[arg(long)]
    pub occupancy: bool,
    /// With --occupancy: only this namespace (name from `ip netns list`, or inode).
    #[arg(long, requires = "occupancy")]
    pub netns: Option<String>,
}

#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    /// Lower nf_conntrack_max to this for the demo (refused while another
    /// namespace holds entries). Without it the demo fills its own
    /// namespace's table to the current limit and changes no sysctl.
    #[arg(long)]
    pub max: Option<u64>,
}

pub fn parse_duration(s: &str) -> Result<Duration> {
    let d = humantime::parse_duration(s)
        .map_err(|e| anyhow!("bad duration {s:?}: {e} (try 10s, 500ms, 2m)"))?;
    if d.is_zero() {
        return Err(anyhow!("duration must be above zero"));
    }
    Ok(d)
}

/// Defined beside its inverse, [`proto_name`](crate::events::decode::proto_name),
/// so the snapshot model can read protocol names without depending on the CLI.
pub use crate::events::decode::parse_proto;

/// `4M`, `256k`, `1048576`.
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.eq_ignore_ascii_case(&'k') => (&t[..i], 1u64 << 10),
        Some((i, c)) if c.eq_ignore_ascii_case(&'m') => (&t[..i], 1 << 20),
        Some((i, c)) if c.eq_ignore_ascii_case(&'g') => (&t[..i], 1 << 30),
        _ => (t, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| anyhow!("bad size {s:?} (try 4M, 256k or a byte count)"))?;
    n.checked_mul(mult)
        .ok_or_else(|| anyhow!("size {s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_protos_durations() {
        assert_eq!(parse_size("4M").unwrap(), 4 << 20);
        assert_eq!(parse_size("256k").unwrap(), 256 << 10);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("4X").is_err());
        assert_eq!(parse_proto("UDP").unwrap(), 17);
        assert_eq!(parse_proto("47").unwrap(), 47);
        assert!(parse_proto("0").is_err());
        assert!(parse_proto("bogus").is_err());
        assert_eq!(
            parse_duration("1500ms").unwrap(),
            Duration::from_millis(1500)
        );
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("ten").is_err());
    }
}
