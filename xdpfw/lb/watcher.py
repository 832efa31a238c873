"""Health checks and next-hop refreshes of the registry's backends, on one thread.

The thread runs its own asyncio loop inside [lb].netns: probes must leave from the backends'
network namespace, and that is a per-thread property (setns), so they cannot share uvicorn's
thread; and what they report means blocking map writes and Maglev builds, which must not
stall the API's event loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading

from xdpfw.lb.health import HealthChecker
from xdpfw.lb.registry import ServiceRegistry
from xdpfw.netns import thread_in_netns

log = logging.getLogger(__name__)


class BackendWatcher:
    def __init__(self, registry: ServiceRegistry, netns: str | None,
                 refresh_s: float = 10.0) -> None:
        """refresh_s: how often every backend's MAC is resolved again."""
        self.registry = registry
        self.netns = netns
        self.refresh_s = refresh_s
        # Optimistic: a restored or new backend takes traffic until its checks say otherwise.
        self.checker = HealthChecker(self._on_health, initial_healthy=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None:
            return
        ready = threading.Event()
        failure: list[BaseException] = []

        def main() -> None:
            loop = asyncio.new_event_loop()
            try:
                with thread_in_netns(self.netns):
                    asyncio.set_event_loop(loop)
                    self._loop = loop
                    loop.run_until_complete(self.checker.start())
                    # Inside the running loop: the checker refuses calls from outside it.
                    for sid in list(self.registry.services):
                        loop.call_soon(self._apply, sid)
                    refresher = loop.create_task(self._refresh_loop())
                    ready.set()
                    loop.run_forever()
                    refresher.cancel()
                    loop.run_until_complete(asyncio.gather(refresher, return_exceptions=True))
                    loop.run_until_complete(self.checker.stop())
            except BaseException as e:
                failure.append(e)
                ready.set()
            finally:
                self._loop = None
                loop.close()

        self._thread = threading.Thread(target=main, name="xdpfw-lb-health", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            self._thread = None
            raise failure[0]

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is not None:
            loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(timeout=10)
        self._thread = None

    def sync(self, service_id: int) -> None:
        """Probe what the service has now (after a change to it; also after its deletion)."""
        loop = self._loop
        if loop is not None:
            loop.call_soon_threadsafe(self._apply, service_id)

    def _apply(self, service_id: int) -> None:
        """On the loop thread: give the checker a service's current backends."""
        targets = self.registry.health_targets(service_id)
        if targets is None:
            self.checker.remove_service(str(service_id))
            return
        config, backends = targets
        self.checker.set_service(str(service_id), config, backends)

    def _on_health(self, service_id: str, address: str, healthy: bool) -> None:
        status = self.checker.status(service_id).get(address)
        error = status.last_error if status else None
        self.registry.set_health(int(service_id), address, healthy, error)

    async def _refresh_loop(self) -> None:
        """Re-resolve every backend's MAC: XDP traffic never confirms neighbour entries, and a
        backend can change NIC; unresolved backends get another try."""
        while True:
            await asyncio.sleep(self.refresh_s)
            for sid, bid in self.registry.xdp_backends():
                try:
                    await asyncio.to_thread(self.registry.refresh_backend, sid, bid)
                except Exception:
                    log.exception("refreshing backend %d of service %d failed", bid, sid)
