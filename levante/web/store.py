"""The Spaces store: one SQLite file (WAL) with Spaces, their threads, memory notes, images, sign-in
sessions and what every answer was billed.

Every change to a Space appends a row to `changes`; its rowid is the SSE event id, so a page that
reconnects (after a network blip or a server restart) sends the last id it saw and gets every
message and note changed since, in order. Nothing is kept only in memory: a member's post is
committed before the server answers it."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from levante.errors import LevanteError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS spaces (
    id TEXT PRIMARY KEY,
    team TEXT NOT NULL,
    title TEXT NOT NULL,
    created REAL NOT NULL,
    created_by TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS space_tools (
    space TEXT NOT NULL REFERENCES spaces(id),
    server TEXT NOT NULL,
    PRIMARY KEY (space, server)
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    space TEXT NOT NULL REFERENCES spaces(id),
    role TEXT NOT NULL,
    author TEXT NOT NULL,
    content TEXT NOT NULL,
    images TEXT NOT NULL DEFAULT '[]',
    tool_calls TEXT NOT NULL DEFAULT '[]',
    created REAL NOT NULL,
    status TEXT NOT NULL,
    error TEXT,
    asked_by TEXT,
    asked_in INTEGER,
    model TEXT,
    usage TEXT
);
CREATE INDEX IF NOT EXISTS messages_by_space ON messages (space, id);
CREATE TABLE IF NOT EXISTS notes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    space TEXT NOT NULL REFERENCES spaces(id),
    text TEXT NOT NULL,
    author TEXT NOT NULL,
    status TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS images (
    id TEXT PRIMARY KEY,
    space TEXT NOT NULL REFERENCES spaces(id),
    mime TEXT NOT NULL,
    data BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS charges (
    request_id TEXT PRIMARY KEY,
    space TEXT NOT NULL,
    message INTEGER NOT NULL,
    time REAL NOT NULL,
    asked_by TEXT,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    cost REAL NOT NULL,
    latency REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS charges_by_space ON charges (space, time);
CREATE TABLE IF NOT EXISTS changes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    space TEXT NOT NULL,
    kind TEXT NOT NULL,
    ref INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS changes_by_space ON changes (space, id);
CREATE INDEX IF NOT EXISTS changes_by_object ON changes (kind, ref);
CREATE TABLE IF NOT EXISTS sessions (
    digest TEXT PRIMARY KEY,
    key_id INTEGER,
    key_digest TEXT,
    csrf TEXT NOT NULL,
    created REAL NOT NULL,
    expires REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS settings (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS uptime (
    start REAL PRIMARY KEY,
    last REAL NOT NULL
);
"""

SESSION_SECONDS = 30 * 24 * 3600


@dataclass(frozen=True)
class Change:
    """One SSE event: what changed (`message`, `note`, `note_deleted`, `space`) and its id."""

    id: int
    kind: str
    ref: int


@dataclass(frozen=True)
class Session:
    key_id: int | None  # a `levante keys` key
    key_digest: str | None  # or the server's single --api-key, by digest
    csrf: str


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _message(row: sqlite3.Row) -> dict[str, Any]:
    return {
        "id": row["id"],
        "space": row["space"],
        "role": row["role"],
        "author": row["author"],
        "content": row["content"],
        "images": [f"/web/api/images/{i}" for i in json.loads(row["images"])],
        "tool_calls": json.loads(row["tool_calls"]),
        "created": row["created"],
        "status": row["status"],
        "error": row["error"],
        "asked_by": row["asked_by"],
        "asked_in": row["asked_in"],
        "model": row["model"],
        "usage": json.loads(row["usage"]) if row["usage"] else None,
        "revision": row["revision"],
    }


# a message with its revision: the id of its latest change. A page orders what it hears of a message
# by it: the reply to a post or a regeneration may reach it after the stream said the answer was done
_MESSAGES = (
    "SELECT m.*, (SELECT MAX(c.id) FROM changes c WHERE c.kind = 'message' AND c.ref = m.id) AS revision "
    "FROM messages m"
)


def _note(row: sqlite3.Row) -> dict[str, Any]:
    return {key: row[key] for key in ("id", "text", "author", "status", "created", "updated")}


