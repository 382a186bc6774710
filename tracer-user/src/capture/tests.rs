//! Writer and reader together: round trips, cuts at every offset, damage,
//! version refusal, and a fixed-seed fuzz of the reader.

use std::{os::unix::fs::PermissionsExt, sync::OnceLock};

use proptest::prelude::*;

use super::{
    block::{FORMAT_VERSION, PREAMBLE_LEN},
    meta::{CaptureFilter, CounterDelta, Header, NsCounters, Trailer},
    record::{tests::sample, Checkpoint},
    CaptureReader, CaptureWriter, End, Item,
};
use crate::{
    cause::Cause,
    events::DropEvent,
    model::{DropLine, ProbeKind, ProbeStatus, ProbeVerdict},
};

pub fn header() -> Header {
    Header {
        format_version: FORMAT_VERSION,
        ctdrop_version: "0.0.0-test".into(),
        host: "testhost".into(),
        kernel_release: "6.18.0".into(),
        started_wall_ns: 1_700_000_000_000_000_000,
        started_mono_ns: 1_000_000_000_000,
        boot_offset_ns: 1_699_999_000_000_000_000,
        mechanisms: [("drops".to_string(), "tp_btf/kfree_skb".to_string())].into(),
        drop_reasons: [
            (12, "NETFILTER_DROP".to_string()),
            (2, "NOT_SPECIFIED".to_string()),
        ]
        .into(),
        conntrack_max: Some(64),
        conntrack_buckets: Some(262144),
        counters_at_start: vec![NsCounters {
            netns: 7,
            netns_name: Some("recv".into()),
            counters: [("drop".to_string(), 5u64), ("entries".to_string(), 64)].into(),
        }],
        filter: CaptureFilter::default(),
        headers: true,
        duration_s: Some(3.0),
        probes: vec!["198.18.0.2".into()],
        command: vec!["ctdrop".into(), "capture".into()],
        max_flows: None,
    }
}

pub fn trailer(drops: u64, kernel_drop: u64) -> Trailer {
    Trailer {
        ended_wall_ns: 1_700_000_003_000_000_000,
        ended_mono_ns: 1_003_000_000_000,
        duration_s: 3.0,
        events_sent: drops,
        events_lost: 0,
        decode_errors: 0,
        drops_written: drops,
        probes_written: 1,
        kernel_counters: vec![CounterDelta {
            netns: 7,
            netns_name: Some("recv".into()),
            delta: [
                ("drop".to_string(), kernel_drop),
                ("entries".to_string(), 64),
            ]
            .into(),
        }],
        counters_at_end: vec![NsCounters {
            netns: 7,
            netns_name: Some("recv".into()),
            counters: [
                ("drop".to_string(), 5 + kernel_drop),
                ("entries".to_string(), 64),
            ]
            .into(),
        }],
        watch: None,
    }
}

/// A lost probe explained by a table-full drop, as the session makes it.
pub fn lost_probe() -> ProbeVerdict {
    let (ev, cause) = drop_no(0);
    let shown = crate::output::Shown {
        ev: &ev,
        cause,
        wall_ns: ev.ts_ns + header().boot_offset_ns,
        reason: "NETFILTER_DROP",
        netns_name: Some("recv"),
        ifname: Some("veth1"),
        location: "nf_hook_slow+0x9a",
    };
    ProbeVerdict {
        kind: Default::default(),
        ts_ns: header().started_wall_ns,
        host: "198.18.0.2".into(),
        probe: ProbeKind::Icmp,
        seq: 1,
        icmp_id: Some(77),
        icmp_seq: Some(1),
        local_port: None,
        status: ProbeStatus::Lost,
        rtt_ms: None,
        cause: Some(cause),
        verdict: Some("conntrack_table_full in ns recv on veth1, table 64/64".into()),
        drop: Some(DropLine::from_shown(&shown).into_owned()),
    }
}

