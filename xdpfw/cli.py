"""The `xdpfw` command (Click): `serve`, `demo-down`, `completion`, and the operator's commands
in xdpfw.commands.

Errors a person can act on (XdpfwError, a file that cannot be read) are one line,
`xdpfw: ...`, and exit status 1; usage mistakes are Click's, with status 2. Only `serve` logs:
the other commands print what they have to say, so no library's INFO line reaches stderr.
"""

from __future__ import annotations

import logging
import sys
from importlib.metadata import PackageNotFoundError, version

import click
from click.shell_completion import get_completion_class

from xdpfw.capture_cli import capture
from xdpfw.commands import COMMANDS
from xdpfw.errors import XdpfwError
from xdpfw.fleet_cli import fleet
from xdpfw.rules_cli import RULE_COMMANDS

COMPLETE_VAR = "_XDPFW_COMPLETE"


def _version() -> str:
    try:
        return version("xdpfw")
    except PackageNotFoundError:
        return "unknown"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(_version(), "-V", "--version", prog_name="xdpfw")
def cli() -> None:
    """xdpfw: an XDP firewall and load-balancer appliance.

    `xdpfw serve` runs the daemon; the other commands talk to it over its unix socket."""


@cli.command()
@click.option("--config", type=click.Path(dir_okay=False),
              help="TOML config file (see xdpfw/config.py)")
@click.option("--socket", help="API unix socket [default: /run/xdpfw/api.sock]")
@click.option("--state-dir", help="where rules are kept [default: /var/lib/xdpfw]")
@click.option("--bpffs-dir", help="where maps are pinned [default: /sys/fs/bpf/xdpfw]")
@click.option("--max-rules", type=int, help="rule capacity per address family")
@click.option("--demo", is_flag=True, help="with no interface configured, guard a demo topology")
@click.option("--adopt-pins", is_flag=True,
              help="take over pinned maps that another state dir's store claimed: they are "
                   "made equal to this store (their other rules removed, and logged)")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
def serve(config, socket, state_dir, bpffs_dir, max_rules, demo, adopt_pins, log_level) -> int:
    """Run the control plane (REST API) and attach the data plane."""
    from xdpfw.config import load_config
    from xdpfw.daemon import ServeOptions
    from xdpfw.daemon import serve as run

    logging.basicConfig(level=getattr(logging, log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config(config)
    if socket:
        cfg.api.socket = socket
    if state_dir:
        cfg.state.dir = state_dir
    if bpffs_dir:
        cfg.state.bpffs_dir = bpffs_dir
    if max_rules:
        cfg.limits.max_rules = max_rules
    run(ServeOptions(cfg, demo=demo, log_level=log_level, adopt_pins=adopt_pins,
                     config_path=config))
    return 0


@cli.command("demo-down")
def demo_down() -> int:
    """Remove the demo namespaces."""
    from xdpfw import demo

    demo.teardown()
    print("demo namespaces removed")
    return 0


@cli.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell) -> int:
    """Print the shell completion script, e.g. `eval "$(xdpfw completion bash)"`.
    scripts/setup.sh installs the bash one."""
    cls = get_completion_class(shell)
    print(cls(cli, {}, "xdpfw", COMPLETE_VAR).source())
    return 0


for _command in [*RULE_COMMANDS, *COMMANDS]:
    cli.add_command(_command)
cli.add_command(capture)
cli.add_command(fleet)


def main(argv: list[str] | None = None) -> int:
    try:
        rv = cli.main(args=argv, prog_name="xdpfw", complete_var=COMPLETE_VAR,
                      standalone_mode=False)
    except click.ClickException as e:  # usage: Click's message, status 2
        e.show()
        return e.exit_code
    except click.Abort:
        print("xdpfw: aborted", file=sys.stderr)
        return 1
    except XdpfwError as e:
        print(f"xdpfw: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a file the command was given: one line, not a traceback
        print(f"xdpfw: {e}", file=sys.stderr)
        return 1
    return rv if isinstance(rv, int) else 0


if __name__ == "__main__":
    sys.exit(main())
