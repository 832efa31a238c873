"""What a new operator meets after set-up: `xdpfw` on a fresh shell's PATH, with completion,
and a README whose commands are the ones on that PATH."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import xdpfw

ROOT = Path(__file__).resolve().parent.parent
FRESH_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def test_setup_puts_xdpfw_on_a_fresh_path_with_completion():
    p = subprocess.run(["xdpfw", "--version"], capture_output=True, text=True, timeout=60,
                       env={"PATH": FRESH_PATH, "HOME": os.environ.get("HOME", "/root")})
    assert p.returncode == 0 and p.stdout.startswith("xdpfw, version"), (p.stdout, p.stderr)
    link = Path("/usr/local/bin/xdpfw")
    assert link.resolve().parent.parent.name == ".venv", link.resolve()
    completion = Path("/usr/share/bash-completion/completions/xdpfw").read_text()
    assert "_XDPFW_COMPLETE=bash_complete" in completion, completion


def test_readme_names_the_command_on_path():
    text = (ROOT / "README.md").read_text()
    lines = [line for line in text.splitlines() if line.strip()]
    assert [line.split()[0] for line in lines[1:3]] == ["./scripts/appliance.sh",
                                                        "./scripts/test.sh"], lines[:3]
    # `.venv/bin/xdpfw rules ...`: a command; "→ `.venv/bin/xdpfw`" explains the link.
    stale = [line for line in text.splitlines() if re.search(r"\.venv/bin/xdpfw [a-z-]+", line)]
    assert not stale, f"the README should say `xdpfw` (on PATH after set-up): {stale}"
    assert Path(xdpfw.__file__).resolve().is_relative_to(ROOT)
