//! The prober's verdicts against real drops: every lost probe carries the
//! drop that ate it, no answered probe ever does.

use std::{thread::sleep, time::Duration};

use ctdrop_tests::{send_udp_flows, ConntrackMaxGuard, Ctdrop, CtdropOutput, Topology};
use serde_json::Value;

fn probes(out: &CtdropOutput) -> Vec<&Value> {
    out.records
        .iter()
        .filter(|r| r["kind"] == "probe")
        .collect()
}

fn start_pinger(t: &Topology, extra: &[&str]) -> Ctdrop {
    let target = t.receiver_addr.to_string();
    let mut args = vec![
        "live",
        "--json",
        "--ping",
        &target,
        "--from-netns",
        &t.sender.name,
        "--interval",
        "200ms",
        "--timeout",
        "500ms",
    ];
    args.extend_from_slice(extra);
    Ctdrop::spawn(&args).unwrap()
}

#[test]
fn intermittent_table_full_every_lost_probe_has_exactly_its_drop_and_answered_ones_none() {
    let t = Topology::pair().unwrap();
    t.track_receiver().unwrap();
    let rx = t.receiver.inode().unwrap();
    let _max = ConntrackMaxGuard::set(64).unwrap();
    let c = start_pinger(&t, &[]);
    let mut port = 10000u16;
    for _ in 0..3 {
        sleep(Duration::from_millis(1200));
        send_udp_flows(&t.sender, t.receiver_addr, port, 100).unwrap(); // fill
        port += 100;
        sleep(Duration::from_millis(1500));
        t.receiver.exec(&["conntrack", "-F"]).unwrap(); // drain
    }
    sleep(Duration::from_millis(800));
    let out = c.stop().unwrap();
    let ps = probes(&out);
    let lost: Vec<&&Value> = ps.iter().filter(|p| p["status"] == "lost").collect();
    let ok: Vec<&&Value> = ps.iter().filter(|p| p["status"] == "ok").collect();
    assert!(
        lost.len() >= 3,
        "the full table ate too few probes: {} of {}",
        lost.len(),
        ps.len()
    );
    assert!(
        ok.len() >= 3,
        "too few probes answered between fills: {} of {}",
        ok.len(),
        ps.len()
    );
    let echo_drops: Vec<&Value> = out
        .drops_in(rx)
        .into_iter()
        .filter(|d| d["proto"] == "icmp")
        .collect();
    for p in &lost {
        assert_eq!(p["cause"], "conntrack_table_full", "{p}");
        assert_eq!(p["drop"]["icmp_id"], p["icmp_id"], "{p}");
        assert_eq!(p["drop"]["netns"].as_u64(), Some(rx as u64));
        let n = echo_drops
            .iter()
            .filter(|d| d["icmp_id"] == p["icmp_id"] && d["icmp_seq"] == p["icmp_seq"])
            .count();
        assert_eq!(n, 1, "lost probe {} has {n} drop records", p["seq"]);
    }
    for p in &ok {
        assert!(p["drop"].is_null() && p["cause"].is_null(), "{p}");
        let n = echo_drops
            .iter()
            .filter(|d| d["icmp_id"] == p["icmp_id"])
            .count();
        assert_eq!(n, 0, "answered probe {} has a drop record", p["seq"]);
    }
    let host = &out.summary().unwrap()["probes"][t.receiver_addr.to_string()];
    assert_eq!(host["lost"].as_u64(), Some(lost.len() as u64));
    assert_eq!(host["answered"].as_u64(), Some(ok.len() as u64));
    assert_eq!(
        host["lost_by_cause"]["conntrack_table_full"].as_u64(),
        Some(lost.len() as u64)
    );
    assert_eq!(host["lost_unexplained"], 0);
}

