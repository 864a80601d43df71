"""The controller's store: commands, per-agent deliveries and agents, in SQLite.

One connection, used from the event loop (statements take microseconds; WAL mode with
synchronous=NORMAL means commits do not wait for the disk, and no torn write can corrupt the
database). Writes
that arrive from the broker are queued and applied in batches, one transaction (one fsync)
per batch: a thousand results arriving together cost a handful of commits, not a thousand.
The :class:`Store` protocol is what the rest of the controller sees, so another backend
(PostgreSQL) can implement it later.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Protocol, Self, TypeVar

from fleet_agent.protocol import (
    BROADCAST,
    AgentState,
    Command,
    CommandStatus,
    Result,
    Status,
    utcnow,
)
from fleet_controller.models import (
    AgentPublic,
    AgentResult,
    Aggregate,
    Caller,
    CallerKind,
    CommandDetail,
    CommandPage,
    CommandSummary,
    Source,
)
from fleet_controller.schema import SCHEMA_VERSION, migrate

log = logging.getLogger(__name__)

T = TypeVar("T")

RANK = {
    CommandStatus.PENDING: 0,
    CommandStatus.RECEIVED: 1,
    CommandStatus.RUNNING: 2,
}
TERMINAL_RANK = 3
SWEPT_ERROR = "no answer from the agent before the command's deadline"
# What an agent says first about a command it was given: only these may introduce an id.
_FIRST_WORDS = frozenset({CommandStatus.RECEIVED, CommandStatus.REJECTED, CommandStatus.EXPIRED})
REDELIVERY_CAP_SECONDS = 300.0


def agent_key(agent_id: str) -> str:
    """The key under which changes to an agent are announced (command ids never contain '@')."""
    return "@" + agent_id


def _rank(status: CommandStatus) -> int:
    return RANK.get(status, TERMINAL_RANK)


@dataclass(frozen=True, slots=True)
class NewCommand:
    id: str
    command: str
    args: dict[str, Any]
    target: str | list[str]
    source: Source
    timeout: float | None
    ttl: float
    created_at: datetime
    sent_by: Caller | None = None

    @property
    def expires_at(self) -> datetime:
        return self.created_at + timedelta(seconds=self.ttl)


@dataclass(frozen=True, slots=True)
class Redelivery:
    """A command to publish (again) to one agent that has not acknowledged it."""

    command: Command
    agent_id: str


class Store(Protocol):
    async def __aenter__(self) -> Self: ...
    async def __aexit__(self, *exc: object) -> None: ...
    async def create_command(self, command: NewCommand, agents: Iterable[str]) -> None: ...
    def record_result(self, result: Result) -> None: ...
    def record_status(self, status: Status) -> None: ...
    def record_published(self, command_id: str, agents: Iterable[str] | None) -> None: ...
    def record_foreign_command(
        self, command: Command, target: str, agents: list[str] | None
    ) -> None: ...
    def record_adhoc(
        self, target: str, command: str | None, expires_at: datetime | None
    ) -> None: ...
    async def flush(self) -> None: ...
    async def undelivered(self, agent_id: str | None = None) -> list[Redelivery]: ...
    async def due_redeliveries(self, *, interval: float) -> list[Redelivery]: ...
    async def mark_sent(self, command_id: str, agents: Iterable[str]) -> None: ...
    async def cancel(
        self, command_id: str, reason: str, by: Caller | None = None
    ) -> list[str] | None: ...
    @property
    def dropped_results(self) -> int: ...
    async def get_command(self, command_id: str) -> CommandDetail | None: ...
    async def progress(self, command_id: str) -> tuple[bool, str] | None: ...
    async def list_commands(
        self,
        *,
        agent: str | None,
        status: CommandStatus | None,
        since: datetime | None,
        cursor: int | None,
        limit: int,
    ) -> CommandPage: ...
    async def agent_ids(self) -> list[str]: ...
    async def list_agents(
        self, *, broker_up: bool, agent_id: str | None = None
    ) -> list[AgentPublic]: ...
    async def delete_agent(self, agent_id: str) -> bool: ...
    async def sweep(self, *, grace: float, agent_timeout: float) -> set[str]: ...

    async def check_writable(self) -> bool: ...


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _dt(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


class SQLiteStore:
    """:class:`Store` on SQLite (WAL mode, batched writes)."""

    def __init__(
        self,
        path: Path,
        *,
        batch_max: int = 1000,
        on_commit: Callable[[set[str]], None] | None = None,
    ) -> None:
        self.path = path
        self._batch_max = batch_max
        self._on_commit = on_commit
        self._db: sqlite3.Connection | None = None
        self._queue: list[tuple[str, Any]] = []
        self._queued = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._writer: asyncio.Task[None] | None = None
        self._dropped_results = 0
        self._unwritable = 0

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self._call(self._open)
        self._writer = asyncio.create_task(self._write_loop(), name="fleet-store-writer")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.flush()
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
        await self._call(self._close)

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA foreign_keys=ON")
        migrate(db)
        self._db = db
        log.info("store %s ready (schema %d)", self.path, SCHEMA_VERSION)

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        # Inline on the event loop: these statements take microseconds, while a worker
        # thread costs a GIL hand-over (up to the 5 ms switch interval) on every call.
        return fn(*args)

    @property
    def db(self) -> sqlite3.Connection:
        assert self._db is not None, "store is not open"
        return self._db

    # -- batched writes --------------------------------------------------------------------

    def _enqueue(self, op: str, data: Any) -> None:
        self._queue.append((op, data))
        self._idle.clear()
        self._queued.set()

    def record_result(self, result: Result) -> None:
        self._enqueue("result", (result, utcnow()))

    def record_status(self, status: Status) -> None:
        self._enqueue("status", (status, utcnow()))

    def record_published(self, command_id: str, agents: Iterable[str] | None) -> None:
        """The broker acknowledged the command (for ``agents``, or every delivery if None)."""
        self._enqueue("published", (command_id, None if agents is None else list(agents), utcnow()))

    def record_foreign_command(
        self, command: Command, target: str, agents: list[str] | None
    ) -> None:
        """A command someone else published straight to the broker (``agents`` None: all
        agents known now)."""
        self._enqueue("foreign", (command, target, agents, utcnow()))

    def record_adhoc(self, target: str, command: str | None, expires_at: datetime | None) -> None:
        """Someone published a command without an id (or one that does not parse): the
        agents' answers will carry ids nobody announced; remember to accept them."""
        self._enqueue("adhoc", (target, command, expires_at, utcnow()))

    @property
    def dropped_results(self) -> int:
        """Results refused because no known command matches them (forged or stray)."""
        return self._dropped_results + self._unwritable

    async def flush(self) -> None:
        """Wait until every queued write is committed."""
        await self._idle.wait()

    async def _write_loop(self) -> None:
        while True:
            await self._queued.wait()
            batch, self._queue = self._queue[: self._batch_max], self._queue[self._batch_max :]
            if not self._queue:
                self._queued.clear()
            try:
                touched = await self._call(self._apply, batch)
            except sqlite3.Error:
                log.exception("store write of %d records failed; retrying", len(batch))
                self._queue[:0] = batch
                await asyncio.sleep(1.0)
                continue
            except Exception:
                log.exception("store write of %d records failed; they are dropped", len(batch))
                self._unwritable += len(batch)
                touched = set()
            if not self._queue:
                self._idle.set()
            if self._on_commit is not None and touched:
                self._on_commit(touched)

    def _apply(self, batch: list[tuple[str, Any]]) -> set[str]:
        touched: set[str] = set()
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            for op, data in batch:
                # Each record in a savepoint: one that cannot be written (a value SQLite
                # refuses, a bug) is logged and skipped, and the rest of the batch lands.
                db.execute("SAVEPOINT record")
                try:
                    touched |= self._apply_one(op, data)
                except Exception:
                    db.execute("ROLLBACK TO record")
                    self._unwritable += 1
                    log.exception("dropped a %s record that could not be stored", op)
                db.execute("RELEASE record")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return touched

    def _apply_one(self, op: str, data: Any) -> set[str]:
        """Apply one queued record; the keys (command ids, agent keys) it changed."""
        if op == "result":
            command_id = self._apply_result(*data)
            return {command_id} if command_id is not None else set()
        if op == "adhoc":
            self._apply_adhoc(*data)
            return set()
        if op == "status":
            return {agent_key(self._apply_status(*data))}
        if op == "published":
            return {self._apply_published(*data)}
        if op == "foreign":
            return {self._apply_foreign(*data)}
        raise ValueError(f"unknown store operation {op!r}")

    def _apply_result(self, r: Result, seen: datetime) -> str | None:
        db = self.db
        row = db.execute("SELECT target FROM commands WHERE id = ?", (r.id,)).fetchone()
        if row is None:
            target = self._claim_adhoc(r, seen)
            if target is None:
                return self._drop(r, "no such command")
            expires = seen + timedelta(hours=1)
            db.execute(
                "INSERT INTO commands (id, command, args, target, source, timeout, ttl,"
                " created_at, expires_at) VALUES (?, ?, '{}', ?, 'mqtt', NULL, ?, ?, ?)",
                (
                    r.id, r.command or "?", json.dumps(target), 3600.0,
                    _iso(r.received_at or seen), _iso(expires),
                ),
            )  # fmt: skip
        elif (
            json.loads(row[0]) != BROADCAST
            and not db.execute(
                "SELECT 1 FROM deliveries WHERE command_id = ? AND agent_id = ?", (r.id, r.agent)
            ).fetchone()
        ):
            return self._drop(r, "the agent is not a target of that command")
        rank = _rank(r.status)
        output = json.dumps(r.output) if r.output is not None else None
        db.execute(
            "INSERT INTO deliveries (command_id, agent_id, status, rank, exit_code, output, error,"
            " received_at, started_at, finished_at, updated_at, swept)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0)"
            " ON CONFLICT (command_id, agent_id) DO UPDATE SET"
            "  status = excluded.status, rank = excluded.rank,"
            "  exit_code = excluded.exit_code, output = excluded.output, error = excluded.error,"
            "  received_at = COALESCE(deliveries.received_at, excluded.received_at),"
            "  started_at = COALESCE(excluded.started_at, deliveries.started_at),"
            "  finished_at = excluded.finished_at, updated_at = excluded.updated_at, swept = 0"
            " WHERE excluded.rank > deliveries.rank"
            "  OR (deliveries.swept = 1 AND excluded.rank = 3)",
            (
                r.id, r.agent, r.status.value, rank, r.exit_code, output, r.error,
                _iso(r.received_at), _iso(r.started_at), _iso(r.finished_at), _iso(seen),
            ),
        )  # fmt: skip
        db.execute("UPDATE agents SET last_seen = ? WHERE id = ?", (_iso(seen), r.agent))
        if r.command == "ping" and r.status is CommandStatus.SUCCEEDED:
            row = db.execute(
                "SELECT published_at FROM deliveries WHERE command_id = ? AND agent_id = ?",
                (r.id, r.agent),
            ).fetchone()
            if row and row[0]:
                latency = (seen - datetime.fromisoformat(row[0])).total_seconds() * 1000
                db.execute("UPDATE agents SET latency_ms = ? WHERE id = ?", (latency, r.agent))
        return r.id

    def _drop(self, r: Result, why: str) -> str | None:
        self._dropped_results += 1
        log.warning("dropped a %s result from %s for %s: %s", r.status.value, r.agent, r.id, why)
        return None

    def _claim_adhoc(self, r: Result, seen: datetime) -> str | None:
        """The target of a recent id-less command this result answers, if any."""
        if r.status not in _FIRST_WORDS:
            return None
        row = self.db.execute(
            "SELECT seq, target FROM adhoc WHERE target IN (?, ?) AND command IS ?"
            " AND expires_at > ? ORDER BY seq LIMIT 1",
            (r.agent, BROADCAST, r.command, _iso(seen)),
        ).fetchone()
        if row is None:
            return None
        if row[1] != BROADCAST:  # one agent answers once; a broadcast is answered by many
            self.db.execute("DELETE FROM adhoc WHERE seq = ?", (row[0],))
        return str(row[1])

    def _apply_adhoc(
        self, target: str, command: str | None, expires_at: datetime | None, seen: datetime
    ) -> None:
        self.db.execute(
            "INSERT INTO adhoc (target, command, seen_at, expires_at) VALUES (?, ?, ?, ?)",
            (target, command, _iso(seen), _iso(expires_at or seen + timedelta(hours=1))),
        )

    def _apply_status(self, s: Status, seen: datetime) -> str:
        online = s.state is AgentState.ONLINE
        self.db.execute(
            "INSERT INTO agents (id, state, offline_reason, last_seen, connected_since, started_at,"
            " version, commands, host, first_seen) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (id) DO UPDATE SET state = excluded.state,"
            "  offline_reason = excluded.offline_reason,"
            "  last_seen = MAX(agents.last_seen, excluded.last_seen),"
            "  connected_since = excluded.connected_since,"
            "  started_at = COALESCE(excluded.started_at, agents.started_at),"
            "  version = COALESCE(excluded.version, agents.version),"
            "  commands = CASE WHEN excluded.commands = '[]' THEN agents.commands"
            "   ELSE excluded.commands END,"
            "  host = CASE WHEN excluded.host = '{}' THEN agents.host ELSE excluded.host END",
            (
                s.agent,
                s.state.value,
                None if online else (s.reason or "offline"),
                _iso(seen),
                _iso(s.at or seen) if online else None,
                _iso(s.started_at),
                s.version,
                json.dumps(s.commands),
                json.dumps(s.host),
                _iso(seen),
            ),
        )
        return s.agent

    def _apply_published(self, command_id: str, agents: list[str] | None, seen: datetime) -> str:
        if agents is None:
            self.db.execute(
                "UPDATE deliveries SET published_at = ?"
                " WHERE command_id = ? AND published_at IS NULL",
                (_iso(seen), command_id),
            )
        else:
            self.db.executemany(
                "UPDATE deliveries SET published_at = ? WHERE command_id = ? AND agent_id = ?"
                " AND published_at IS NULL",
                [(_iso(seen), command_id, a) for a in agents],
            )
        return command_id

    def _apply_foreign(
        self, c: Command, target: str, agents: list[str] | None, seen: datetime
    ) -> str:
        assert c.id is not None
        expires = c.expires_at or seen + timedelta(hours=1)
        cur = self.db.execute(
            "INSERT OR IGNORE INTO commands (id, command, args, target, source, timeout, ttl,"
            " created_at, expires_at) VALUES (?, ?, ?, ?, 'mqtt', ?, ?, ?, ?)",
            (
                c.id, c.command, json.dumps(c.args), json.dumps(target), c.timeout,
                max((expires - seen).total_seconds(), 0.0), _iso(seen), _iso(expires),
            ),
        )  # fmt: skip
        if cur.rowcount == 0:
            # Ours (echoed back by the broker), or a result got here first: fill in the blanks.
            self.db.execute(
                "UPDATE commands SET args = ?, timeout = ?, target = ?, expires_at = ?"
                " WHERE id = ? AND source = 'mqtt' AND ttl = 0",
                (json.dumps(c.args), c.timeout, json.dumps(target), _iso(expires), c.id),
            )
            return c.id
        if agents is None:
            agents = [r[0] for r in self.db.execute("SELECT id FROM agents")]
        self._insert_pending(c.id, agents, seen, published=True)
        return c.id

    def _insert_pending(
        self, command_id: str, agents: Iterable[str], now: datetime, *, published: bool
    ) -> None:
        self.db.executemany(
            "INSERT OR IGNORE INTO deliveries (command_id, agent_id, status, rank, published_at,"
            " updated_at, swept) VALUES (?, ?, 'pending', 0, ?, ?, 0)",
            [(command_id, a, _iso(now) if published else None, _iso(now)) for a in agents],
        )

    # -- direct writes ---------------------------------------------------------------------

    async def create_command(self, command: NewCommand, agents: Iterable[str]) -> None:
        """Durably record a new command and its expected agents before it is published."""
        await self._call(self._create_command, command, list(agents))

    def _create_command(self, c: NewCommand, agents: list[str]) -> None:
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute(
                "INSERT INTO commands (id, command, args, target, source, timeout, ttl,"
                " created_at, expires_at, sent_by) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    c.id, c.command, json.dumps(c.args), json.dumps(c.target), c.source.value,
                    c.timeout, c.ttl, _iso(c.created_at), _iso(c.expires_at),
                    _caller_json(c.sent_by),
                ),
            )  # fmt: skip
            self._insert_pending(c.id, agents, c.created_at, published=False)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    async def delete_agent(self, agent_id: str) -> bool:
        return await self._call(self._delete_agent, agent_id)

    def _delete_agent(self, agent_id: str) -> bool:
        return self.db.execute("DELETE FROM agents WHERE id = ?", (agent_id,)).rowcount > 0

    async def sweep(self, *, grace: float, agent_timeout: float) -> set[str]:
        """End deliveries nobody will answer any more as `expired`; returns the command ids.

        A pending delivery ends when the ttl passes; one the agent received or started gets
        the execution time on top, since the agent may legitimately still be working.
        """
        return await self._call(self._sweep, utcnow(), grace, agent_timeout)

    def _sweep(self, now: datetime, grace: float, agent_timeout: float) -> set[str]:
        db = self.db
        rows = db.execute(
            "SELECT d.command_id, d.agent_id, d.rank, c.expires_at, COALESCE(c.timeout, ?)"
            " FROM deliveries d JOIN commands c ON c.id = d.command_id WHERE d.rank < 3",
            (agent_timeout,),
        ).fetchall()
        db.execute("DELETE FROM adhoc WHERE expires_at <= ?", (_iso(now),))
        due = []
        for command_id, agent_id, rank, expires_at, timeout in rows:
            try:
                deadline = datetime.fromisoformat(expires_at) + timedelta(seconds=grace)
                if rank > 0:
                    deadline += timedelta(seconds=timeout)
            except OverflowError:
                continue  # expires after the end of the calendar: never
            if deadline <= now:
                due.append((command_id, agent_id))
        if not due:
            return set()
        db.execute("BEGIN IMMEDIATE")
        db.executemany(
            "UPDATE deliveries SET status = 'expired', rank = 3, swept = 1, error = ?,"
            " finished_at = ?, updated_at = ? WHERE command_id = ? AND agent_id = ? AND rank < 3",
            [(SWEPT_ERROR, _iso(now), _iso(now), c, a) for c, a in due],
        )
        db.execute("COMMIT")
        return {c for c, _ in due}

    # -- redelivery and cancel -------------------------------------------------------------

    _REDELIVERY_SELECT = (
        "SELECT c.id, c.command, c.args, c.timeout, c.expires_at, d.agent_id, d.attempts,"
        " COALESCE(d.last_sent_at, d.published_at), d.published_at, a.state, a.connected_since,"
        " d.rank, d.updated_at"
        " FROM deliveries d JOIN commands c ON c.id = d.command_id"
        " LEFT JOIN agents a ON a.id = d.agent_id"
        " WHERE c.source = 'http' AND (d.rank = 0 AND c.expires_at > ? OR d.rank IN (1, 2))"
    )

    async def undelivered(self, agent_id: str | None = None) -> list[Redelivery]:
        """Commands this controller sent that ``agent_id`` (or anyone) has not acknowledged
        with `received`, oldest first, while their ttl lasts."""
        return await self._call(self._undelivered, agent_id)

    def _undelivered(self, agent_id: str | None) -> list[Redelivery]:
        sql = (
            self._REDELIVERY_SELECT
            + " AND d.rank = 0"
            + (" AND d.agent_id = ?" if agent_id else "")
        )
        params: tuple[Any, ...] = (_iso(utcnow()), agent_id) if agent_id else (_iso(utcnow()),)
        return [_redelivery(row) for row in self.db.execute(sql + " ORDER BY c.seq", params)]

    async def due_redeliveries(self, *, interval: float) -> list[Redelivery]:
        """Unacknowledged deliveries worth sending again: never published (the broker was
        down), or sent to an agent that has been online for a while without answering
        (the broker lost the message), with exponential backoff per delivery."""
        return await self._call(self._due_redeliveries, interval)

    def _due_redeliveries(self, interval: float) -> list[Redelivery]:
        now = utcnow()
        due = []
        for row in self.db.execute(self._REDELIVERY_SELECT + " ORDER BY c.seq", (_iso(now),)):
            attempts, last_sent, published, state, since = row[6], row[7], row[8], row[9], row[10]
            rank, updated = row[11], row[12]
            if published is None:
                due.append(_redelivery(row))
                continue
            if state != "online" or since is None:
                continue  # an offline agent gets its queue when it comes back
            # Pending: the broker may have lost it. Received or running: its final result
            # may have been lost (the agent answers a duplicate with the stored result).
            reference = last_sent if rank == 0 else max(last_sent, updated)
            wait = timedelta(seconds=min(interval * 2**attempts, REDELIVERY_CAP_SECONDS))
            settled = datetime.fromisoformat(since) + timedelta(seconds=interval)
            if datetime.fromisoformat(reference) + wait <= now and settled <= now:
                due.append(_redelivery(row))
        return due

    async def mark_sent(self, command_id: str, agents: Iterable[str]) -> None:
        await self._call(self._mark_sent, command_id, list(agents))

    def _mark_sent(self, command_id: str, agents: list[str]) -> None:
        now = _iso(utcnow())
        self.db.execute("BEGIN IMMEDIATE")
        self.db.executemany(
            "UPDATE deliveries SET attempts = attempts + 1, last_sent_at = ?,"
            " published_at = COALESCE(published_at, ?) WHERE command_id = ? AND agent_id = ?",
            [(now, now, command_id, a) for a in agents],
        )
        self.db.execute("COMMIT")

    async def cancel(
        self, command_id: str, reason: str, by: Caller | None = None
    ) -> list[str] | None:
        """Agents whose delivery is not terminal yet (None: no such command). Those that
        never acknowledged it are marked canceled now, provisionally: if an agent runs it
        anyway, its own result replaces this one. ``by`` is recorded as who canceled it."""
        return await self._call(self._cancel, command_id, reason, by)

    def _cancel(self, command_id: str, reason: str, by: Caller | None) -> list[str] | None:
        db = self.db
        if not db.execute("SELECT 1 FROM commands WHERE id = ?", (command_id,)).fetchone():
            return None
        open_agents = [
            r[0]
            for r in db.execute(
                "SELECT agent_id FROM deliveries WHERE command_id = ? AND rank < 3"
                " ORDER BY agent_id",
                (command_id,),
            )
        ]
        now = _iso(utcnow())
        db.execute("BEGIN IMMEDIATE")
        db.execute(
            "UPDATE deliveries SET status = 'canceled', rank = 3, swept = 1, error = ?,"
            " finished_at = ?, updated_at = ? WHERE command_id = ? AND rank = 0",
            (reason, now, now, command_id),
        )
        if by is not None and open_agents:
            # The first cancel that had something to cancel is the one on record.
            db.execute(
                "UPDATE commands SET canceled_by = ? WHERE id = ? AND canceled_by IS NULL",
                (_caller_json(by), command_id),
            )
        db.execute("COMMIT")
        return open_agents

    async def check_writable(self) -> bool:
        try:
            await self._call(self._touch)
        except sqlite3.Error:
            return False
        return True

    def _touch(self) -> None:
        self.db.execute(
            "INSERT INTO meta (key, value) VALUES ('ready_check', ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (_iso(utcnow()),),
        )

    # -- reads -----------------------------------------------------------------------------

    async def get_command(self, command_id: str) -> CommandDetail | None:
        return await self._call(self._get_command, command_id)

    async def progress(self, command_id: str) -> tuple[bool, str] | None:
        """(complete, version) of a command, cheaply; None if it is not recorded."""
        return await self._call(self._progress, command_id)

    def _progress(self, command_id: str) -> tuple[bool, str] | None:
        row = self.db.execute(
            "SELECT COUNT(*), COALESCE(SUM(rank < 3), 0), COALESCE(SUM(rank), 0)"
            " FROM deliveries WHERE command_id = ?",
            (command_id,),
        ).fetchone()
        if (
            row[0] == 0
            and not self.db.execute("SELECT 1 FROM commands WHERE id = ?", (command_id,)).fetchone()
        ):
            return None
        return row[1] == 0, f"{row[0]}.{row[2]}"

    def _get_command(self, command_id: str) -> CommandDetail | None:
        row = self.db.execute(_COMMAND_COLUMNS + " WHERE id = ?", (command_id,)).fetchone()
        if row is None:
            return None
        deliveries = self.db.execute(
            "SELECT agent_id, status, exit_code, output, error, published_at, received_at,"
            " started_at, finished_at, updated_at FROM deliveries WHERE command_id = ?"
            " ORDER BY agent_id",
            (command_id,),
        ).fetchall()
        results = [_agent_result(d) for d in deliveries]
        summary = _summary(row, [r.status for r in results])
        return CommandDetail(
            **summary.model_dump(),
            args=json.loads(row[3]),
            timeout=row[6],
            ttl=row[7],
            agents=[r.agent for r in results],
            results=results,
            sent_by=_sent_by(row),
            canceled_by=Caller.model_validate_json(row[11]) if row[11] else None,
        )

    async def list_commands(
        self,
        *,
        agent: str | None = None,
        status: CommandStatus | None = None,
        since: datetime | None = None,
        cursor: int | None = None,
        limit: int = 50,
    ) -> CommandPage:
        return await self._call(self._list_commands, agent, status, since, cursor, limit)

    def _list_commands(
        self,
        agent: str | None,
        status: CommandStatus | None,
        since: datetime | None,
        cursor: int | None,
        limit: int,
    ) -> CommandPage:
        where: list[str] = []
        params: list[object] = []
        if agent is not None or status is not None:
            sub: list[str] = ["d.command_id = c.id"]
            sub_params: list[object] = []
            if agent is not None:
                sub.append("d.agent_id = ?")
                sub_params.append(agent)
            if status is not None:
                sub.append("d.status = ?")
                sub_params.append(status.value)
            where.append(f"EXISTS (SELECT 1 FROM deliveries d WHERE {' AND '.join(sub)})")
            params.extend(sub_params)
        if since is not None:
            where.append("c.created_at >= ?")
            params.append(_iso(since))
        if cursor is not None:
            where.append("c.seq < ?")
            params.append(cursor)
        clause = (" WHERE " + " AND ".join(where)) if where else ""
        rows = self.db.execute(
            _COMMAND_COLUMNS.replace("FROM commands", "FROM commands c")
            + clause
            + " ORDER BY c.seq DESC LIMIT ?",
            (*params, limit + 1),
        ).fetchall()
        more = len(rows) > limit
        rows = rows[:limit]
        items = []
        for row in rows:
            statuses = [
                CommandStatus(s)
                for (s,) in self.db.execute(
                    "SELECT status FROM deliveries WHERE command_id = ?", (row[1],)
                )
            ]
            items.append(_summary(row, statuses))
        return CommandPage(items=items, next_cursor=str(rows[-1][0]) if more and rows else None)

    async def agent_ids(self) -> list[str]:
        return await self._call(
            lambda: [r[0] for r in self.db.execute("SELECT id FROM agents ORDER BY id")]
        )

    async def list_agents(
        self, *, broker_up: bool, agent_id: str | None = None
    ) -> list[AgentPublic]:
        return await self._call(self._list_agents, broker_up, agent_id)

    def _list_agents(self, broker_up: bool, agent_id: str | None) -> list[AgentPublic]:
        rows = self.db.execute(
            "SELECT id, state, offline_reason, last_seen, connected_since, started_at, version,"
            " commands, host, latency_ms, first_seen FROM agents"
            + (" WHERE id = ?" if agent_id is not None else "")
            + " ORDER BY id",
            (agent_id,) if agent_id is not None else (),
        ).fetchall()
        return [
            AgentPublic(
                id=r[0],
                online=broker_up and r[1] == "online",
                state=r[1],
                offline_reason=r[2],
                last_seen=r[3],
                connected_since=r[4] if r[1] == "online" else None,
                started_at=r[5],
                version=r[6],
                commands=json.loads(r[7]),
                host=json.loads(r[8]),
                latency_ms=r[9],
                first_seen=r[10],
            )
            for r in rows
        ]