/// The i-th test drop: a second apart from the start, alternating causes.
pub fn drop_no(i: u64) -> (DropEvent, Cause) {
    let mut ev = sample(i % 3 != 2, i % 5 == 4);
    ev.ts_ns = header().started_mono_ns + i * 300_000_000;
    if let Some(f) = ev.flow.as_mut() {
        f.proto = 17;
        f.ports = Some((40000, 1000 + i as u16));
        ev.icmp = None;
    }
    ev.netns = Some(7);
    (
        ev,
        if i % 4 == 3 {
            Cause::NetfilterRule
        } else {
            Cause::ConntrackTableFull
        },
    )
}

/// A finished capture of `n` drops in blocks of `per_block`, one probe
/// verdict and a checkpoint; returns the file's bytes.
pub fn capture_bytes(n: u64, per_block: u64, finish: bool) -> Vec<u8> {
    capture_with(n, per_block, finish.then(|| trailer(n, n)))
}

/// [`capture_bytes`] with a chosen trailer (None: killed before it).
pub fn capture_with(n: u64, per_block: u64, end: Option<Trailer>) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.ctdrop");
    let mut w = CaptureWriter::create(&path, false).unwrap();
    w.write_header(&header()).unwrap();
    for i in 0..n {
        let (ev, cause) = drop_no(i);
        w.drop_event(&ev, cause, "nf_hook_slow+0x9a", Some("recv"), Some("veth1"))
            .unwrap();
        if i == 0 {
            w.probe(&lost_probe()).unwrap();
            w.checkpoint(&Checkpoint {
                mono_ns: ev.ts_ns,
                events_sent: 1,
                events_lost: 0,
                drops_seen: 1,
            })
            .unwrap();
        }
        if (i + 1) % per_block == 0 {
            w.flush().unwrap();
        }
    }
    if let Some(t) = end {
        w.finish(&t).unwrap();
    } else {
        w.flush().unwrap();
    }
    std::fs::read(&path).unwrap()
}

struct Read_ {
    drops: Vec<(DropEvent, Cause, String, Option<String>)>,
    probes: Vec<ProbeVerdict>,
    checkpoints: usize,
    end: End,
}

fn read_all(bytes: &[u8]) -> anyhow::Result<Read_> {
    let mut r = CaptureReader::new(bytes)?;
    let mut out = Read_ {
        drops: vec![],
        probes: vec![],
        checkpoints: 0,
        end: End::NoTrailer { at: 0 },
    };
    while let Some(it) = r.next_item() {
        match it {
            Item::Drop(d) => {
                let loc = r.string(d.location).to_string();
                let ifname = d.ifname.map(|i| r.string(i).to_string());
                out.drops.push((d.ev, d.cause, loc, ifname));
            }
            Item::Probe(p) => out.probes.push(p),
            Item::Checkpoint(_) => out.checkpoints += 1,
        }
    }
    out.end = r.end().unwrap().clone();
    Ok(out)
}

#[test]
fn everything_written_reads_back_in_order() {
    let bytes = capture_bytes(25, 7, true);
    let r = read_all(&bytes).unwrap();
    assert_eq!(r.drops.len(), 25);
    for (i, (ev, cause, loc, ifname)) in r.drops.iter().enumerate() {
        let (want, want_cause) = drop_no(i as u64);
        assert_eq!(ev, &want, "drop {i}");
        assert_eq!(*cause, want_cause);
        assert_eq!(loc, "nf_hook_slow+0x9a");
        assert_eq!(ifname.as_deref(), Some("veth1"));
    }
    assert_eq!(
        r.probes,
        vec![lost_probe()],
        "the typed verdict reads back as written"
    );
    assert_eq!(r.checkpoints, 1);
    assert_eq!(r.end, End::Complete(trailer(25, 25)));
    assert_eq!(CaptureReader::new(&bytes[..]).unwrap().header, header());
}

#[test]
fn a_capture_without_trailer_reads_up_to_its_last_flush() {
    let bytes = capture_bytes(10, 4, false);
    let r = read_all(&bytes).unwrap();
    assert_eq!(r.drops.len(), 10);
    assert_eq!(
        r.end,
        End::NoTrailer {
            at: bytes.len() as u64
        }
    );
    assert!(r.end.describe().unwrap().contains("trailer missing"));
}

