//! Prometheus/OpenMetrics: the metric families, the sink that keeps them
//! current while tracing, and the small `/metrics` endpoint of
//! `live --metrics`. `report --format prometheus` fills the same families
//! from a capture file, so a dashboard reads both alike.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr},
    sync::Arc,
};

use anyhow::{anyhow, Context, Result};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::net::TcpListener;

use super::{ProbeShown, Progress, Shown, Sink};
use crate::{
    cause::Cause, conntrack::stats::CtCounters, events::decode::proto_name, probe::Status,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DropLabels {
    cause: String,
    netns: String,
    proto: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HostLabels {
    host: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LostLabels {
    host: String,
    /// A cause name, or `unexplained` when no drop on this host matched.
    cause: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct NsLabels {
    netns: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatLabels {
    netns: String,
    /// Column of /proc/net/stat/nf_conntrack (drop, insert_failed, ...).
    counter: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct TriggerLabels {
    /// first_drop, drop_rate, fill or signal.
    trigger: String,
    netns: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ReasonLabels {
    reason: String,
}

/// `ctdrop watch`'s own families (flight recorder state).
#[derive(Default)]
pub struct WatchMetrics {
    pub(crate) triggers: Family<TriggerLabels, Counter>,
    /// 1 while a namespace's incident is being recorded.
    pub(crate) recording: Family<NsLabels, Gauge>,
    pub(crate) captures_written: Counter,
    pub(crate) capture_bytes: Counter,
    pub(crate) captures_deleted: Counter,
    pub(crate) captures_not_written: Family<ReasonLabels, Counter>,
    pub(crate) disk_full: Gauge,
    pub(crate) buffered_records: Gauge,
    pub(crate) buffer_not_kept: Counter,
    pub(crate) last_capture_time: Gauge,
}

pub struct Metrics {
    registry: Registry,
    pub watch: WatchMetrics,
    ct_fill: Family<NsLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    drops: Family<DropLabels, Counter>,
    events_lost: Counter,
    probes_sent: Family<HostLabels, Counter>,
    probes_lost: Family<LostLabels, Counter>,
    ct_entries: Family<NsLabels, Gauge>,
    ct_max: Family<NsLabels, Gauge>,
    ct_stat: Family<StatLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// A namespace as a label: its name when it has one, else its inode.
pub fn netns_label(netns: Option<u32>, name: Option<&str>) -> String {
    crate::conntrack::netns::label(netns, name)
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut m = Metrics {
            registry: Registry::default(),
            drops: Family::default(),
            events_lost: Counter::default(),
            probes_sent: Family::default(),
            probes_lost: Family::default(),
            ct_entries: Family::default(),
            ct_max: Family::default(),
            ct_stat: Family::default(),
            watch: WatchMetrics::default(),
            ct_fill: Family::default(),
        };
        m.registry.register(
            "ctdrop_drops",
            "Dropped packets traced, by cause, network namespace and L4 protocol",
            m.drops.clone(),
        );
        m.registry.register(
            "ctdrop_events_lost",
            "Drop records the kernel could not queue (ring buffer full)",
            m.events_lost.clone(),
        );
        m.registry.register(
            "ctdrop_probes_sent",
            "Probes sent by ctdrop, by target",
            m.probes_sent.clone(),
        );
        m.registry.register(
            "ctdrop_probes_lost",
            "Probes lost, by target and by the cause of the drop that ate them",
            m.probes_lost.clone(),
        );
        m.registry.register(
            "ctdrop_conntrack_entries",
            "Conntrack table entries in the namespace",
            m.ct_entries.clone(),
        );
        m.registry.register(
            "ctdrop_conntrack_max",
            "nf_conntrack_max (a global limit), per namespace",
            m.ct_max.clone(),
        );
        m.registry.register(
            "ctdrop_conntrack_stat",
            "Kernel conntrack statistics of the namespace (/proc/net/stat/nf_conntrack)",
            m.ct_stat.clone(),
        );
        m.registry.register(
            "ctdrop_conntrack_fill_ratio",
            "Conntrack table entries of the namespace over nf_conntrack_max (0 to 1)",
            m.ct_fill.clone(),
        );
        m
    }

    /// Registers `ctdrop watch`'s families (only a recorder has them).
    pub fn with_watch() -> Metrics {
        let mut m = Metrics::new();
        let w = &m.watch;
        let r = &mut m.registry;
        r.register(
            "ctdrop_watch_triggers",
            "Incidents that started a recording, by trigger and namespace",
            w.triggers.clone(),
        );
        r.register(
            "ctdrop_watch_recording",
            "1 while an incident in the namespace is being recorded (trigger state)",
            w.recording.clone(),
        );
        r.register(
            "ctdrop_watch_captures_written",
            "Capture files written",
            w.captures_written.clone(),
        );
        r.register(
            "ctdrop_watch_capture_bytes",
            "Bytes of capture files written",
            w.capture_bytes.clone(),
        );
        r.register(
            "ctdrop_watch_captures_deleted",
            "Old capture files deleted for --max-files/--max-bytes",
            w.captures_deleted.clone(),
        );
        r.register(
            "ctdrop_watch_captures_not_written",
            "Captures not written (disk nearly full, write error), by reason",
            w.captures_not_written.clone(),
        );
        r.register(
            "ctdrop_watch_disk_full",
            "1 while the capture directory is too full to write to",
            w.disk_full.clone(),
        );
        r.register(
            "ctdrop_watch_buffered_records",
            "Drop records held in memory for the pre-trigger window",
            w.buffered_records.clone(),
        );
        r.register(
            "ctdrop_watch_buffer_not_kept",
            "Drop records not kept because the in-memory buffer was at its cap",
            w.buffer_not_kept.clone(),
        );
        r.register(
            "ctdrop_watch_last_capture_timestamp_seconds",
            "Unix time of the last capture written",
            w.last_capture_time.clone(),
        );
        // Shown at 0 from the start: a family without samples is absent
        // from the scrape, and alerts and dashboards need the series.
        for reason in ["disk_full", "write_error"] {
            let _ = w.captures_not_written.get_or_create(&ReasonLabels {
                reason: reason.into(),
            });
        }
        m
    }

    pub fn watch_trigger(&self, trigger: &str, netns: &str) {
        self.watch
            .triggers
            .get_or_create(&TriggerLabels {
                trigger: trigger.into(),
                netns: netns.into(),
            })
            .inc();
        self.watch
            .recording
            .get_or_create(&NsLabels {
                netns: netns.into(),
            })
            .set(1);
    }

    pub fn watch_recorded(&self, netns: &str) {
        self.watch
            .recording
            .get_or_create(&NsLabels {
                netns: netns.into(),
            })
            .set(0);
    }

    pub fn watch_not_written(&self, reason: &str) {
        self.watch
            .captures_not_written
            .get_or_create(&ReasonLabels {
                reason: reason.into(),
            })
            .inc();
    }

    /// The counter of one (cause, namespace, protocol); callers keep it to
    /// skip the label lookup on every drop.
    fn drop_counter(&self, cause: Cause, netns: String, proto: Option<u8>) -> Counter {
        let proto = proto.map(proto_name).unwrap_or_else(|| "none".into());
        self.drops.get_or_create_owned(&DropLabels {
            cause: cause.as_str().into(),
            netns,
            proto,
        })
    }

    pub fn add_drops(&self, cause: Cause, netns: String, proto: Option<u8>, n: u64) {
        self.drop_counter(cause, netns, proto).inc_by(n);
    }

    /// Counters only go up: set to a total by adding the difference.
    fn raise(c: &Counter, total: u64) {
        let now = c.get();
        if total > now {
            c.inc_by(total - now);
        }
    }

    pub fn set_events_lost(&self, total: u64) {
        Self::raise(&self.events_lost, total);
    }

    pub fn probe_sent(&self, host: &str, n: u64) {
        self.probes_sent
            .get_or_create(&HostLabels { host: host.into() })
            .inc_by(n);
    }

    pub fn probe_lost(&self, host: &str, cause: Option<&str>, n: u64) {
        let cause = cause.unwrap_or("unexplained").to_string();
        self.probes_lost
            .get_or_create(&LostLabels {
                host: host.into(),
                cause,
            })
            .inc_by(n);
    }

    pub fn set_conntrack(&self, netns: &str, counters: &CtCounters, max: Option<u64>) {
        let ns = NsLabels {
            netns: netns.into(),
        };
        self.ct_entries
            .get_or_create(&ns)
            .set(counters.entries() as i64);
        if let Some(m) = max {
            self.ct_max.get_or_create(&ns).set(m as i64);
            if m > 0 {
                self.ct_fill
                    .get_or_create(&ns)
                    .set(counters.entries() as f64 / m as f64);
            }
        }
        for (k, v) in counters.columns.iter().filter(|(k, _)| *k != "entries") {
            Self::raise(
                &self.ct_stat.get_or_create(&StatLabels {
                    netns: netns.into(),
                    counter: k.clone(),
                }),
                *v,
            );
        }
    }

    /// The OpenMetrics text exposition (ends with `# EOF`).
    pub fn encode(&self) -> String {
        let mut s = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut s, &self.registry);
        s
    }

    /// The classic Prometheus text format (0.0.4), which node_exporter's
    /// textfile collector and `promtool check metrics` read.
    pub fn encode_classic(&self) -> String {
        to_classic(&self.encode())
    }
}

/// OpenMetrics to the classic text format. For what ctdrop exposes they
/// differ only in that OpenMetrics names a counter family without its
/// `_total` suffix in `# HELP`/`# TYPE` (the samples carry it in both),
/// and ends with `# EOF`.
pub fn to_classic(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len() + 64);
    for line in openmetrics.lines() {
        if line == "# EOF" {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| Some((p, line.strip_prefix(p)?)));
        match meta.and_then(|(p, rest)| Some((p, rest.split_once(' ')?))) {
            Some((p, (name, tail))) if counters.contains(name) => {
                out.push_str(&format!("{p}{name}_total {tail}"));
            }
            _ => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// Keeps [`Metrics`] current from the session's events.
pub struct MetricsSink {
    m: Arc<Metrics>,
    counters: HashMap<(Cause, Option<u32>, Option<u8>), Counter>,
}

impl MetricsSink {
    pub fn new(m: Arc<Metrics>) -> Self {
        MetricsSink {
            m,
            counters: HashMap::new(),
        }
    }
}

impl Sink for MetricsSink {
    fn drop_event(&mut self, s: &Shown) -> std::io::Result<()> {
        let proto = s.ev.flow.as_ref().map(|f| f.proto);
        let key = (s.cause, s.ev.netns, proto);
        let m = &self.m;
        self.counters
            .entry(key)
            .or_insert_with(|| {
                m.drop_counter(s.cause, netns_label(s.ev.netns, s.netns_name), proto)
            })
            .inc();
        Ok(())
    }

    fn probe(&mut self, p: &ProbeShown) -> std::io::Result<()> {
        match &p.outcome.status {
            Status::Ok { .. } => self.m.probe_sent(p.label, 1),
            Status::Lost { drop } => {
                self.m.probe_sent(p.label, 1);
                self.m
                    .probe_lost(p.label, drop.as_ref().map(|d| d.cause.as_str()), 1);
            }
            // Already counted when it was declared lost.
            Status::Late { .. } => {}
        }
        Ok(())
    }

    fn summary(&mut self, _s: &crate::summary::Summary) -> std::io::Result<()> {
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }

    fn wants_counters(&self) -> bool {
        true
    }

    fn tick(&mut self, p: &Progress) -> std::io::Result<()> {
        self.m.set_events_lost(p.stats.lost);
        let max = crate::conntrack::stats::CtLimits::read().map(|l| l.max);
        for (ns, (name, c)) in p.counters {
            self.m
                .set_conntrack(&netns_label(Some(*ns), name.as_deref()), c, max);
        }
        Ok(())
    }
}

/// `ADDR:PORT`, or a bare `PORT` / `:PORT` on loopback: metrics name hosts
/// and flows, so exposing them beyond this host is a choice to spell out.
pub fn parse_listen(s: &str) -> Result<SocketAddr> {
    let port_only = s.strip_prefix(':').unwrap_or(s);
    if let Ok(port) = port_only.parse::<u16>() {
        return Ok(SocketAddr::from((Ipv4Addr::LOCALHOST, port)));
    }
    s.parse::<SocketAddr>().map_err(|_| {
        anyhow!(
            "--metrics takes ADDR:PORT or PORT (e.g. 127.0.0.1:9477, [::1]:9477, 9477), got {s:?}"
        )
    })
}

pub async fn bind(s: &str) -> Result<TcpListener> {
    let addr = parse_listen(s)?;
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} for --metrics"))
}

/// Answers `GET /metrics` until the runtime ends (hyper, with limits: see
/// output/http.rs).
pub async fn serve(listener: TcpListener, m: Arc<Metrics>) {
    super::http::serve(listener, m).await
}

impl super::http::Exposition for Metrics {
    fn encode(&self) -> String {
        Metrics::encode(self)
    }

    fn encode_classic(&self) -> String {
        Metrics::encode_classic(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpStream,
    };

    #[test]
    fn listen_addresses_default_to_loopback() {
        assert_eq!(
            parse_listen("9477").unwrap(),
            "127.0.0.1:9477".parse().unwrap()
        );
        assert_eq!(
            parse_listen(":9477").unwrap(),
            "127.0.0.1:9477".parse().unwrap()
        );
        assert_eq!(
            parse_listen("0.0.0.0:80").unwrap(),
            "0.0.0.0:80".parse().unwrap()
        );
        assert_eq!(parse_listen("[::1]:9").unwrap(), "[::1]:9".parse().unwrap());
        assert!(parse_listen("localhost").is_err());
    }

    async fn ask(addr: SocketAddr, req: &str) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn endpoint_negotiates_the_format_and_serves_only_metrics() {
        let m = Arc::new(Metrics::new());
        m.set_events_lost(7);
        let l = bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(serve(l, m));
        let classic = ask(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        // Header names are case-insensitive (hyper writes them in lower case).
        assert!(
            classic.starts_with("HTTP/1.1 200 OK\r\n")
                && classic
                    .to_ascii_lowercase()
                    .contains("\r\ncontent-type: text/plain; version=0.0.4"),
            "{classic}"
        );
        assert!(
            classic.contains("\r\n\r\n# HELP ctdrop_events_lost_total ")
                && classic.contains("ctdrop_events_lost_total 7\n"),
            "{classic}"
        );
        let om = ask(addr, "GET /metrics?x=1 HTTP/1.1\r\nAccept: application/openmetrics-text;version=1.0.0\r\n\r\n").await;
        assert!(
            om.to_ascii_lowercase()
                .contains("content-type: application/openmetrics-text")
                && om.ends_with("# EOF\n"),
            "{om}"
        );
        let lf = ask(addr, "GET /metrics HTTP/1.0\n\n").await;
        assert!(lf.starts_with("HTTP/1.0 200 OK"), "bare LF: {lf}");
        assert!(
            ask(addr, "GET /metrics\n\n")
                .await
                .starts_with("HTTP/1.1 400"),
            "no HTTP version: malformed"
        );
        let huge = format!(
            "GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n",
            "a".repeat(64 << 10)
        );
        assert!(
            ask(addr, &huge).await.starts_with("HTTP/1.1 431"),
            "a 64 KiB header is refused"
        );
        assert!(ask(addr, "GET / HTTP/1.1\r\n\r\n")
            .await
            .starts_with("HTTP/1.1 404"));
        assert!(ask(addr, "POST /metrics HTTP/1.1\r\n\r\n")
            .await
            .starts_with("HTTP/1.1 405"));
    }

    #[test]
    fn exposition_names_counters_and_labels() {
        let m = Metrics::new();
        m.add_drops(Cause::ConntrackTableFull, "recv".into(), Some(17), 3);
        m.set_events_lost(2);
        m.set_events_lost(1); // never goes down
        let mut c = CtCounters::default();
        c.columns.insert("entries".into(), 64);
        c.columns.insert("drop".into(), 3);
        m.set_conntrack("recv", &c, Some(64));
        let text = m.encode();
        assert!(
            text.contains(
                r#"ctdrop_drops_total{cause="conntrack_table_full",netns="recv",proto="udp"} 3"#
            ),
            "{text}"
        );
        assert!(text.contains("ctdrop_events_lost_total 2"), "{text}");
        assert!(
            text.contains(r#"ctdrop_conntrack_entries{netns="recv"} 64"#),
            "{text}"
        );
        assert!(
            text.contains(r#"ctdrop_conntrack_stat_total{netns="recv",counter="drop"} 3"#),
            "{text}"
        );
        assert!(text.trim_end().ends_with("# EOF"));
        let classic = m.encode_classic();
        assert!(
            classic.contains("# TYPE ctdrop_drops_total counter\n"),
            "{classic}"
        );
        assert!(
            classic.contains("# HELP ctdrop_events_lost_total Drop records"),
            "{classic}"
        );
        assert!(
            classic.contains("# TYPE ctdrop_conntrack_entries gauge\n"),
            "{classic}"
        );
        assert!(!classic.contains("# EOF"));
        assert_eq!(
            classic.lines().filter(|l| !l.starts_with('#')).count(),
            text.lines().filter(|l| !l.starts_with('#')).count()
        );
    }
}
