//! Provoking conntrack insert clashes: the same TCP SYN (same 4-tuple) sent
//! from two CPUs at the same instant through raw sockets. TCP has no clash
//! resolution, so the loser's confirm fails: `insert_failed` and `drop`
//! each rise by one (recipe from shared/kernel-notes.md).

use std::{
    net::Ipv4Addr,
    sync::{Arc, Barrier},
};

fn sum16(data: &[u8], mut acc: u32) -> u32 {
    for c in data.chunks(2) {
        acc += u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32;
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// An IPv4 packet carrying a bare TCP SYN.
pub fn syn_packet(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) -> Vec<u8> {
    let mut tcp = vec![0u8; 20];
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&dport.to_be_bytes());
    tcp[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x02; // SYN
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, 6, 0, 20]);
    let c = fold(sum16(&tcp, sum16(&pseudo, 0)));
    tcp[16..18].copy_from_slice(&c.to_be_bytes());
    let mut ip = vec![0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&40u16.to_be_bytes());
    ip[6] = 0x40; // DF
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    let c = fold(sum16(&ip, 0));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    ip.extend_from_slice(&tcp);
    ip
}

fn pin(cpu: usize) {
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set);
    }
}

fn raw_socket() -> i32 {
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
    fd
}

fn send(fd: i32, pkt: &[u8], dst: Ipv4Addr) {
    let sa = libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(dst.octets()),
        },
        sin_zero: [0; 8],
    };
    unsafe {
        libc::sendto(
            fd,
            pkt.as_ptr().cast(),
            pkt.len(),
            0,
            (&sa as *const libc::sockaddr_in).cast(),
            std::mem::size_of_val(&sa) as u32,
        );
    }
}

