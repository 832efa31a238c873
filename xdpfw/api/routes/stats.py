"""/api/v1/stats and /healthz."""

from __future__ import annotations

from fastapi import APIRouter

from xdpfw.api.deps import FirewallDep

router = APIRouter(tags=["stats"])


@router.get("/api/v1/stats")
def stats(fw: FirewallDep) -> dict:
    """Packets/bytes per action (verdict reason), per interface, and per rule that matched."""
    return fw.stats()


@router.get("/healthz")
def healthz(fw: FirewallDep) -> dict:
    """Never waits for the firewall's lock (Firewall.counts)."""
    counts = fw.counts()
    return {"status": "ok", "rules": counts.rules, "interfaces": counts.interfaces}
