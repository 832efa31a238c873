"""docker-compose.yml, run for real: the image is built, the compose file brought up with a
config of the test's own, a veth in a namespace made after the container started is guarded
from inside the container, a rule added over the API (TCP, bearer token) drops a ping, a
host-side `xdpfw stop` ends the container for good, and `down` leaves nothing behind.

Needs Docker: scripts/setup.sh (scripts/docker-setup.sh) installs it, starts dockerd, makes
the debootstrap base image and fetches the image's Python wheels; all three are kept between
runs. Each run builds its own image tag and uses its own project, state, socket and pins, and
removes them all, even on failure: so each run installs the image's Debian packages again.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from conftest import IN_CI, require_kernel
from xdpfw import netns as nsutil

ROOT = Path(__file__).resolve().parent.parent
DOCKER = "/usr/bin/docker"  # Debian's client: another `docker` may come first on PATH
COMPOSE = "/usr/bin/docker-compose"
TOKEN = "compose-test-token"
XDPFW_BIN = str(Path(sys.executable).parent / "xdpfw")

pytestmark = pytest.mark.compose


def _require_docker() -> None:
    require_kernel()
    missing = [t for t in (DOCKER, COMPOSE) if not os.access(t, os.X_OK)]
    reason = f"{missing} missing: run scripts/setup.sh" if missing else None
    if reason is None:
        p = subprocess.run([DOCKER, "info"], capture_output=True, text=True, timeout=60)
        if p.returncode != 0:
            reason = f"dockerd does not answer ({p.stderr.strip()}): run scripts/setup.sh"
    if reason:
        if IN_CI:
            pytest.fail(f"CI=true and Docker is not usable: {reason}", pytrace=False)
        pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _images() -> set[str]:
    out = subprocess.run([DOCKER, "images", "-aq", "--no-trunc"], capture_output=True,
                         text=True, check=True).stdout
    return set(out.split())


@dataclass
class Appliance:
    """One compose project: its image tag, config, state and runtime directories and pins."""

    workdir: Path
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    port: int = field(default_factory=_free_port)
    log: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def project(self) -> str:
        return f"xdpfwtest{self.tag}"

    @property
    def image(self) -> str:
        return f"xdpfw-test:{self.tag}"

    @property
    def pins(self) -> str:
        return f"/sys/fs/bpf/xdpfw-compose-{self.tag}"

    @property
    def socket(self) -> str:
        return str(self.workdir / "run" / "api.sock")

    @property
    def state(self) -> Path:
        return self.workdir / "state"

    def env(self, config: Path | None = None) -> dict[str, str]:
        return {**os.environ, "XDPFW_IMAGE": self.image,
                "XDPFW_CONFIG": str(config or self.workdir / "config.toml"),
                "XDPFW_STATE_DIR": str(self.state), "XDPFW_RUN_DIR": str(self.workdir / "run")}

    def compose(self, *args: str, project: str | None = None, config: Path | None = None,
                timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [COMPOSE, "-p", project or self.project, "-f", str(ROOT / "docker-compose.yml"),
               "--project-directory", str(ROOT), *args]
        t0 = time.monotonic()
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                           env=self.env(config), stdin=subprocess.DEVNULL)
        self.log.append(f"$ {' '.join(cmd)}  # {time.monotonic() - t0:.1f} s, rc={p.returncode}"
                        f"\n{p.stdout[-3000:]}{p.stderr[-3000:]}")
        if check and p.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed:\n" + "\n".join(self.log[-3:]))
        return p

    def container(self) -> str:
        return self.compose("ps", "-q").stdout.strip()

    def inspect(self, fmt: str) -> str:
        return subprocess.run([DOCKER, "inspect", "-f", fmt, self.container()],
                              capture_output=True, text=True, check=True).stdout.strip()

    def logs(self) -> str:
        return "\n".join(self.log[-4:]) + "\n" + self.compose("logs", "--no-color",
                                                                 check=False).stdout[-4000:]

    def leftovers(self) -> list[str]:
        label = f"label=com.docker.compose.project={self.project}"
        found = []
        for kind in (["ps", "-aq"], ["network", "ls", "-q"], ["volume", "ls", "-q"]):
            out = subprocess.run([DOCKER, *kind, "--filter", label], capture_output=True,
                                 text=True).stdout.split()
            found += [f"{kind[0]} {x}" for x in out]
        if subprocess.run([DOCKER, "image", "inspect", self.image],
                          capture_output=True).returncode == 0:
            found.append(f"image {self.image}")
        if os.path.exists(self.pins):
            found.append(f"pins {self.pins}")
        return found

    def down(self, images_before: set[str]) -> None:
        """Everything this run made, whatever state it is in (never raises)."""
        self.compose("down", "--rmi", "all", "--volumes", "--remove-orphans", "-t", "10",
                     check=False)
        subprocess.run([DOCKER, "rmi", "-f", self.image], capture_output=True)
        # Layers of a build that failed half-way are untagged: only those this run made.
        for image in _images() - images_before:
            subprocess.run([DOCKER, "rmi", "-f", image], capture_output=True)
        shutil.rmtree(self.pins, ignore_errors=True)


@pytest.fixture(scope="module")
def appliance(tmp_path_factory) -> Iterator[Appliance]:
    _require_docker()
    a = Appliance(tmp_path_factory.mktemp("compose"))
    (a.workdir / "run").mkdir()
    a.state.mkdir(mode=0o700)
    (a.workdir / "config.toml").write_text(
        f'[api]\nlisten = ["127.0.0.1:{a.port}"]\ntoken = "{TOKEN}"\n\n'
        f'[state]\nbpffs_dir = "{a.pins}"\n\n[limits]\nmax_rules = 65536\n')
    before = _images()
    try:
        t0 = time.monotonic()
        a.compose("build", "--force-rm")
        a.timings["build"] = time.monotonic() - t0
        t0 = time.monotonic()
        a.compose("up", "-d")
        a.timings["up"] = time.monotonic() - t0
        yield a
    finally:
        a.down(before)
        print(f"compose test: {a.timings}")  # shown with -rP / on failure


def test_up_becomes_healthy_through_its_healthcheck(appliance):
    assert appliance.inspect("{{.Config.Healthcheck.Test}}").startswith("[CMD xdpfw health")
    t0 = time.monotonic()
    ok = nsutil.wait_until(lambda: appliance.inspect("{{.State.Health.Status}}") == "healthy",
                           timeout=120, interval=1)
    assert ok, f"not healthy: {appliance.inspect('{{json .State.Health}}')}\n{appliance.logs()}"
    appliance.timings["healthy"] = time.monotonic() - t0
    assert appliance.inspect("{{.HostConfig.Privileged}}") == "false"
    assert appliance.inspect("{{.HostConfig.RestartPolicy.Name}}") == "on-failure"


def _ping(ns: str, addr: str) -> bool:
    p = nsutil.run_in(ns, ["ping", "-c", "2", "-i", "0.2", "-W", "1", "-q", addr], timeout=20)
    return p.returncode == 0


def test_guards_a_namespace_made_after_start_and_drops_a_ping(appliance, make_netns):
    guarded, peer = make_netns("cg"), make_netns("cp")  # after `up`: needs rslave
    nsutil.veth_pair(guarded, "cg0", peer, "cp0", (nsutil.Addr("10.215.0.1", 24),),
                     (nsutil.Addr("10.215.0.2", 24),))
    assert _ping(peer, "10.215.0.1"), "no ping before anything is attached"
    p = appliance.compose("exec", "-T", "xdpfw", "xdpfw", "attach", "cg0", "--netns", guarded,
                          "--mode", "generic", check=False)
    assert p.returncode == 0, f"attach inside the container:\n{appliance.logs()}"
    try:
        api = httpx.Client(base_url=f"http://127.0.0.1:{appliance.port}", timeout=30,
                           headers={"authorization": f"Bearer {TOKEN}"})
        with api:
            assert httpx.get(f"http://127.0.0.1:{appliance.port}/api/v1/rules").status_code \
                == 401, "the TCP API answered without the token"
            assert _ping(peer, "10.215.0.1"), "a pass policy dropped the ping"
            r = api.post("/api/v1/rules", json={"prefix": "10.215.0.2/32"})
            assert r.status_code == 201, r.text
            assert not _ping(peer, "10.215.0.1"), "the drop rule let the ping through"
            assert api.get(r.headers["location"]).json()["packets"] >= 2
            assert api.delete(r.headers["location"]).status_code == 200
    finally:
        p = appliance.compose("exec", "-T", "xdpfw", "xdpfw", "detach", "cg0", "--netns",
                              guarded, check=False)
        assert p.returncode == 0, appliance.logs()


def test_a_missing_config_is_refused_not_made_a_directory(appliance):
    missing = appliance.workdir / "nowhere" / "config.toml"
    project = f"{appliance.project}x"
    try:
        p = appliance.compose("up", "-d", "--no-build", project=project, config=missing,
                              check=False)
        assert p.returncode != 0, "up went ahead without its config file"
        assert "bind source path does not exist" in p.stderr, p.stderr
        assert not missing.exists() and not missing.parent.exists(), "made on the host"
    finally:
        appliance.compose("down", "--remove-orphans", project=project, config=missing,
                          check=False)


def test_host_side_stop_ends_it_for_good(appliance):
    # The pid file holds the container's pid 1: `stop` must not wait on the host's pid 1.
    assert (appliance.state / "xdpfw.pid").read_text().split()[0] == "1"
    t0 = time.monotonic()
    p = subprocess.run([XDPFW_BIN, "stop", "--detach", "--socket", appliance.socket,
                        "--state-dir", str(appliance.state), "--timeout", "40"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, f"{p.stdout}{p.stderr}\n{appliance.logs()}"
    assert time.monotonic() - t0 < 20, "stop waited on something else than the daemon"
    time.sleep(5)  # a restart policy that undoes it acts within a second
    state = appliance.inspect("{{.State.Status}} {{.State.ExitCode}} {{.RestartCount}}")
    assert state == "exited 0 0", state
    assert not os.path.exists(appliance.pins), "stop --detach left pins"


def test_down_leaves_nothing_behind(appliance, tmp_path):
    images = _images()
    appliance.compose("down", "--rmi", "all", "--volumes", "--remove-orphans")
    assert appliance.leftovers() == [], appliance.leftovers()
    gone = images - _images()
    assert gone, "down removed no image"
    assert subprocess.run([DOCKER, "image", "inspect", "debian:12-slim"],
                          capture_output=True).returncode == 0, "the base image is kept"
    left = [n for n in nsutil.list_netns() if n.startswith(("xdpfw-cg-", "xdpfw-cp-"))]
    assert not left, left


def test_build_context_leaves_out_local_state():
    """.dockerignore: the context is what the Dockerfile copies, not .venv or .git."""
    from docker.utils.build import exclude_paths  # Debian's python3-docker (docker-compose)

    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    files = exclude_paths(str(ROOT), patterns)
    tops = {f.split("/")[0] for f in files}
    assert not tops & {".git", ".venv", "tests", "netns_tests", "docs"}, sorted(tops)
    assert {"xdpfw", "scripts", "pyproject.toml", "README.md"} <= tops, sorted(tops)
    size = sum((ROOT / f).stat().st_size for f in files
               if (ROOT / f).is_file() and not f.startswith("build/wheels/"))
    assert size < 5 << 20, f"{size} bytes of context besides the wheels"