/// Every cut: the header part is a clean error, any later cut reads the
/// whole blocks before it and names where it stopped; nothing panics.
#[test]
fn cut_at_every_offset() {
    let bytes = capture_bytes(12, 3, true);
    let full = read_all(&bytes).unwrap();
    let header_end = {
        let r = CaptureReader::new(&bytes[..]).unwrap();
        PREAMBLE_LEN + 12 + serde_json::to_vec(&r.header).unwrap().len()
    };
    let mut last_drops = 0;
    for cut in 0..bytes.len() {
        match read_all(&bytes[..cut]) {
            Err(e) => {
                assert!(
                    cut < header_end,
                    "cut at {cut} (after the header) failed: {e:#}"
                );
                let msg = format!("{e:#}");
                assert!(
                    msg.contains("cut short")
                        || msg.contains("unreadable")
                        || msg.contains("not a ctdrop capture"),
                    "cut at {cut}: {msg}"
                );
            }
            Ok(r) => {
                assert!(
                    cut >= header_end,
                    "cut at {cut} inside the header was accepted"
                );
                assert!(r.drops.len() >= last_drops, "fewer drops after a later cut");
                last_drops = r.drops.len();
                assert_eq!(
                    r.drops[..],
                    full.drops[..r.drops.len()],
                    "cut at {cut}: drops differ from the original's first ones"
                );
                match &r.end {
                    End::NoTrailer { at } => assert_eq!(*at, cut as u64),
                    End::Stopped { at, why } => {
                        assert!(*at < cut as u64, "cut at {cut}: says it stopped at {at}");
                        assert!(why.contains("cut short"), "{why}");
                    }
                    End::Complete(_) => panic!("cut at {cut} claims to be complete"),
                }
            }
        }
    }
    assert_eq!(last_drops, 12);
}

#[test]
fn a_newer_format_is_refused_by_name() {
    let mut bytes = capture_bytes(2, 1, true);
    bytes[8..12].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
    let e = format!("{:#}", CaptureReader::new(&bytes[..]).err().unwrap());
    assert!(
        e.contains(&format!("format version {}", FORMAT_VERSION + 1)),
        "{e}"
    );
    assert!(
        e.contains("ctdrop 0.0.0-test") && e.contains("newer ctdrop"),
        "{e}"
    );
}

#[test]
fn other_files_are_not_captures() {
    for bytes in [
        &b""[..],
        b"hello world, not a capture",
        b"\x89CTDROP\n\x00\x00\x00\x00",
    ] {
        assert!(CaptureReader::new(bytes).is_err());
    }
}

#[test]
fn damage_in_a_middle_block_stops_there() {
    let bytes = capture_bytes(9, 3, true);
    let full = read_all(&bytes).unwrap();
    // Flip a byte near the end: the last record block or the trailer.
    let mut bad = bytes.clone();
    let i = bad.len() - 40;
    bad[i] ^= 0xff;
    let r = read_all(&bad).unwrap();
    assert!(
        matches!(&r.end, End::Stopped { why, .. } if why.contains("checksum")),
        "{:?}",
        r.end
    );
    assert_eq!(r.drops[..], full.drops[..r.drops.len()]);
}

#[test]
fn files_are_private_and_never_overwritten_silently() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.ctdrop");
    drop(CaptureWriter::create(&p, false).unwrap());
    assert_eq!(
        std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
        0o600
    );
    std::fs::write(&p, b"precious").unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = CaptureWriter::create(&p, false).err().unwrap().to_string();
    assert!(e.contains("already exists") && e.contains("--force"), "{e}");
    assert_eq!(std::fs::read(&p).unwrap(), b"precious");
    drop(CaptureWriter::create(&p, true).unwrap());
    assert_eq!(std::fs::metadata(&p).unwrap().len(), 0);
    assert_eq!(
        std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(CaptureWriter::create(dir.path(), true)
        .err()
        .unwrap()
        .to_string()
        .contains("directory"));
}

#[test]
fn a_full_disk_stops_the_writer_and_says_what_was_kept() {
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let mut w = CaptureWriter::on(full, std::path::Path::new("/dev/full"));
    let e = w.write_header(&header()).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::StorageFull);
    let (ev, cause) = drop_no(0);
    let again = w.drop_event(&ev, cause, "x", None, None).unwrap_err();
    assert!(
        again.to_string().contains("readable up to its last flush"),
        "{again}"
    );
    assert!(w.finish(&trailer(0, 0)).is_err());
}

