#!/usr/bin/env python3
"""Load-balancer benchmark: every figure next to a reference measured in the same run.

  per-packet  BPF_PROG_TEST_RUN ns/packet (64-byte TCP/IPv4 and IPv6) of xdpfw's LB path
              (service lookup, conntrack hit, MAC rewrite, XDP_TX), its first packet of a
              flow (conntrack miss: Maglev lookup + LRU insert), and the firewall-only path
              with and without services configured, beside a bare XDP_TX program.
  flood       iperf3 TCP (4 streams, 3 s) from a client namespace: through the appliance in
              tx mode (generic, then native XDP on the appliance's veth, DSR backend), beside
              the same flood straight to the backend's own address over the same bridge.

Older and in-process (the firewall and LB are built in this process, sampling off): the
conntrack hit of the daemon as shipped is scripts/bench_fw.py --phases lb.

Run as root from the repository root; prints a markdown section for docs/perf.md:
    .venv/bin/python scripts/bench_lb.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests/packets.py builds the frames

from tests import packets as P  # noqa: E402
from xdpfw import netns as nsutil  # noqa: E402
from xdpfw.dataplane import attach as xdp_attach  # noqa: E402
from xdpfw.dataplane.attach import Mode  # noqa: E402
from xdpfw.dataplane.loader import ProgramConfig, load_program  # noqa: E402
from xdpfw.dataplane.testrun import test_run  # noqa: E402
from xdpfw.lb.model import BackendSpec, ServiceSpec  # noqa: E402
from xdpfw.lb.service import LoadBalancer  # noqa: E402
from xdpfw.service import Firewall  # noqa: E402

BENCH_PROGS = ROOT / "scripts" / "bench_progs"
VIP, PORT, CLIENT, LB_ADDR, BACKEND = "10.230.100.1", 5201, "10.230.0.10", "10.230.0.1", \
    "10.230.0.21"
VIP6, CLIENT6 = "fd23::100", "fd23:1::7"
REPEAT = 2_000_000


def sh(ns: str, *argv: str) -> str:
    proc = nsutil.run_in(ns, list(argv), timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"{ns}: {' '.join(argv)}: {proc.stdout}{proc.stderr}")
    return proc.stdout


def frame(src: str, dst: str, sport: int = 40000, dport: int = PORT) -> bytes:
    if ":" in dst:
        return P.eth(P.ETH_IPV6, P.ipv6(src, dst, P.TCP, P.l4(P.TCP, dport, sport)))
    return P.eth(P.ETH_IP, P.ipv4(src, dst, P.TCP, P.l4(P.TCP, dport, sport)))


def ns_per_packet(fd: int, pkt: bytes, repeat: int = REPEAT, runs: int = 5) -> float:
    """Median of `runs` BPF_PROG_TEST_RUN batches, ns per packet."""
    got = sorted(test_run(fd, pkt, repeat=repeat).duration_ns for _ in range(runs))
    return float(got[len(got) // 2])


def build(tag: str) -> tuple[str, str, str]:
    app, cli, be = (f"xdpfw-blb{tag}-{r}" for r in ("app", "cli", "be"))
    for n in (app, cli, be):
        nsutil.create_netns(n)
    sh(app, "ip", "link", "add", "br0", "type", "bridge")
    sh(app, "ip", "link", "set", "br0", "up")
    nsutil.veth_pair(app, "lb0", app, "lbp0", [nsutil.Addr(LB_ADDR, 24)])
    nsutil.veth_pair(cli, "cli0", app, "clip0", [nsutil.Addr(CLIENT, 24)])
    nsutil.veth_pair(be, "eth0", app, "bep0", [nsutil.Addr(BACKEND, 24)])
    for p in ("lbp0", "clip0", "bep0"):
        sh(app, "ip", "link", "set", p, "master", "br0")
    sh(cli, "ip", "route", "add", f"{VIP}/32", "via", LB_ADDR)
    sh(be, "ip", "addr", "add", f"{VIP}/32", "dev", "lo")
    sh(be, "sysctl", "-qw", "net.ipv4.conf.all.arp_ignore=1")
    sh(be, "sysctl", "-qw", "net.ipv4.conf.all.arp_announce=2")
    for a in (LB_ADDR, BACKEND):
        for _ in range(50):
            if nsutil.run_in(cli, ["ping", "-c1", "-W1", a]).returncode == 0:
                break
            time.sleep(0.1)
    return app, cli, be


def iperf(cli: str, be: str, target: str, seconds: int) -> float:
    """Gbit/s received by the backend from 4 TCP streams."""
    server = subprocess.Popen(["ip", "netns", "exec", be, "iperf3", "-s", "-1", "-p", str(PORT)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        out = sh(cli, "iperf3", "-c", target, "-p", str(PORT), "-t", str(seconds), "-P", "4",
                 "--json")
        return json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e9
    finally:
        server.kill()
        server.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=int, default=3)
    args = ap.parse_args()
    tag = uuid.uuid4().hex[:4]
    pin_dir = f"/sys/fs/bpf/xdpfw-bench-lb{tag}"
    state = Path(f"/tmp/xdpfw-bench-lb{tag}")
    namespaces: tuple[str, ...] = ()
    fw = lb = None
    try:
        cfg = ProgramConfig(pin_dir=pin_dir, max_rules=1024, max_port_rules=256, max_ifaces=16,
                            max_services=8, max_backends=64, lb_ct_size=65_536)
        fw = Firewall(state, cfg)
        bare = load_program(ProgramConfig(pin_dir=pin_dir + "-bare",
                                          source=BENCH_PROGS / "xdp_tx.c"), entry="xdp_tx",
                            slotted=False)
        namespaces = build(tag)
        app, cli, be = namespaces
        fd = fw.program.fd
        plain4 = frame(CLIENT, "10.230.0.99")
        fw_only_empty = ns_per_packet(fd, plain4)

        lb = LoadBalancer(state, fw.dp, app)
        lb.create_service(ServiceSpec(VIP, PORT, "tcp", "tx",
                                      backends=(BackendSpec(BACKEND),)))
        # IPv6 service: the data plane only (its backend MAC is the IPv4 backend's).
        lb.create_service(ServiceSpec(VIP6, PORT, "tcp", "tx",
                                      backends=(BackendSpec(BACKEND),)))
        hit4 = frame(CLIENT, VIP)
        hit6 = frame(CLIENT6, VIP6)
        results = {
            "bare XDP_TX program": ns_per_packet(bare.fd, hit4),
            "xdpfw LB, IPv4, conntrack hit (XDP_TX)": ns_per_packet(fd, hit4),
            "xdpfw LB, IPv6, conntrack hit (XDP_TX)": ns_per_packet(fd, hit6),
        }
        # `repeat` runs one flow, so a conntrack miss is timed one run at a time, each with a
        # fresh source port (the kernel's timer covers the program run, not the syscall).
        miss = []
        for sport in range(1000, 1400):
            miss.append(test_run(fd, frame(CLIENT, VIP, sport=sport), repeat=1).duration_ns)
        miss.sort()
        results["xdpfw LB, IPv4, new flow (Maglev + conntrack insert), median of 400"] = float(
            miss[len(miss) // 2])
        results["xdpfw firewall only, no service configured (XDP_PASS)"] = fw_only_empty
        results["xdpfw firewall only, 2 services configured (XDP_PASS)"] = ns_per_packet(
            fd, plain4)

        fw.attach_interface("lb0", app, Mode.GENERIC, policy="pass")
        direct = iperf(cli, be, BACKEND, args.seconds)
        through = iperf(cli, be, VIP, args.seconds)
        svc = lb.list_services()[0]
        fwd_packets = lb.counters(svc)["forwarded"][0]
        # Native on a veth needs an XDP program on the peer (lbp0) and full checksums from the
        # sender (netns_tests/test_lb.py: test_tx_native_on_veth): both paths without offload.
        peer = load_program(ProgramConfig(pin_dir=pin_dir + "-peer",
                                          source=BENCH_PROGS / "xdp_pass.c"), entry="xdp_pass",
                            slotted=False)
        sh(cli, "ethtool", "-K", "cli0", "tx", "off")
        fw.detach_interface("lb0", app)
        xdp_attach.attach("lbp0", app, peer.fd, Mode.NATIVE)
        fw.attach_interface("lb0", app, Mode.NATIVE, policy="pass")
        direct_nocsum = iperf(cli, be, BACKEND, args.seconds)
        native = iperf(cli, be, VIP, args.seconds)

        print("## Load balancer\n")
        print(f"Kernel {platform.release()}, {os.cpu_count()} CPUs (shared), "
              f"`scripts/bench_lb.py`, one run.\n")
        print("Per packet, `BPF_PROG_TEST_RUN`, 64-byte TCP frame, median of 5 batches of "
              f"{REPEAT:,} runs:\n")
        print("| path | ns/packet |\n|---|---:|")
        for name, v in results.items():
            print(f"| {name} | {v:.0f} |")
        print(f"\nTCP flood, iperf3 4 streams x {args.seconds} s, client namespace -> backend "
              "namespace over a bridge (veth), same run:\n")
        print("| path | Gbit/s |\n|---|---:|")
        print(f"| straight to the backend ({BACKEND}) | {direct:.2f} |")
        print(f"| through the appliance, `tx` mode, generic XDP on lb0 (VIP {VIP}) | "
              f"{through:.2f} |")
        print(f"| straight to the backend, client TX checksum offload off | "
              f"{direct_nocsum:.2f} |")
        print(f"| through the appliance, `tx` mode, native XDP on lb0 (XDP_PASS on lbp0), "
              f"client TX checksum offload off | {native:.2f} |")
        print(f"\nThe service counted {fwd_packets:,} forwarded packets (client->server "
              "direction only: replies go straight back, DSR).")
    finally:
        if lb is not None:
            lb.close()
        if fw is not None:
            fw.detach_all()
            fw.close()
        for ns in namespaces:
            nsutil.remove_netns(ns)
        for d in (pin_dir, pin_dir + "-bare", pin_dir + "-peer"):
            shutil.rmtree(d, ignore_errors=True)
        shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    main()
