"""The `xdpfw` command."""

from __future__ import annotations

import argparse
import logging
import sys

from xdpfw.errors import XdpfwError


def _serve(args: argparse.Namespace) -> int:
    from xdpfw.config import load_config
    from xdpfw.daemon import ServeOptions, serve

    cfg = load_config(args.config)
    if args.socket:
        cfg.api.socket = args.socket
    if args.state_dir:
        cfg.state.dir = args.state_dir
    if args.bpffs_dir:
        cfg.state.bpffs_dir = args.bpffs_dir
    if args.max_rules:
        cfg.limits.max_rules = args.max_rules
    serve(ServeOptions(cfg, demo=args.demo, log_level=args.log_level,
                       adopt_pins=args.adopt_pins, config_path=args.config))
    return 0


def _demo_down(args: argparse.Namespace) -> int:
    from xdpfw import demo

    demo.teardown()
    print("demo namespaces removed")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xdpfw", description="XDP firewall appliance")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the control plane (REST API) and attach the data plane")
    s.add_argument("--config", help="TOML config file (see xdpfw/config.py)")
    s.add_argument("--socket", help="API unix socket (default /run/xdpfw/api.sock)")
    s.add_argument("--state-dir", help="where rules are kept (default /var/lib/xdpfw)")
    s.add_argument("--bpffs-dir", help="where maps are pinned (default /sys/fs/bpf/xdpfw)")
    s.add_argument("--max-rules", type=int, help="rule capacity per address family")
    s.add_argument(
        "--demo", action="store_true", help="with no interface configured, guard a demo topology"
    )
    s.add_argument(
        "--adopt-pins", action="store_true",
        help="take over pinned maps that another state dir's store claimed: they are made "
             "equal to this store (their other rules removed, and logged)",
    )
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    s.set_defaults(func=_serve)

    d = sub.add_parser("demo-down", help="remove the demo namespaces")
    d.set_defaults(func=_demo_down)

    from xdpfw.commands import add_commands  # the operator's commands (talk to the daemon)

    add_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, getattr(args, "log_level", "info").upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except XdpfwError as e:
        print(f"xdpfw: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a file the command was given: one line, not a traceback
        print(f"xdpfw: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
