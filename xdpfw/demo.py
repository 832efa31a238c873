"""The demo topology: two namespaces joined by a veth, the server end guarded by xdpfw.

    xdpfw-demo-client  demo-cli 10.99.0.1/24 fd99::1/64
          |  veth
    xdpfw-demo-server  demo-srv 10.99.0.2/24 fd99::2/64   <- XDP attached here
"""

from __future__ import annotations

from xdpfw import netns as nsutil

CLIENT_NS, SERVER_NS = "xdpfw-demo-client", "xdpfw-demo-server"
CLIENT_IF, SERVER_IF = "demo-cli", "demo-srv"
CLIENT_ADDRS = (nsutil.Addr("10.99.0.1", 24), nsutil.Addr("fd99::1", 64))
SERVER_ADDRS = (nsutil.Addr("10.99.0.2", 24), nsutil.Addr("fd99::2", 64))


def build() -> tuple[str, str]:
    """Create the topology unless it exists; returns (interface, netns) to guard."""
    existing = set(nsutil.list_netns())
    if {CLIENT_NS, SERVER_NS} <= existing:
        try:
            nsutil.ifindex(SERVER_NS, SERVER_IF)
            return SERVER_IF, SERVER_NS
        except LookupError:
            pass
    teardown()
    nsutil.create_netns(CLIENT_NS)
    nsutil.create_netns(SERVER_NS)
    nsutil.veth_pair(CLIENT_NS, CLIENT_IF, SERVER_NS, SERVER_IF, CLIENT_ADDRS, SERVER_ADDRS)
    return SERVER_IF, SERVER_NS


def teardown() -> None:
    for ns in (CLIENT_NS, SERVER_NS):
        nsutil.remove_netns(ns)


def howto(socket_path: str) -> str:
    api = f"curl -s --unix-socket {socket_path} http://xdpfw"
    return f"""demo topology: {CLIENT_NS} (10.99.0.1) --veth--> {SERVER_NS} (10.99.0.2, guarded)
  try:  ip netns exec {CLIENT_NS} ping -c2 10.99.0.2
        {api}/api/v1/rules -H 'content-type: application/json' \\
            -d '{{"prefix": "10.99.0.1/32", "action": "drop", "proto": "icmp"}}'
        ip netns exec {CLIENT_NS} ping -c2 -W1 10.99.0.2     # now dropped in XDP
        {api}/api/v1/stats
  API docs: {api}/docs  (OpenAPI: /openapi.json)"""