class Store:
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self.db.row_factory = sqlite3.Row
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("PRAGMA busy_timeout=10000")
            self.db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as e:
            raise LevanteError(f"{path}: cannot open the Spaces store ({e})") from None
        self.lock = threading.RLock()

    def _write(self, sql: str, args: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        with self.lock:
            return self.db.execute(sql, args)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """Writes that land together or not at all (a change and its log entry, a post and its
        answer's row)."""
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    def _changed(self, space: str, kind: str, ref: int) -> None:
        self.db.execute("INSERT INTO changes (space, kind, ref) VALUES (?, ?, ?)", (space, kind, ref))

    def close(self) -> None:
        self.db.close()

    # ---- settings, sessions, uptime -------------------------------------------------------------

    def secret(self, name: str) -> str:
        """A random value made once and kept (e.g. the local workspace's CSRF token, which must
        outlive a restart so an open page keeps working)."""
        row = self.db.execute("SELECT value FROM settings WHERE name = ?", (name,)).fetchone()
        if row is not None:  # asked on every request of a local workspace: a read, not a write
            return row[0]
        with self.lock:
            self.db.execute("INSERT OR IGNORE INTO settings VALUES (?, ?)", (name, secrets.token_urlsafe(32)))
            return self.db.execute("SELECT value FROM settings WHERE name = ?", (name,)).fetchone()[0]

    def open_session(self, key_id: int | None, key_digest: str | None) -> tuple[str, str]:
        """A new session's cookie value and CSRF token; only the cookie's digest is stored."""
        token, csrf, now = secrets.token_urlsafe(32), secrets.token_urlsafe(32), time.time()
        self._write(
            "INSERT INTO sessions VALUES (?, ?, ?, ?, ?, ?)",
            (digest(token), key_id, key_digest, csrf, now, now + SESSION_SECONDS),
        )
        return token, csrf

    def session(self, token: str) -> Session | None:
        row = self.db.execute(
            "SELECT key_id, key_digest, csrf FROM sessions WHERE digest = ? AND expires > ?",
            (digest(token), time.time()),
        ).fetchone()
        return Session(*row) if row else None

    def close_session(self, token: str) -> None:
        self._write("DELETE FROM sessions WHERE digest = ?", (digest(token),))

    def heartbeat(self, start: float) -> None:
        """Marks the server up from `start` until now: the model page's uptime is read from these."""
        self._write(
            "INSERT INTO uptime VALUES (?, ?) ON CONFLICT (start) DO UPDATE SET last = excluded.last",
            (start, time.time()),
        )

    def uptime(self, since: float, now: float) -> float | None:
        """The share of [since, now] — or of the part after the first start — the server was up."""
        rows = self.db.execute("SELECT start, last FROM uptime WHERE last >= ?", (since,)).fetchall()
        first = self.db.execute("SELECT MIN(start) FROM uptime").fetchone()[0]
        if first is None:
            return None
        begin = max(since, first)
        if now <= begin:
            return 1.0
        up = sum(max(0.0, min(last, now) - max(start, begin)) for start, last in rows)
        return min(1.0, up / (now - begin))

    # ---- spaces ---------------------------------------------------------------------------------

    def create_space(self, team: str, title: str, created_by: str) -> dict[str, Any]:
        space = secrets.token_hex(8)
        self._write(
            "INSERT INTO spaces VALUES (?, ?, ?, ?, ?)", (space, team, title, time.time(), created_by)
        )
        found = self.space(space)
        assert found is not None
        return found

    def space(self, space: str) -> dict[str, Any] | None:
        row = self.db.execute(
            "SELECT s.*, (SELECT MAX(created) FROM messages WHERE space = s.id) AS last, "
            "(SELECT json_group_array(server) FROM space_tools WHERE space = s.id) AS mcp "
            "FROM spaces s WHERE id = ?",
            (space,),
        ).fetchone()
        return self._space(row) if row else None

    def spaces(self, team: str | None) -> list[dict[str, Any]]:
        """A team's Spaces, or every team's (None), most recently active first."""
        rows = self.db.execute(
            "SELECT s.*, (SELECT MAX(created) FROM messages WHERE space = s.id) AS last, "
            "(SELECT json_group_array(server) FROM space_tools WHERE space = s.id) AS mcp "
            "FROM spaces s WHERE ? IS NULL OR team = ?",
            (team, team),
        ).fetchall()
        return sorted((self._space(r) for r in rows), key=lambda s: -s["last_activity"])

    @staticmethod
    def _space(row: sqlite3.Row) -> dict[str, Any]:
        return {
            "id": row["id"],
            "team": row["team"],
            "title": row["title"],
            "created": row["created"],
            "created_by": row["created_by"],
            "last_activity": row["last"] or row["created"],
            "mcp": sorted(json.loads(row["mcp"])),  # the MCP servers whose tools its answers may use
        }

    def update_space(
        self, space: str, title: str | None = None, enable: Sequence[str] = (), disable: Sequence[str] = ()
    ) -> dict[str, Any]:
        """Renames a Space, enables and disables MCP servers for it, as one change."""
        with self._transaction():
            if title is not None:
                self.db.execute("UPDATE spaces SET title = ? WHERE id = ?", (title, space))
            self.db.executemany(
                "INSERT OR IGNORE INTO space_tools VALUES (?, ?)", [(space, s) for s in enable]
            )
            self.db.executemany(
                "DELETE FROM space_tools WHERE space = ? AND server = ?", [(space, s) for s in disable]
            )
            self._changed(space, "space", 0)
        found = self.space(space)
        assert found is not None
        return found

    # ---- messages -------------------------------------------------------------------------------

    def post(
        self,
        space: str,
        author: str,
        content: str,
        images: list[tuple[str, bytes]],
        answer: dict[str, Any] | None,
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """A member's message (with its images) and, when it asks the model, the answer's row —
        one transaction, so a post is stored whole or not at all."""
        now = time.time()
        with self._transaction():
            ids = []
            for mime, data in images:
                ids.append(secrets.token_hex(12))
                self.db.execute("INSERT INTO images VALUES (?, ?, ?, ?)", (ids[-1], space, mime, data))
            cur = self.db.execute(
                "INSERT INTO messages (space, role, author, content, images, created, status) "
                "VALUES (?, 'user', ?, ?, ?, ?, 'done')",
                (space, author, content, json.dumps(ids), now),
            )
            asked = cur.lastrowid
            assert asked is not None
            self._changed(space, "message", asked)
            reply = None
            if answer is not None:
                cur = self.db.execute(
                    "INSERT INTO messages (space, role, author, content, created, status, asked_by, "
                    "asked_in, model) VALUES (?, 'assistant', ?, '', ?, 'streaming', ?, ?, ?)",
                    (space, answer["model"], now, author, asked, answer["model"]),
                )
                reply = cur.lastrowid
                assert reply is not None
                self._changed(space, "message", reply)
        return self.message(asked), self.message(reply) if reply is not None else None

    def message(self, message_id: int) -> dict[str, Any]:
        row = self.db.execute(f"{_MESSAGES} WHERE m.id = ?", (message_id,)).fetchone()
        if row is None:
            raise KeyError(message_id)
        return _message(row)

    def messages(self, space: str, before: int | None = None) -> list[dict[str, Any]]:
        rows = self.db.execute(
            f"{_MESSAGES} WHERE m.space = ? AND (? IS NULL OR m.id < ?) ORDER BY m.id",
            (space, before, before),
        ).fetchall()
        return [_message(r) for r in rows]

    def update_answer(self, message_id: int, **fields: Any) -> dict[str, Any]:
        """Sets an answer's status, content, error, usage, tool calls or asker, as one change."""
        encoded = {k: json.dumps(v) if k in ("usage", "tool_calls") else v for k, v in fields.items()}
        with self._transaction():
            assignments = ", ".join(f"{k} = ?" for k in encoded)
            self.db.execute(
                f"UPDATE messages SET {assignments} WHERE id = ?", (*encoded.values(), message_id)
            )
            space = self.db.execute("SELECT space FROM messages WHERE id = ?", (message_id,)).fetchone()[0]
            self._changed(space, "message", message_id)
        return self.message(message_id)

    def orphaned_answers(self) -> list[int]:
        """Answers left streaming by a server that stopped mid-answer."""
        return [r[0] for r in self.db.execute("SELECT id FROM messages WHERE status = 'streaming'")]

    def image(self, image_id: str) -> tuple[str, str, bytes] | None:
        """(space, mime type, bytes) of an uploaded image."""
        row = self.db.execute("SELECT space, mime, data FROM images WHERE id = ?", (image_id,)).fetchone()
        return (row[0], row[1], bytes(row[2])) if row else None

    def data_url(self, image_id: str) -> str:
        found = self.image(image_id)
        assert found is not None
        return f"data:{found[1]};base64,{base64.b64encode(found[2]).decode()}"

    # ---- memory ---------------------------------------------------------------------------------

    def add_note(self, space: str, text: str, author: str, status: str = "pinned") -> dict[str, Any]:
        now = time.time()
        with self._transaction():
            cur = self.db.execute(
                "INSERT INTO notes (space, text, author, status, created, updated) VALUES (?, ?, ?, ?, ?, ?)",
                (space, text, author, status, now, now),
            )
            assert cur.lastrowid is not None
            self._changed(space, "note", cur.lastrowid)
        return self.note(cur.lastrowid)

    def note(self, note_id: int) -> dict[str, Any]:
        row = self.db.execute("SELECT * FROM notes WHERE id = ?", (note_id,)).fetchone()
        if row is None:
            raise KeyError(note_id)
        return {**_note(row), "space": row["space"]}

    def notes(self, space: str, status: str | None = None) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT * FROM notes WHERE space = ? AND (? IS NULL OR status = ?) ORDER BY id",
            (space, status, status),
        ).fetchall()
        return [_note(r) for r in rows]

    def update_note(self, note_id: int, text: str | None = None, status: str | None = None) -> dict[str, Any]:
        with self._transaction():
            self.db.execute(
                "UPDATE notes SET text = COALESCE(?, text), status = COALESCE(?, status), updated = ? "
                "WHERE id = ?",
                (text, status, time.time(), note_id),
            )
            space = self.db.execute("SELECT space FROM notes WHERE id = ?", (note_id,)).fetchone()[0]
            self._changed(space, "note", note_id)
        return self.note(note_id)

    def delete_note(self, note_id: int) -> None:
        with self._transaction():
            space = self.db.execute("SELECT space FROM notes WHERE id = ?", (note_id,)).fetchone()[0]
            self.db.execute("DELETE FROM notes WHERE id = ?", (note_id,))
            self._changed(space, "note_deleted", note_id)

    # ---- events and money -----------------------------------------------------------------------

    def cursor(self, space: str) -> int:
        """The id of the Space's latest change: where a page that just loaded it listens from."""
        row = self.db.execute("SELECT MAX(id) FROM changes WHERE space = ?", (space,)).fetchone()
        return row[0] or 0

    def changes(self, space: str, after: int) -> list[Change]:
        """What changed in the Space after event `after`, each object once at its latest change."""
        rows = self.db.execute(
            "SELECT MAX(id), kind, ref FROM changes WHERE space = ? AND id > ? GROUP BY kind, ref ORDER BY 1",
            (space, after),
        ).fetchall()
        return [Change(*r) for r in rows]

    def charge(self, request_id: str, space: str, message: int, asked_by: str, usage: dict[str, Any]) -> None:
        """What one answer (or regeneration) was billed — the amount the ledger recorded for it."""
        self._write(
            "INSERT INTO charges VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                request_id,
                space,
                message,
                time.time(),
                asked_by,
                usage["prompt_tokens"],
                usage["completion_tokens"],
                usage["cost"],
                usage["latency"],
            ),
        )

    def space_spent(self, space: str, since: float) -> float:
        row = self.db.execute(
            "SELECT SUM(cost) FROM charges WHERE space = ? AND time >= ?", (space, since)
        ).fetchone()
        return row[0] or 0.0

    def team_spent(self, team: str, since: float) -> float:
        """What a team's Space answers cost since `since`, for a server with no ledger."""
        row = self.db.execute(
            "SELECT SUM(c.cost) FROM charges c JOIN spaces s ON s.id = c.space "
            "WHERE s.team = ? AND c.time >= ?",
            (team, since),
        ).fetchone()
        return row[0] or 0.0

    def answer_timings(self, since: float) -> list[tuple[float, int]]:
        """(latency, completion tokens) of every answer since `since`, for a server with no ledger."""
        rows = self.db.execute(
            "SELECT latency, completion_tokens FROM charges WHERE time >= ?", (since,)
        ).fetchall()
        return [(r[0], r[1]) for r in rows]