fn empty_capture() -> &'static Vec<u8> {
    static B: OnceLock<Vec<u8>> = OnceLock::new();
    B.get_or_init(|| capture_bytes(0, 1, false))
}

fn small_capture() -> &'static (Vec<u8>, Read_) {
    static B: OnceLock<(Vec<u8>, Read_)> = OnceLock::new();
    B.get_or_init(|| {
        let b = capture_bytes(6, 2, true);
        let r = read_all(&b).unwrap();
        (b, r)
    })
}

proptest! {
    // A fixed seed: the same cases on every run and in CI.
    #![proptest_config(ProptestConfig { cases: 1000, rng_seed: proptest::test_runner::RngSeed::Fixed(0xc7d0), ..ProptestConfig::default() })]

    /// Random bytes after a valid header: the reader ends, never panics.
    #[test]
    fn random_tails_never_panic(tail in proptest::collection::vec(any::<u8>(), 0..600)) {
        let mut bytes = empty_capture().clone();
        bytes.extend_from_slice(&tail);
        let r = read_all(&bytes).unwrap();
        prop_assert!(r.drops.len() <= tail.len());
    }

    /// A valid capture with bytes overwritten and cut: never a panic,
    /// never more drops than were written, always a prefix of them.
    #[test]
    fn damaged_captures_never_panic(flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
                                    cut in any::<prop::sample::Index>()) {
        let (bytes, original) = small_capture();
        let mut bad = bytes.clone();
        for (i, v) in flips {
            let at = i.index(bad.len());
            bad[at] = v;
        }
        bad.truncate(cut.index(bad.len() + 1));
        if let Ok(r) = read_all(&bad) {
            prop_assert!(r.drops.len() <= original.drops.len());
            prop_assert!(r.drops[..] == original.drops[..r.drops.len()]);
        }
    }

    /// Random bytes as a whole file.
    #[test]
    fn random_files_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = read_all(&bytes);
    }
}

/// Written by ctdrop at format version 1 (commit 8094ae3) from a real
/// table-full incident: 12 drops, the kernel's `drop` +12.
const V1_FILE: &[u8] = include_bytes!("testdata/v1-table-full.ctdrop");

#[test]
fn format_1_files_from_before_snapshots_still_read_whole() {
    assert_eq!(
        u32::from_le_bytes(V1_FILE[8..12].try_into().unwrap()),
        1,
        "the test file must stay a version 1 file"
    );
    let reader = CaptureReader::new(V1_FILE).unwrap();
    assert_eq!(reader.header.format_version, 1);
    let r = read_all(V1_FILE).unwrap();
    assert_eq!(r.drops.len(), 12);
    assert!(r.drops.iter().all(|d| d.1 == Cause::ConntrackTableFull));
    let End::Complete(t) = &r.end else {
        panic!("{:?}", r.end)
    };
    assert_eq!(t.kernel_counters.len(), 1);
    assert_eq!(t.kernel_counters[0].delta["drop"], 12);
    assert!(t.watch.is_none());
    let rep = crate::report::Report::build(
        std::path::Path::new("v1"),
        CaptureReader::new(V1_FILE).unwrap(),
        |_| {},
    );
    assert!(rep.occupancy.is_empty());
    let checks = rep.counter_checks().unwrap();
    assert!(checks[0].agrees() && checks[0].table_full == 12);
}

/// Written by ctdrop at format version 2 (commit 5dc84d0) in a real scene
/// (`ctdrop capture --ping` against a receiver whose 64-entry table was
/// full): 15 table-full drops (the kernel's `drop` +15), 6 probes all lost,
/// each explained by one of the drops, and one table snapshot. Its lost
/// `report --format json` of that version on it is
/// `v2-table-full-ping.report.json`.
const V2_FILE: &[u8] = include_bytes!("testdata/v2-table-full-ping.ctdrop");
const V2_PATH: &str = "tracer-user/src/capture/testdata/v2-table-full-ping.ctdrop";
const V2_REPORT: &str = include_str!("testdata/v2-table-full-ping.report.json");