_COMMAND_COLUMNS = (
    "SELECT seq, id, command, args, target, source, timeout, ttl, created_at, expires_at,"
    " sent_by, canceled_by FROM commands"
)


def _caller_json(caller: Caller | None) -> str | None:
    return caller.model_dump_json(exclude_none=True) if caller is not None else None


def _sent_by(row: tuple[Any, ...]) -> Caller:
    if row[10]:
        return Caller.model_validate_json(row[10])
    if row[5] == Source.MQTT.value:
        return Caller(kind=CallerKind.MQTT)
    return Caller(kind=CallerKind.UNRECORDED)


def _redelivery(row: tuple[Any, ...]) -> Redelivery:
    command = Command(
        id=row[0],
        command=row[1],
        args=json.loads(row[2]),
        timeout=row[3],
        expires_at=datetime.fromisoformat(row[4]),
    )
    return Redelivery(command=command, agent_id=row[5])


def _agent_result(d: tuple[Any, ...]) -> AgentResult:
    started, finished = _dt(d[7]), _dt(d[8])
    return AgentResult(
        agent=d[0],
        status=CommandStatus(d[1]),
        exit_code=d[2],
        output=json.loads(d[3]) if d[3] is not None else None,
        error=d[4],
        published_at=_dt(d[5]),
        received_at=_dt(d[6]),
        started_at=started,
        finished_at=finished,
        duration_s=(finished - started).total_seconds() if started and finished else None,
        updated_at=_dt(d[9]) or utcnow(),
    )