#[test]
fn echo_replies_dropped_by_a_filter_rule_are_explained_on_the_reply_path() {
    let t = Topology::pair().unwrap();
    t.receiver
        .exec(&[
            "iptables",
            "-A",
            "OUTPUT",
            "-p",
            "icmp",
            "--icmp-type",
            "echo-reply",
            "-j",
            "DROP",
        ])
        .unwrap();
    let rx = t.receiver.inode().unwrap();
    let c = start_pinger(&t, &["--count", "5"]);
    sleep(Duration::from_millis(2000));
    let out = c.stop().unwrap();
    let ps = probes(&out);
    assert_eq!(ps.len(), 5, "{}", out.stdout);
    for p in ps {
        assert_eq!(p["status"], "lost", "{p}");
        assert_eq!(p["cause"], "netfilter_rule", "{p}");
        assert_eq!(
            p["drop"]["icmp_type"], 0,
            "the dropped packet is the echo reply: {p}"
        );
        assert_eq!(p["drop"]["netns"].as_u64(), Some(rx as u64), "{p}");
        assert!(
            p["verdict"].as_str().unwrap().contains("reply dropped"),
            "{p}"
        );
    }
}

fn ignoring_target_is_down_with_no_drop_seen(extra: &[&str]) {
    let t = Topology::pair().unwrap();
    t.receiver
        .exec(&["sysctl", "-qw", "net.ipv4.icmp_echo_ignore_all=1"])
        .unwrap();
    let mut args = vec!["--count", "4"];
    args.extend_from_slice(extra);
    let c = start_pinger(&t, &args);
    sleep(Duration::from_millis(1800));
    let out = c.stop().unwrap();
    let ps = probes(&out);
    assert_eq!(ps.len(), 4, "{}", out.stdout);
    let ids: Vec<&Value> = ps.iter().map(|p| &p["icmp_id"]).collect();
    for p in &ps {
        assert_eq!(p["status"], "lost");
        assert!(p["drop"].is_null(), "{p}");
        assert_eq!(p["verdict"], "no drop seen on this host");
    }
    // The kernel consumes an ignored echo request (icmp_echo returns "not
    // dropped"), so not even --all-reasons sees a drop for these probes.
    let seen = out
        .drops()
        .iter()
        .filter(|d| ids.contains(&&d["icmp_id"]))
        .count();
    assert_eq!(seen, 0);
}

#[test]
fn target_ignoring_echo_is_down_with_no_drop_seen_on_this_host() {
    ignoring_target_is_down_with_no_drop_seen(&[]);
}

#[test]
fn target_ignoring_echo_shows_no_drop_even_with_all_reasons() {
    ignoring_target_is_down_with_no_drop_seen(&["--all-reasons"]);
}

/// Answers echo requests in the receiver from userspace, replies to every
/// other request held back 300 ms and the rest sent after 10 ms, so that a
/// later probe's answer overtakes an earlier one's (this kernel has no
/// netem). Runs until `stop` is set.
fn slow_and_fast_echo_responder(
    ns: &ctdrop_tests::Netns,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<()> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::sync::atomic::Ordering;
    ns.exec(&["sysctl", "-qw", "net.ipv4.icmp_echo_ignore_all=1"])
        .unwrap();
    let path = ns.path();
    std::thread::spawn(move || {
        ctlab::enter(&path).unwrap();
        // SAFETY: plain socket(2), checked and owned right after.
        let fd = unsafe {
            libc::socket(
                libc::AF_INET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::IPPROTO_ICMP,
            )
        };
        assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        // SAFETY: `fd` is a fresh socket nobody else owns.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 5_000,
        };
        // SAFETY: SO_RCVTIMEO reads a timeval of the given size.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        let mut due: Vec<(std::time::Instant, [u8; 4], Vec<u8>)> = Vec::new();
        let mut n = 0u64;
        let mut buf = [0u8; 1500];
        while !stop.load(Ordering::Relaxed) {
            let mut from: libc::sockaddr_in = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_in>() as u32;
            // SAFETY: recvfrom writes at most buf.len() bytes and a sockaddr_in.
            let got = unsafe {
                libc::recvfrom(
                    fd,
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                    0,
                    &mut from as *mut _ as *mut libc::sockaddr,
                    &mut len,
                )
            };
            if got > 0 {
                let pkt = &buf[..got as usize];
                let ihl = ((pkt[0] & 0x0f) as usize) * 4;
                if pkt.len() >= ihl + 8 && pkt[ihl] == 8 {
                    let mut reply = pkt[ihl..].to_vec();
                    reply[0] = 0;
                    reply[2] = 0;
                    reply[3] = 0;
                    ctdrop_tests::set_icmp_checksum(&mut reply);
                    let delay = if n.is_multiple_of(2) { 300 } else { 10 };
                    n += 1;
                    due.push((
                        std::time::Instant::now() + Duration::from_millis(delay),
                        pkt[12..16].try_into().unwrap(),
                        reply,
                    ));
                }
            }
            let now = std::time::Instant::now();
            for (_, src, reply) in due.iter().filter(|d| d.0 <= now) {
                let mut to: libc::sockaddr_in = unsafe { std::mem::zeroed() };
                to.sin_family = libc::AF_INET as libc::sa_family_t;
                to.sin_addr.s_addr = u32::from_ne_bytes(*src);
                // SAFETY: sendto reads `reply` and a sockaddr_in of the given size.
                unsafe {
                    libc::sendto(
                        sock.as_raw_fd(),
                        reply.as_ptr() as *const libc::c_void,
                        reply.len(),
                        0,
                        &to as *const _ as *const libc::sockaddr,
                        std::mem::size_of::<libc::sockaddr_in>() as u32,
                    )
                };
            }
            due.retain(|d| d.0 > now);
        }
    })
}