#[test]
fn format_2_files_read_whole_with_their_probe_verdicts_typed_and_exact() {
    assert_eq!(
        u32::from_le_bytes(V2_FILE[8..12].try_into().unwrap()),
        2,
        "the test file must stay a version 2 file"
    );
    let reader = CaptureReader::new(V2_FILE).unwrap();
    assert_eq!((reader.header.format_version, reader.format), (2, 2));
    let r = read_all(V2_FILE).unwrap();
    let End::Complete(t) = &r.end else {
        panic!("{:?}", r.end)
    };
    assert_eq!((t.drops_written, t.probes_written), (15, 6));
    assert_eq!(t.kernel_counters[0].delta["drop"], 15);

    // Every drop record, field by field where the scene fixes it (format 2
    // stored a `detail` byte per drop: skipped, and nothing after it shifts).
    assert_eq!(r.drops.len(), 15);
    let rx = t.kernel_counters[0].netns;
    for (ev, cause, loc, ifname) in &r.drops {
        assert_eq!(*cause, Cause::ConntrackTableFull);
        assert_eq!(ev.netns, Some(rx));
        assert_eq!(ifname.as_deref(), Some("ctdt-rx"));
        assert!(loc.starts_with("nf_hook_slow"), "{loc}");
        let f = ev.flow.as_ref().expect("a flow");
        assert_eq!(f.dst, "198.18.2.2".parse::<std::net::IpAddr>().unwrap());
        let fill = ev.ct_fill.expect("a table fill");
        assert_eq!((fill.count, fill.max, fill.sampled), (64, 64, true));
    }
    // The flood's 8 new flows, then 7 echo requests (the 7th was sent
    // before the capture stopped, too late to time out).
    let ports: Vec<Option<(u16, u16)>> = r.drops[..8]
        .iter()
        .map(|d| d.0.flow.as_ref().unwrap().ports.map(|p| (17, p.1)))
        .collect();
    let want: Vec<_> = (20000..20008).map(|p| Some((17, p))).collect();
    assert_eq!(ports, want, "the flood's drops");
    assert!(r.drops[8..]
        .iter()
        .all(|d| d.0.icmp.is_some_and(|i| i.is_echo_request(1))));

    // The verdicts, typed, equal what ctdrop 5dc84d0 reported from them.
    let want: serde_json::Value = serde_json::from_str(V2_REPORT).unwrap();
    let want = &want["probes"]["198.18.2.2"]["lost_probes"];
    assert_eq!(&serde_json::to_value(&r.probes).unwrap(), want);
    assert_eq!(r.probes.len(), 6);
    for (i, p) in r.probes.iter().enumerate() {
        assert_eq!((p.host.as_str(), p.seq), ("198.18.2.2", i as u64 + 1));
        assert_eq!(
            (p.probe, p.status, p.cause),
            (
                ProbeKind::Icmp,
                ProbeStatus::Lost,
                Some(Cause::ConntrackTableFull)
            )
        );
        assert_eq!(
            p.verdict.as_deref(),
            Some("conntrack_table_full in ns ctdc-20803-1 on ctdt-rx, table 64/64")
        );
        // Each verdict's drop is one of the file's drop records: the ping's
        // own echo request, at the same instant.
        let d = p.drop.as_ref().expect("the explaining drop");
        let rec = r
            .drops
            .iter()
            .find(|(ev, ..)| ev.ts_ns == d.mono_ns)
            .unwrap_or_else(|| panic!("probe {} explained by no record", p.seq));
        assert_eq!(
            rec.0.icmp.and_then(|i| i.echo),
            Some((p.icmp_id.unwrap(), p.icmp_seq.unwrap()))
        );
        assert_eq!((d.icmp_id, d.icmp_seq), (p.icmp_id, p.icmp_seq));
        assert_eq!(
            (d.cause, d.netns, d.ct_count),
            (Cause::ConntrackTableFull, Some(rx), Some(64))
        );
    }

    // The table snapshot, and the report built from it all.
    let rep = crate::report::Report::build(
        std::path::Path::new("v2"),
        CaptureReader::new(V2_FILE).unwrap(),
        |_| {},
    );
    assert_eq!(rep.occupancy.len(), 1);
    assert_eq!(
        (
            rep.occupancy[0].netns,
            rep.occupancy[0].entries,
            rep.occupancy[0].max
        ),
        (Some(rx), 64, Some(64))
    );
    let p = &rep.probes["198.18.2.2"];
    assert_eq!(
        (p.sent, p.answered, p.lost, p.lost_unexplained),
        (6, 0, 6, 0)
    );
    assert_eq!(p.lost_by_cause["conntrack_table_full"], 6);
    assert_eq!(p.lost_probes, r.probes);
    let checks = rep.counter_checks().unwrap();
    assert!(checks[0].agrees() && checks[0].table_full == 15);
}