def aggregate(statuses: list[CommandStatus]) -> tuple[Aggregate, bool]:
    if not statuses:
        return Aggregate.NO_TARGETS, True
    if all(s.is_terminal for s in statuses):
        if all(s is CommandStatus.SUCCEEDED for s in statuses):
            return Aggregate.SUCCEEDED, True
        if all(s in (CommandStatus.SUCCEEDED, CommandStatus.CANCELED) for s in statuses):
            return Aggregate.CANCELED, True
        return Aggregate.FAILED, True
    if all(s is CommandStatus.PENDING for s in statuses):
        return Aggregate.PENDING, False
    return Aggregate.IN_PROGRESS, False


def _summary(row: tuple[Any, ...], statuses: list[CommandStatus]) -> CommandSummary:
    status, complete = aggregate(statuses)
    counts: dict[str, int] = {}
    for s in statuses:
        counts[s.value] = counts.get(s.value, 0) + 1
    version = f"{len(statuses)}.{sum(_rank(s) for s in statuses)}"
    return CommandSummary(
        version=version,
        id=row[1],
        command=row[2],
        target=json.loads(row[4]),
        source=Source(row[5]),
        created_at=row[8],
        expires_at=row[9],
        status=status,
        complete=complete,
        expected=len(statuses),
        counts=counts,
    )
