"""The usage ledger: one SQLite file (WAL) with teams, API keys and one row per finished request.

Keys are shown once and stored as SHA-256 digests; a presented key is hashed and compared with
every stored digest by `hmac.compare_digest`, so how long a check takes says nothing about how
much of a key was right. A request's row is committed before its response (or its last stream
chunk) leaves the server, under its response id as primary key: a crash after that loses
nothing, and nothing is ever written twice. Spend per key and team for the current month is kept
in memory and reloaded whenever another process (the `levante keys` CLI, another replica)
commits to the file, which SQLite's `data_version` tells cheaply."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import sqlite3
import statistics
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from levante.errors import LevanteError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS teams (
    name TEXT PRIMARY KEY,
    monthly_budget REAL
);
CREATE TABLE IF NOT EXISTS keys (
    id INTEGER PRIMARY KEY,
    team TEXT NOT NULL REFERENCES teams(name),
    name TEXT NOT NULL,
    digest TEXT NOT NULL UNIQUE,
    hint TEXT NOT NULL,
    monthly_budget REAL,
    admin INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    revoked REAL,
    UNIQUE (team, name)
);
CREATE TABLE IF NOT EXISTS requests (
    id TEXT PRIMARY KEY,
    time REAL NOT NULL,
    key_id INTEGER,
    key_name TEXT,
    team TEXT,
    model TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    cached_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    cost REAL NOT NULL,
    latency REAL NOT NULL,
    finish_reason TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS requests_by_time ON requests (time);
"""

GROUPS = ("day", "team", "key")
SERVER_TEAM = "(server)"
"""The team of the server's single --api-key in the web app; no ledger key may join it."""


@dataclass(frozen=True)
class Key:
    id: int | None  # None: the server's single --api-key, which is not in the ledger's key table
    team: str | None
    name: str
    hint: str  # the first characters, enough to tell keys apart in a list
    monthly_budget: float | None = None
    admin: bool = False
    created: float = 0.0
    revoked: float | None = None


@dataclass(frozen=True)
class Entry:
    """One finished request (also an aborted or failed one), as its usage block counted it."""

    request_id: str
    key: Key | None
    model: str
    endpoint: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    cost: float
    latency: float
    finish_reason: str
    time: float


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def month_start(now: float) -> float:
    """The first second of `now`'s calendar month, UTC: budgets are monthly."""
    day = datetime.fromtimestamp(now, UTC)
    return day.replace(day=1, hour=0, minute=0, second=0, microsecond=0).timestamp()


def parse_day(text: str, what: str) -> float:
    try:
        return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()
    except ValueError:
        raise LevanteError(f"{what}: expected a date like 2026-11-01, got {text!r}") from None


def check_budget(value: float | None, what: str) -> float | None:
    if value is not None and not value >= 0:
        raise LevanteError(f"{what} must be >= 0 USD, got {value}")
    return value