#[test]
fn a_format_2_file_reports_exactly_what_the_version_that_wrote_it_reported() {
    let rep = crate::report::Report::build(
        std::path::Path::new(V2_PATH),
        CaptureReader::new(V2_FILE).unwrap(),
        |_| {},
    );
    let ours = crate::report::json::to_json(&rep, 10);
    let want: serde_json::Value = serde_json::from_str(V2_REPORT).unwrap();
    // Key by key, so a difference names its key.
    let (ours, want) = (ours.as_object().unwrap(), want.as_object().unwrap());
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    for (k, v) in want {
        assert_eq!(&ours[k], v, "report key {k}");
    }
    // And the typed report reads its own JSON back.
    let doc = crate::report::json::doc(&rep, 10);
    let back: crate::model::ReportDoc =
        serde_json::from_value(serde_json::to_value(&doc).unwrap()).unwrap();
    assert_eq!(back, doc);
}

#[test]
fn a_table_snapshot_is_stored_as_its_own_block_and_reported() {
    use crate::conntrack::occupancy::{CtEntry, OccupancyBuilder};
    let mut b = OccupancyBuilder::default();
    for i in 0..40u16 {
        b.add(&CtEntry {
            proto: 17,
            src: "198.18.0.1".parse().unwrap(),
            dst: "198.18.0.2".parse().unwrap(),
            sport: 40000 + i,
            dport: 5353,
            tcp_state: None,
            status: 8, // confirmed, never answered
        });
    }
    let mut o = b.finish(5);
    o.netns = Some(7);
    o.netns_name = Some("recv".into());
    o.max = Some(64);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.ctdrop");
    let mut w = CaptureWriter::create(&path, false).unwrap();
    w.write_header(&header()).unwrap();
    let (ev, cause) = drop_no(0);
    w.drop_event(&ev, cause, "nf_hook_slow", Some("recv"), None)
        .unwrap();
    w.occupancy(&o).unwrap();
    w.finish(&trailer(1, 1)).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(
        u32::from_le_bytes(bytes[8..12].try_into().unwrap()),
        FORMAT_VERSION
    );
    // Records before the snapshot, the snapshot, then the trailer: all read.
    let r = read_all(&bytes).unwrap();
    assert_eq!(r.drops.len(), 1);
    assert!(matches!(r.end, End::Complete(_)));
    let rep = crate::report::Report::build(&path, CaptureReader::new(&bytes[..]).unwrap(), |_| {});
    assert_eq!(rep.occupancy.len(), 1);
    let back = &rep.occupancy[0];
    assert_eq!(
        (back.netns, back.entries, back.unreplied),
        (Some(7), 40, 40)
    );
    let port = &back.top_dst_ports[0];
    assert_eq!(
        (port.proto_num(), port.port, port.entries),
        (17, 5353, 40),
        "proto_num restored from the name"
    );
    assert_eq!(back.by_proto_state, o.by_proto_state);
    let text = crate::report::text::render(&rep, 5, false);
    assert!(
        text.contains("Who held the table") && text.contains("udp 5353"),
        "{text}"
    );
    let json = crate::report::json::to_json(&rep, 5);
    assert_eq!(json["occupancy"][0]["top_dst_ports"][0]["port"], 5353);
}