/// Sends `pairs` SYN pairs (a new source port per pair) from two threads
/// pinned to CPUs 0 and 1, released together by a barrier. Must run on a
/// thread already inside the sending namespace; the threads it spawns
/// inherit that namespace only if `enter` puts them there, so it is called
/// in each of them.
pub fn syn_pairs(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    dport: u16,
    first_sport: u16,
    pairs: u16,
    enter: impl Fn() + Send + Sync + 'static,
) {
    let barrier = Arc::new(Barrier::new(2));
    let enter = Arc::new(enter);
    let handles: Vec<_> = (0..2)
        .map(|cpu| {
            let barrier = barrier.clone();
            let enter = enter.clone();
            std::thread::spawn(move || {
                enter();
                pin(cpu);
                let fd = raw_socket();
                for i in 0..pairs {
                    let pkt = syn_packet(src, dst, first_sport.wrapping_add(i), dport);
                    barrier.wait();
                    send(fd, &pkt, dst);
                }
                unsafe { libc::close(fd) };
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

/// Sends SYN pairs from `ns` (500 pairs a round, a new source port per
/// pair) until its `insert_failed` counter rose by `enough`, or two
/// minutes or every source port went by: clashes are a race. On two real
/// CPUs 3000 pairs give ~120; see `widen_race_window` for emulated ones.
pub fn race_until_insert_failed(
    ns: &crate::Netns,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    dport: u16,
    enough: u64,
) -> anyhow::Result<()> {
    const ROUND: u16 = 500;
    let path = ns.path();
    let before = crate::ct_stats(ns)?["insert_failed"];
    let start = std::time::Instant::now();
    let mut sport = 1024u16;
    while start.elapsed() < std::time::Duration::from_secs(120) && sport <= u16::MAX - ROUND {
        let p = path.clone();
        crate::in_netns(&path, move || {
            syn_pairs(src, dst, dport, sport, ROUND, move || enter(&p));
            Ok(())
        })?;
        sport += ROUND;
        if crate::ct_stats(ns)?["insert_failed"] - before >= enough {
            break;
        }
    }
    Ok(())
}

/// Puts `rules` non-matching rules in `ns`'s mangle POSTROUTING, between
/// conntrack's entry creation (OUTPUT) and its confirmation (end of
/// POSTROUTING), so that a SYN spends most of its send there. In a guest
/// whose vCPUs take turns on one host thread, a clash needs the turn to
/// pass inside that window while the other thread is about to send the
/// same SYN: the longer the window is against the rest of a pair's loop,
/// the likelier (300 rules once gave 0 clashes in 24000 pairs on 6.1).
pub fn widen_race_window(ns: &crate::Netns, rules: usize) -> anyhow::Result<()> {
    let mut text = String::from("*mangle\n");
    for _ in 0..rules {
        text.push_str("-A POSTROUTING -p udp --dport 9 -j ACCEPT\n");
    }
    text.push_str("COMMIT\n");
    let path = std::env::temp_dir().join(format!("ctdrop-race-{}.rules", std::process::id()));
    std::fs::write(&path, text)?;
    let r = ns.exec(&["iptables-restore", "--noflush", path.to_str().unwrap()]);
    let _ = std::fs::remove_file(&path);
    r.map(|_| ())
}

/// Makes exactly `n` insert clashes in `t`'s sender, deterministically: each
/// SYN is sent twice and both copies are held in an NFQUEUE at mangle
/// POSTROUTING (after OUTPUT made an unconfirmed entry for each, before
/// confirm at the end of POSTROUTING), then let go one after the other.
/// The first confirms; the second finds its tuple taken, and TCP has no
/// clash resolution: `insert_failed` and `drop` each rise by one, in the
/// same `__nf_conntrack_confirm` the two-CPU race reaches (the loser is
/// freed by `nf_reinject`, not `nf_hook_slow`).
///
/// This is the scene for emulated guests: their vCPUs take turns on one
/// host thread, so the race needs a vCPU switch inside a microsecond
/// window, and on a busy host 24000 pairs once gave none.
///
/// Then `refused` more SYNs are held alone and refused by the queue (an
/// NF_DROP verdict): also freed by `nf_reinject` with an unconfirmed
/// entry, but conntrack's counters do not move, and they are not
/// conntrack's drops.
///
/// The receiver listens on `dport`: a SYN to a closed port is answered with
/// a RST, processed before the second verdict returns, and a RST as the
/// only reply deletes the winner's entry at once (nf_conntrack_proto_tcp),
/// so the loser would find no clash. Only SYNs are queued, not the RST
/// the sender's stack sends for the SYN-ACK.
pub fn held_clashes(
    t: &crate::Topology,
    dport: u16,
    first_sport: u16,
    n: u16,
    refused: u16,
) -> anyhow::Result<()> {
    use anyhow::Context;
    let (sender, receiver) = (&t.sender, &t.receiver);
    let (src, dst) = (t.sender_addr, t.receiver_addr);
    const QUEUE: u16 = 7;
    let (port, queue) = (dport.to_string(), QUEUE.to_string());
    let rule = |op| {
        [
            "iptables",
            "-w",
            "-t",
            "mangle",
            op,
            "POSTROUTING",
            "-p",
            "tcp",
            "--syn",
            "--dport",
            &port,
            "-j",
            "NFQUEUE",
            "--queue-num",
            &queue,
        ]
    };
    let listener = receiver
        .run_in(|| Ok(std::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, dport))?))
        .with_context(|| format!("listening on port {dport} in the receiver"))?;
    sender.exec(&rule("-A"))?;
    let held = sender.run_in(|| {
        let mut q = crate::nfqueue::Queue::bind(QUEUE)?;
        let fd = raw_socket();
        let r = (|| {
            for i in 0..n {
                let pkt = syn_packet(src, dst, first_sport.wrapping_add(i), dport);
                send(fd, &pkt, dst);
                send(fd, &pkt, dst);
                let ids = q.held(2)?;
                q.verdict(ids[0], crate::nfqueue::NF_ACCEPT)?;
                q.verdict(ids[1], crate::nfqueue::NF_ACCEPT)?;
            }
            for i in 0..refused {
                let pkt = syn_packet(src, dst, first_sport.wrapping_add(n + i), dport);
                send(fd, &pkt, dst);
                let ids = q.held(1)?;
                q.verdict(ids[0], crate::nfqueue::NF_DROP)?;
            }
            Ok(())
        })();
        // SAFETY: `fd` is ours and closed once.
        unsafe { libc::close(fd) };
        r
    });
    let removed = sender.exec(&rule("-D"));
    drop(listener);
    held?;
    removed?;
    Ok(())
}

/// Puts a helper thread that must send from the namespace at `p` there.
pub fn enter(p: &std::path::Path) {
    ctlab::enter(p).unwrap();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syn_checksums_verify() {
        let p = syn_packet(
            Ipv4Addr::new(198, 18, 0, 1),
            Ipv4Addr::new(198, 18, 0, 2),
            40000,
            80,
        );
        assert_eq!(fold(sum16(&p[..20], 0)), 0);
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&p[12..20]);
        pseudo.extend_from_slice(&[0, 6, 0, 20]);
        assert_eq!(fold(sum16(&p[20..], sum16(&pseudo, 0))), 0);
    }
}
