#!/usr/bin/env python3
"""Per-packet cost of ctdrop's netfilter hook marks on normal traffic.

The hook programs (ct_hook_enter/leave/confirm) run for every packet that
crosses PRE_ROUTING, LOCAL_OUT, POST_ROUTING and LOCAL_IN in every watched
namespace, dropped or not. This measures their BPF run time with the
kernel's own accounting (kernel.bpf_stats_enabled; run_time_ns / run_cnt
from `bpftool -j prog show`) while two namespaces exchange UDP
request/response traffic on established conntrack flows: no drops at all.

Root; run it under the shared dev lock, after `cargo xtask build`:
    flock /run/ctdrop-dev.lock python3 xtask/hook_cost.py target/release/ctdrop
Prints numbers; asserts nothing. Restores the sysctl and removes its
namespaces on every exit.
"""

import json
import os
import subprocess
import sys
import time

PACKETS = int(os.environ.get("HOOK_COST_PACKETS", "100000"))
NS = (f"ctdhc-{os.getpid()}-tx", f"ctdhc-{os.getpid()}-rx")
ADDR = ("198.19.251.1", "198.19.251.2")

ECHO = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 7777))
print("ready", flush=True)
while True:
    d, a = s.recvfrom(2048)
    if d == b"stop":
        break
    s.sendto(d, a)
"""

CLIENT = """
import socket, sys, time
n = int(sys.argv[1])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(1.0)
s.connect((sys.argv[2], 7777))
lost = 0
t = time.monotonic()
for i in range(n):
    s.send(b"x" * 64)
    try:
        s.recv(2048)
    except socket.timeout:
        lost += 1
el = time.monotonic() - t
s.send(b"stop")
print(f"{n} round trips in {el:.2f} s ({n / el:.0f}/s), {lost} unanswered")
"""


def sh(*cmd, check=True):
    return subprocess.run(cmd, check=check, capture_output=True, text=True).stdout


def in_ns(ns, *cmd):
    return sh("ip", "netns", "exec", ns, *cmd)


def hook_progs(pid):
    """run_time_ns/run_cnt of the ct_hook_* programs held by `pid`."""
    held = set()
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            for line in open(f"/proc/{pid}/fdinfo/{fd}"):
                if line.startswith("prog_id:"):
                    held.add(int(line.split()[1]))
        except OSError:
            pass
    out = {}
    for p in json.loads(sh("bpftool", "-j", "prog", "show")):
        if p["id"] in held and p.get("name", "").startswith(("ct_hook", "kfree_skb")):
            out[p["name"]] = (p.get("run_time_ns", 0), p.get("run_cnt", 0))
    return out


def main():
    ctdrop = sys.argv[1] if len(sys.argv) > 1 else "target/release/ctdrop"
    old_stats = sh("sysctl", "-n", "kernel.bpf_stats_enabled").strip()
    procs = []
    try:
        for ns in NS:
            sh("ip", "netns", "add", ns)
            in_ns(ns, "ip", "link", "set", "lo", "up")
        sh("ip", "link", "add", "hc-tx", "netns", NS[0], "type", "veth", "peer", "name", "hc-rx", "netns", NS[1])
        for ns, dev, a in ((NS[0], "hc-tx", ADDR[0]), (NS[1], "hc-rx", ADDR[1])):
            in_ns(ns, "ip", "addr", "add", f"{a}/24", "dev", dev)
            in_ns(ns, "ip", "link", "set", dev, "up")
            # Conntrack on in both, as on a host with a stateful firewall.
            in_ns(ns, "iptables", "-A", "INPUT", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED,NEW", "-j", "ACCEPT")
        echo = subprocess.Popen(["ip", "netns", "exec", NS[1], sys.executable, "-c", ECHO], stdout=subprocess.PIPE, text=True)
        procs.append(echo)
        echo.stdout.readline()

        def round_trips(n):
            return in_ns(NS[0], sys.executable, "-c", CLIENT, str(n), ADDR[1]).strip()

        print("without ctdrop:", round_trips(PACKETS // 4))
        echo2 = subprocess.Popen(["ip", "netns", "exec", NS[1], sys.executable, "-c", ECHO], stdout=subprocess.PIPE, text=True)
        procs.append(echo2)
        echo2.stdout.readline()
        tracer = subprocess.Popen([ctdrop, "live", "--json"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        procs.append(tracer)
        line = tracer.stderr.readline()
        print(line.strip())
        if "attached" not in line:
            raise SystemExit("ctdrop did not attach")
        sh("sysctl", "-qw", "kernel.bpf_stats_enabled=1")
        before = hook_progs(tracer.pid)
        print("with ctdrop:   ", round_trips(PACKETS))
        after = hook_progs(tracer.pid)
        sh("sysctl", "-qw", f"kernel.bpf_stats_enabled={old_stats}")
        total_ns = 0
        for name in sorted(after):
            t0, c0 = before.get(name, (0, 0))
            t1, c1 = after[name]
            runs, ns = c1 - c0, t1 - t0
            if name.startswith("ct_hook"):
                total_ns += ns
            print(f"  {name:<16} {runs:>9} runs {ns / max(runs, 1):7.1f} ns/run")
        # Each round trip is two packets, each crossing LOCAL_OUT and
        # POST_ROUTING in one namespace and PRE_ROUTING and LOCAL_IN in the
        # other (other namespaces' traffic meanwhile adds a little).
        print(f"hook programs: {total_ns / (2 * PACKETS):.0f} ns per packet (both ends), "
              f"{total_ns / 1e9:.3f} s BPF time for {2 * PACKETS} packets; load {os.getloadavg()[0]:.1f}")
    finally:
        sh("sysctl", "-qw", f"kernel.bpf_stats_enabled={old_stats}", check=False)
        for p in procs:
            p.kill()
            p.wait()
        for ns in NS:
            sh("ip", "netns", "del", ns, check=False)


if __name__ == "__main__":
    main()
