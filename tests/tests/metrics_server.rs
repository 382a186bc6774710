//! The /metrics endpoint under hostile clients: malformed requests get an
//! error and a close, slow ones (slowloris) are cut off by the server, and
//! meanwhile tracing stays exact and a real scrape is still answered with
//! output promtool accepts. Needs root; run under the dev lock.

use std::{
    io::{Read, Write},
    net::TcpStream,
    process::{Command, Stdio},
    time::Duration,
};

use ctdrop_tests::*;

const MAX: u64 = 64;

/// Sends `req` and reads until the server closes; the reply.
fn ask(port: u16, req: &[u8]) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    // Far beyond the server's own limits: only a server that never closes trips it.
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let _ = s.write_all(req);
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap_or_else(|e| {
        panic!(
            "the server did not close after {:?}: {e}",
            String::from_utf8_lossy(&req[..req.len().min(40)])
        )
    });
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn malformed_and_slow_requests_are_cut_off_while_drops_stay_exact() {
    const N: u16 = 100;
    let (topo, _max) = full_table_pair(MAX);
    let port = 20_000 + (std::process::id() % 20_000) as u16;
    let c = Ctdrop::spawn(&[
        "live",
        "--json",
        "--netns",
        &topo.receiver.name,
        "--metrics",
        &port.to_string(),
    ])
    .unwrap();

    // Slowloris: connections that start a request and never finish it.
    let slow: Vec<TcpStream> = (0..8)
        .map(|_| {
            let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
            s.write_all(b"GET /metrics HTTP/1.1\r\nX-Slow: ").unwrap();
            s
        })
        .collect();
    let before = ct_stats(&topo.receiver).unwrap();
    send_udp_flows(&topo.sender, topo.receiver_addr, 20_000, N).unwrap();
    // Malformed requests while the slow ones hang: an error and a close each.
    for (req, status) in [
        (&b"\x16\x03\x01 not http at all\r\n\r\n"[..], " 400 "),
        (b"GET /metrics\r\n\r\n", " 400 "),
        (b"GET /metrics HTTP/1.1\r\nBad Header Line\r\n\r\n", " 400 "),
    ] {
        let r = ask(port, req);
        assert!(
            r.starts_with("HTTP/1.1") && r.lines().next().unwrap().contains(status),
            "{:?} got {r:?}",
            String::from_utf8_lossy(req)
        );
    }
    let mut huge = b"GET /metrics HTTP/1.1\r\nX-Big: ".to_vec();
    huge.extend(std::iter::repeat_n(b'a', 64 << 10));
    huge.extend_from_slice(b"\r\n\r\n");
    assert!(
        ask(port, &huge).contains(" 431 "),
        "a 64 KiB request head is not refused"
    );
    // A real scrape is answered while the slow connections are still open.
    let scrape = ask(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(scrape.starts_with("HTTP/1.1 200 OK"), "{scrape}");
    let body = scrape.split_once("\r\n\r\n").unwrap().1;
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let p = promtool.wait_with_output().unwrap();
    assert!(
        p.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&p.stdout),
        String::from_utf8_lossy(&p.stderr)
    );
    // The server cuts the slow ones off by itself (its header timeout).
    for mut s in slow {
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest)
            .expect("a slowloris connection was never closed by the server");
    }

    let after = settled_ct_stats(&topo.receiver, "drop").unwrap();
    let out = c.stop().unwrap();
    assert!(out.status.success(), "{:?}\n{}", out.status, out.stderr);
    let rx = topo.receiver.inode().unwrap();
    let drop_delta = after["drop"] - before["drop"];
    assert_flows_dropped_exact(&out, rx, drop_delta, N);
}
