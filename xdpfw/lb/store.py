"""SQLite persistence of load-balancer services and backends, in the firewall's store file.

Its own connection to the same file (WAL mode lets both write, one after the other); every
change commits before the API answers, and start-up restores the maps from these rows.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from xdpfw.db import SqliteDb
from xdpfw.lb.health import HealthCheckConfig

SCHEMA = """
CREATE TABLE IF NOT EXISTS lb_services (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL DEFAULT '',
    vip TEXT NOT NULL,                   -- normalized address text
    port INTEGER NOT NULL,
    proto TEXT NOT NULL,                 -- tcp | udp
    forward TEXT NOT NULL,               -- tx | redirect | proxy
    cpu_steer TEXT NOT NULL DEFAULT '',  -- comma-separated CPUs, '' = none
    health TEXT NOT NULL DEFAULT '',     -- JSON of HealthCheckConfig (+ port), '' = no checks
    slot INTEGER NOT NULL UNIQUE,
    UNIQUE (vip, port, proto)
);
CREATE TABLE IF NOT EXISTS lb_backends (
    id INTEGER PRIMARY KEY AUTOINCREMENT, -- also the data plane's generation of its slot
    service_id INTEGER NOT NULL REFERENCES lb_services (id) ON DELETE CASCADE,
    address TEXT NOT NULL,
    weight INTEGER NOT NULL,
    state TEXT NOT NULL,                  -- active | draining
    slot INTEGER NOT NULL UNIQUE,
    UNIQUE (service_id, address)
);
CREATE TABLE IF NOT EXISTS lb_settings (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class HealthSpec:
    """A service's health check: the checker's config and the port probed (None: the VIP's)."""

    config: HealthCheckConfig
    port: int | None = None

    def to_json(self) -> str:
        return json.dumps({**asdict(self.config), "port": self.port})

    @classmethod
    def from_json(cls, text: str) -> HealthSpec | None:
        if not text:
            return None
        data = json.loads(text)
        port = data.pop("port", None)
        return cls(HealthCheckConfig(**data), port)


@dataclass(frozen=True)
class ServiceRecord:
    id: int
    name: str
    vip: str
    port: int
    proto: str
    forward: str
    cpu_steer: tuple[int, ...]
    health: HealthSpec | None
    slot: int


@dataclass(frozen=True)
class BackendRecord:
    id: int
    service_id: int
    address: str
    weight: int
    state: str
    slot: int


class LbStore(SqliteDb):
    """The load balancer's tables, in the same database file as the rules."""

    def __init__(self, path: Path | str) -> None:
        super().__init__(path, SCHEMA)

    # -- services -------------------------------------------------------------------------

    def load_services(self) -> list[ServiceRecord]:
        rows = self._db.execute(
            "SELECT id, name, vip, port, proto, forward, cpu_steer, health, slot"
            " FROM lb_services ORDER BY id"
        )
        return [
            ServiceRecord(
                i, n, v, p, pr, f,
                tuple(int(c) for c in cs.split(",") if c),
                HealthSpec.from_json(h),
                s,
            )
            for i, n, v, p, pr, f, cs, h, s in rows
        ]

    def insert_service(self, rec: ServiceRecord) -> int:
        """rec.id 0: the next id; else that id (a fleet's, the same on every node)."""
        cur = self._db.execute(
            "INSERT INTO lb_services (id, name, vip, port, proto, forward, cpu_steer, health,"
            " slot) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                rec.id or None,
                rec.name,
                rec.vip,
                rec.port,
                rec.proto,
                rec.forward,
                ",".join(map(str, rec.cpu_steer)),
                rec.health.to_json() if rec.health else "",
                rec.slot,
            ),
        )
        return cur.lastrowid

    def delete_service(self, service_id: int) -> None:
        self._db.execute("DELETE FROM lb_backends WHERE service_id = ?", (service_id,))
        self._db.execute("DELETE FROM lb_services WHERE id = ?", (service_id,))

    # -- backends -------------------------------------------------------------------------

    def load_backends(self) -> list[BackendRecord]:
        rows = self._db.execute(
            "SELECT id, service_id, address, weight, state, slot FROM lb_backends ORDER BY id"
        )
        return [BackendRecord(*r) for r in rows]

    def insert_backend(self, service_id: int, address: str, weight: int, state: str,
                       slot: int, backend_id: int | None = None) -> int:
        """backend_id None: the next id; else that id (a fleet's)."""
        cur = self._db.execute(
            "INSERT INTO lb_backends (id, service_id, address, weight, state, slot)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (backend_id, service_id, address, weight, state, slot),
        )
        return cur.lastrowid

    def update_backend(self, backend_id: int, weight: int, state: str) -> None:
        self._db.execute(
            "UPDATE lb_backends SET weight = ?, state = ? WHERE id = ?",
            (weight, state, backend_id),
        )

    def delete_backend(self, backend_id: int) -> None:
        self._db.execute("DELETE FROM lb_backends WHERE id = ?", (backend_id,))

    # -- settings -------------------------------------------------------------------------

    def get_setting(self, name: str, default: str = "") -> str:
        row = self._db.execute("SELECT value FROM lb_settings WHERE name = ?", (name,)).fetchone()
        return row[0] if row else default

    def set_setting(self, name: str, value: str) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO lb_settings (name, value) VALUES (?, ?)", (name, value)
        )
