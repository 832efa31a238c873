"""Options every command that talks to the daemon shares."""

from __future__ import annotations

import click

from xdpfw.client import default_socket


def socket_option(f):
    return click.option(
        "--socket", default=None, envvar="XDPFW_SOCKET", show_envvar=True,
        help=f"API unix socket [default: {default_socket()}]",
    )(f)


def json_option(f):
    return click.option("--json", "as_json", is_flag=True, help="print the API's JSON answer")(f)