/// Replies answered from userspace, every other one held back 300 ms (so a
/// later probe's answer overtakes an earlier one's), and every third
/// request dropped by a rule: answers come back out of order and well
/// before the earlier probes' losses are known. The lines must still come
/// out one per probe, in the order sent, each stamped with its own send
/// time.
#[test]
fn probe_lines_come_out_in_send_order_when_replies_are_delayed_and_reordered() {
    let t = Topology::pair().unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let responder = slow_and_fast_echo_responder(&t.receiver, stop.clone());
    t.receiver
        .exec(&[
            "iptables",
            "-A",
            "INPUT",
            "-p",
            "icmp",
            "--icmp-type",
            "echo-request",
            "-m",
            "statistic",
            "--mode",
            "nth",
            "--every",
            "3",
            "--packet",
            "0",
            "-j",
            "DROP",
        ])
        .unwrap();
    let target = t.receiver_addr.to_string();
    let args = [
        "live",
        "--json",
        "--ping",
        &target,
        "--from-netns",
        &t.sender.name,
        "--interval",
        "100ms",
        "--timeout",
        "800ms",
        "--count",
        "30",
    ];
    let out = Ctdrop::spawn(&args).unwrap().wait(Duration::from_secs(60));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    responder.join().unwrap();
    let out = out.unwrap();
    assert!(out.status.success(), "{}", out.stderr);
    let ps = probes(&out);
    let seqs: Vec<u64> = ps.iter().map(|p| p["seq"].as_u64().unwrap()).collect();
    assert_eq!(
        seqs,
        (1..=30).collect::<Vec<u64>>(),
        "one line per probe, in send order:\n{}",
        out.stdout
    );
    let lost = ps.iter().filter(|p| p["status"] == "lost").count();
    let ok = ps.iter().filter(|p| p["status"] == "ok").count();
    let by_rule = ps.iter().filter(|p| p["cause"] == "netfilter_rule").count();
    assert!(
        by_rule == 10 && ok >= 15,
        "every third request dropped, the rest answered ({lost} lost, {ok} ok):\n{}",
        out.stdout
    );
    // Out of order is what the test must provoke: some answer arrived
    // before an earlier probe's answer did.
    let rtts: Vec<f64> = ps
        .iter()
        .map(|p| p["rtt_ms"].as_f64().unwrap_or(f64::NAN))
        .collect();
    let sent: Vec<u64> = ps.iter().map(|p| p["ts_ns"].as_u64().unwrap()).collect();
    let answered_at: Vec<(f64, usize)> = (0..30)
        .filter(|i| rtts[*i].is_finite())
        .map(|i| ((sent[i] - sent[0]) as f64 / 1e6 + rtts[i], i))
        .collect();
    assert!(
        answered_at.windows(2).any(|w| w[1].0 < w[0].0),
        "no reply overtook an earlier one; rtts {rtts:?}"
    );
    // Times are the send times: strictly increasing with the probe number.
    assert!(
        sent.windows(2).all(|w| w[0] < w[1]),
        "send times out of order: {sent:?}"
    );
}