class Ledger:
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")  # WAL: a commit survives a process crash
            self.db.execute("PRAGMA busy_timeout=10000")
            self.db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as e:
            raise LevanteError(f"{path}: cannot open the usage ledger ({e})") from None
        self.lock = threading.Lock()
        self._version: int | None = None
        self._month = 0.0
        self._keys: list[tuple[str, Key]] = []
        self._key_spent: dict[int, float] = {}
        self._team_spent: dict[str, float] = {}
        self._team_budget: dict[str, float | None] = {}

    def close(self) -> None:
        self.db.close()

    # ---- keys and teams (the `levante keys` CLI) ----------------------------------------------

    def create_key(
        self, team: str, name: str, monthly_budget: float | None = None, admin: bool = False
    ) -> tuple[Key, str]:
        """A new key for `team` (created on first use); the secret is returned once, never stored."""
        if not team.strip() or not name.strip():
            raise LevanteError("a key needs a non-empty --team and --name")
        if team == SERVER_TEAM:
            raise LevanteError(f"the team name {SERVER_TEAM} is reserved for the server's --api-key holder")
        check_budget(monthly_budget, "--monthly-budget")
        secret = "lv-" + secrets.token_urlsafe(24)
        with self.lock:
            try:
                self.db.execute("BEGIN IMMEDIATE")
                self.db.execute("INSERT OR IGNORE INTO teams (name) VALUES (?)", (team,))
                cur = self.db.execute(
                    "INSERT INTO keys (team, name, digest, hint, monthly_budget, admin, created) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (team, name, digest(secret), secret[:7], monthly_budget, int(admin), time.time()),
                )
                self.db.execute("COMMIT")
                self._version = None  # our own writes do not move data_version: reload next time
            except sqlite3.IntegrityError:
                self.db.execute("ROLLBACK")
                raise LevanteError(f"team {team!r} already has a key named {name!r}") from None
        return self.key(cur.lastrowid), secret

    def key(self, key_id: int | None) -> Key:
        row = self.db.execute(
            "SELECT id, team, name, hint, monthly_budget, admin, created, revoked FROM keys WHERE id = ?",
            (key_id,),
        ).fetchone()
        if row is None:
            raise LevanteError(f"no key with id {key_id}")
        return Key(*row[:5], bool(row[5]), *row[6:])

    def list_keys(self, team: str | None = None) -> list[Key]:
        ids = self.db.execute(
            "SELECT id FROM keys WHERE ? IS NULL OR team = ? ORDER BY id", (team, team)
        ).fetchall()
        return [self.key(i) for (i,) in ids]

    def revoke(self, key_id: int) -> Key:
        key = self.key(key_id)
        if key.revoked is None:
            with self.lock:
                self.db.execute("UPDATE keys SET revoked = ? WHERE id = ?", (time.time(), key_id))
                self._version = None
        return self.key(key_id)

    def set_key_budget(self, key_id: int, usd: float | None) -> None:
        self.key(key_id)
        check_budget(usd, "budget")
        with self.lock:
            self.db.execute("UPDATE keys SET monthly_budget = ? WHERE id = ?", (usd, key_id))
            self._version = None

    def set_team_budget(self, team: str, usd: float | None) -> None:
        check_budget(usd, "budget")
        with self.lock:
            updated = self.db.execute("UPDATE teams SET monthly_budget = ? WHERE name = ?", (usd, team))
            self._version = None
        if updated.rowcount == 0:
            raise LevanteError(f"no team named {team!r} (teams are created with their first key)")

    def team_budget(self, team: str) -> float | None:
        row = self.db.execute("SELECT monthly_budget FROM teams WHERE name = ?", (team,)).fetchone()
        return row[0] if row else None

    # ---- what the server asks on every request --------------------------------------------------

    def _refresh(self) -> None:
        """Reloads keys, budgets and this month's spend when another connection has committed or a
        new month has begun; otherwise the in-memory copy is current."""
        version = self.db.execute("PRAGMA data_version").fetchone()[0]
        month = month_start(time.time())
        if version == self._version and month == self._month:
            return
        self._version, self._month = version, month
        self._keys = [
            (row[0], Key(*row[1:6], bool(row[6]), *row[7:]))
            for row in self.db.execute(
                "SELECT digest, id, team, name, hint, monthly_budget, admin, created, revoked FROM keys"
            )
        ]
        self._team_budget = dict(self.db.execute("SELECT name, monthly_budget FROM teams"))
        spent = "SELECT {0}, SUM(cost) FROM requests WHERE time >= ? AND {0} IS NOT NULL GROUP BY {0}"
        self._key_spent = dict(self.db.execute(spent.format("key_id"), (month,)))
        self._team_spent = dict(self.db.execute(spent.format("team"), (month,)))

    def has_keys(self) -> bool:
        """Whether requests need a key: once any was made, even if all are revoked since (revoking
        the last key must not open the server to everyone)."""
        with self.lock:
            self._refresh()
            return bool(self._keys)

    def authenticate(self, presented: str) -> Key | None:
        """The key matching `presented` (possibly revoked), or None. Every stored digest is
        compared, in constant time, whatever matched before."""
        wanted = digest(presented)
        found: Key | None = None
        with self.lock:
            self._refresh()
            for stored, key in self._keys:
                if hmac.compare_digest(stored, wanted):
                    found = key
        return found

    def over_budget(self, key: Key) -> str | None:
        """Why `key` may not start another request this month, or None when it may."""
        if key.id is None:
            return None
        with self.lock:
            self._refresh()
            limits = [
                (f"key {key.name!r}", self._key_spent.get(key.id, 0.0), key.monthly_budget),
                (
                    f"team {key.team!r}",
                    self._team_spent.get(key.team or "", 0.0),
                    self._team_budget.get(key.team or ""),
                ),
            ]
        for who, spent, budget in limits:
            if budget is not None and spent >= budget:
                return f"{who} has spent its monthly budget (${spent:.4f} of ${budget:.4f})"
        return None

    def record(self, entry: Entry) -> None:
        """Commits one request's row; its id is the primary key, so a second write of the same
        request fails loudly instead of counting it twice."""
        key = entry.key
        row = (
            entry.request_id,
            entry.time,
            key.id if key else None,
            key.name if key else None,
            key.team if key else None,
            entry.model,
            entry.endpoint,
            entry.prompt_tokens,
            entry.cached_tokens,
            entry.completion_tokens,
            entry.cost,
            entry.latency,
            entry.finish_reason,
        )
        with self.lock:
            self._refresh()
            self.db.execute(f"INSERT INTO requests VALUES ({', '.join('?' * len(row))})", row)
            if key is not None and key.id is not None and entry.time >= self._month:
                self._key_spent[key.id] = self._key_spent.get(key.id, 0.0) + entry.cost
                if key.team is not None:
                    self._team_spent[key.team] = self._team_spent.get(key.team, 0.0) + entry.cost

    def spent(self, key: Key) -> tuple[float, float]:
        """This month's spend of the key and of its team, USD."""
        with self.lock:
            self._refresh()
            return self._key_spent.get(key.id or -1, 0.0), self._team_spent.get(key.team or "", 0.0)

    def team_month(self, team: str) -> tuple[float, float | None]:
        """This month's spend of `team` and its monthly budget (None: no cap), USD."""
        with self.lock:
            self._refresh()
            return self._team_spent.get(team, 0.0), self._team_budget.get(team)

    def timings(self, since: float) -> list[tuple[float, int]]:
        """(latency, completion tokens) of every request since `since`."""
        with self.lock:
            rows = self.db.execute(
                "SELECT latency, completion_tokens FROM requests WHERE time >= ?", (since,)
            ).fetchall()
        return [(r[0], r[1]) for r in rows]

    # ---- reports -------------------------------------------------------------------------------

    def report(
        self, team: str | None = None, since: float | None = None, group: tuple[str, ...] = GROUPS
    ) -> list[dict[str, Any]]:
        """Totals per (day, team, key) — or the coarser grouping asked — with p50 latency and
        throughput (completion tokens per second of request time)."""
        unknown = set(group) - set(GROUPS)
        if unknown or not group:
            raise LevanteError(f"group by any of {', '.join(GROUPS)}; got {', '.join(group) or 'nothing'}")
        with self.lock:
            rows = self.db.execute(
                "SELECT time, team, key_name, prompt_tokens, cached_tokens, completion_tokens, cost, latency "
                "FROM requests WHERE (? IS NULL OR team = ?) AND time >= ? ORDER BY time",
                (team, team, since or 0.0),
            ).fetchall()
        buckets: dict[tuple[str, ...], list[tuple[Any, ...]]] = defaultdict(list)
        for row in rows:
            fields = {
                "day": datetime.fromtimestamp(row[0], UTC).date().isoformat(),
                "team": row[1] or "-",
                "key": row[2] or "-",
            }
            buckets[tuple(fields[g] for g in group)].append(row)
        out = []
        for labels, members in buckets.items():
            latency = sum(r[7] for r in members)
            completion = sum(r[5] for r in members)
            out.append(
                {
                    **dict(zip(group, labels, strict=True)),
                    "requests": len(members),
                    "prompt_tokens": sum(r[3] for r in members),
                    "cached_tokens": sum(r[4] for r in members),
                    "completion_tokens": completion,
                    "cost": sum(r[6] for r in members),
                    "p50_latency": statistics.median(r[7] for r in members),
                    "tokens_per_second": completion / latency if latency > 0 else 0.0,
                }
            )
        return out
