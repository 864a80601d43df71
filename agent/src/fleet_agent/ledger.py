"""The agent's on-disk ledger: which command ids it holds, their final results, and which
of those results the broker has not acknowledged yet (the outbox).

SQLite from the standard library, in WAL mode: one small durable write per state change,
no extra dependency on the device.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

from fleet_agent.protocol import Command, CommandStatus, Result, encode, utcnow

if TYPE_CHECKING:
    from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS commands (
    id          TEXT PRIMARY KEY,
    command     TEXT NOT NULL,
    state       TEXT NOT NULL,          -- 'queued', 'running', then the final status
    payload     TEXT,                   -- the Command as JSON, to resume it if still queued
    result      TEXT,                   -- the final Result as JSON
    published   INTEGER NOT NULL DEFAULT 0,
    received_at TEXT NOT NULL,
    updated_at  TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS commands_unpublished ON commands (published) WHERE published = 0;
CREATE INDEX IF NOT EXISTS commands_updated ON commands (updated_at);
"""

INTERRUPTED = "interrupted: the agent stopped while the command was running"


@dataclass(frozen=True, slots=True)
class Recovery:
    queued: list[Command]
    """Accepted but never started: safe to run now."""
    interrupted: list[Result]
    """Were running when the previous process died: now `failed`, never run again."""


@dataclass(frozen=True, slots=True)
class Entry:
    id: str
    command: str
    final: Result | None


class Ledger:
    """Remembers every command id the agent accepted, so none runs twice."""

    def __init__(self, path: Path, *, retention: timedelta = timedelta(days=7)) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._retention = retention

    def close(self) -> None:
        self._db.close()

    def get(self, command_id: str) -> Entry | None:
        row = self._db.execute(
            "SELECT id, command, result FROM commands WHERE id = ?", (command_id,)
        ).fetchone()
        if row is None:
            return None
        final = Result.model_validate_json(row[2]) if row[2] else None
        return Entry(row[0], row[1], final)

    def claim(self, command_id: str, command: str, payload: str) -> bool:
        """Record that the agent holds ``command_id``; False if it was already recorded."""
        now = utcnow().isoformat()
        cur = self._db.execute(
            "INSERT OR IGNORE INTO commands (id, command, state, payload, received_at, updated_at)"
            " VALUES (?, ?, 'queued', ?, ?, ?)",
            (command_id, command, payload, now, now),
        )
        return cur.rowcount == 1

    def start(self, command_id: str) -> None:
        """From here on the command may have side effects: it will never run again."""
        self._db.execute(
            "UPDATE commands SET state = 'running', updated_at = ? WHERE id = ?",
            (utcnow().isoformat(), command_id),
        )

    def finish(self, result: Result) -> None:
        """Store the final result, unpublished until :meth:`mark_published`."""
        self._db.execute(
            "INSERT INTO commands (id, command, state, result, published, received_at, updated_at)"
            " VALUES (?, ?, ?, ?, 0, ?, ?)"
            " ON CONFLICT (id) DO UPDATE SET state = excluded.state, result = excluded.result,"
            " published = 0, updated_at = excluded.updated_at",
            (
                result.id,
                result.command or "",
                result.status.value,
                encode(result).decode(),
                utcnow().isoformat(),
                utcnow().isoformat(),
            ),
        )

    def mark_published(self, command_ids: Iterable[str]) -> None:
        with self._transaction():
            self._db.executemany(
                "UPDATE commands SET published = 1 WHERE id = ?", ((i,) for i in command_ids)
            )

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def unpublished(self) -> list[Result]:
        """Final results the broker has not acknowledged, oldest first."""
        rows = self._db.execute(
            "SELECT result FROM commands WHERE published = 0 AND result IS NOT NULL"
            " ORDER BY updated_at"
        ).fetchall()
        return [Result.model_validate_json(r[0]) for r in rows]

    def recover(self, agent_id: str) -> Recovery:
        """Sort what a previous process left open: queued commands resume; commands that
        were running are closed as `failed` (interrupted), since they may have had effects."""
        now = utcnow()
        queued = [
            Command.model_validate_json(row[0])
            for row in self._db.execute(
                "SELECT payload FROM commands WHERE state = 'queued' ORDER BY rowid"
            )
        ]
        rows = self._db.execute(
            "SELECT id, command, received_at FROM commands WHERE state = 'running'"
        ).fetchall()
        results = []
        for command_id, command, received_at in rows:
            result = Result(
                id=command_id,
                agent=agent_id,
                command=command or None,
                status=CommandStatus.FAILED,
                error=INTERRUPTED,
                received_at=received_at,
                finished_at=now,
            )
            self.finish(result)
            results.append(result)
        return Recovery(queued=queued, interrupted=results)

    def prune(self) -> int:
        """Forget published entries older than the retention period."""
        cutoff = (utcnow() - self._retention).isoformat()
        cur = self._db.execute(
            "DELETE FROM commands WHERE published = 1 AND updated_at < ?", (cutoff,)
        )
        return cur.rowcount
