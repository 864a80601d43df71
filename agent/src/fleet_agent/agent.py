"""The agent: receives commands over MQTT, runs each one once, and reports back.

Life of a command on the agent:
    payload -> decode -> ledger.claim (durable, 'queued') -> `received`
            -> slot free -> ledger.start ('running') -> `running` -> handler
            -> ledger.finish (final result, unpublished) -> outbox -> PUBACK -> published
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Self

import aiomqtt
from pydantic import BaseModel, ValidationError

from fleet_agent import __version__
from fleet_agent.builtins import BUILTINS, host_facts
from fleet_agent.errors import CommandError, PayloadError
from fleet_agent.ledger import Ledger
from fleet_agent.mqtt import Backoff, SessionFlag, make_client, stay_connected
from fleet_agent.policy import Policy
from fleet_agent.protocol import (
    BROADCAST,
    CANCEL,
    AgentState,
    CancelArgs,
    Command,
    CommandStatus,
    Result,
    Status,
    TopicKind,
    Topics,
    decode_command_fields,
    describe_validation_error,
    encode,
    new_command_id,
    utcnow,
)
from fleet_agent.registry import CommandSpec, Context, Outcome, Registry
from fleet_agent.signing import Verifier, WarningBudget

if TYPE_CHECKING:
    from datetime import datetime
    from types import TracebackType

    from fleet_agent.settings import AgentSettings

log = logging.getLogger("fleet_agent")

_OUTBOX_WINDOW = 64
_FLUSH_SECONDS = 5.0
SHUTDOWN_INTERRUPTED = "interrupted: the agent shut down before the command finished"


def build_registry(settings: AgentSettings) -> Registry:
    """Built-in commands, then entry points, then the modules named in the settings."""
    registry = Registry()
    registry.extend(BUILTINS)
    registry.load_entry_points()
    for module in settings.command_modules:
        registry.load_module(module)
    return registry


class Agent:
    """An async context manager that keeps an agent connected and serving until it exits.

    Leaving the context is a graceful shutdown: running commands get ``shutdown_grace``
    seconds, results are flushed, and an explicit offline status is published.
    """

    def __init__(self, settings: AgentSettings, *, registry: Registry | None = None) -> None:
        self.settings = settings
        self.id = settings.agent_id
        self.registry = registry if registry is not None else build_registry(settings)
        self.topics = Topics(settings.prefix)
        self.policy = Policy(
            enabled=settings.enabled_commands,
            run_allow=settings.run_allow,
            env_allow=settings.run_env_allow,
        )
        self.online = asyncio.Event()
        """Set while connected, subscribed and announced; cleared on connection loss."""
        self.started_at = utcnow()
        self._state_dir = settings.resolved_state_dir
        self._ledger: Ledger | None = None
        self._slots = asyncio.Semaphore(settings.max_concurrent)
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._outbox: deque[Result] = deque()
        self._outbox_ready = asyncio.Event()
        self._outbox_empty = asyncio.Event()
        self._stopping = False
        self._closing = asyncio.Event()
        self._client: aiomqtt.Client | None = None
        self._session_flag: SessionFlag | None = None
        self._inbox_idle = asyncio.Event()
        self._inbox_idle.set()
        self._canceling: dict[str, str] = {}
        """Command id -> why, for tasks being cancelled on request."""
        self._connection: asyncio.Task[None] | None = None
        self._verifier = Verifier.for_settings(settings)
        self._refusals = WarningBudget(log)
        self._unrecorded: set[int] = set()
        """ids of outbox results that are not in the ledger (refusals of unverified input)."""

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self._state_dir.mkdir(parents=True, exist_ok=True)
        self._ledger = Ledger(
            self._state_dir / "ledger.sqlite3",
            retention=timedelta(days=self.settings.ledger_retention_days),
        )
        pruned = self._ledger.prune()
        if pruned:
            log.debug("forgot %d old ledger entries", pruned)
        recovery = self._ledger.recover(self.id)
        for result in recovery.interrupted:
            log.warning("command %s was running when the agent stopped: reported failed", result.id)
        self._outbox.extend(self._ledger.unpublished())
        self._wake_outbox()
        for command in recovery.queued:
            log.info("resuming queued command %s (%s)", command.id, command.command)
            self._accept(command)
        will = aiomqtt.Will(
            self.topics.status(self.id),
            encode(Status(agent=self.id, state=AgentState.OFFLINE, reason="connection lost")),
            qos=1,
            retain=True,
        )
        self._client = make_client(
            self.settings, identifier=self.id, username=self.settings.mqtt_username, will=will
        )
        self._session_flag = SessionFlag(self._client)
        backoff = Backoff(self.settings.reconnect_min, self.settings.reconnect_max)
        self._connection = asyncio.create_task(
            stay_connected(
                self._client,
                self._session,
                backoff=backoff,
                log=log,
                on_disconnect=self.online.clear,
            ),
            name=f"fleet-agent-{self.id}-mqtt",
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.shutdown()

    async def shutdown(self) -> None:
        """Stop taking new work, let running commands finish (bounded), flush, say goodbye."""
        if self._stopping:
            return
        self._stopping = True
        running = [t for t in self._tasks.values() if not t.done()]
        if running:
            log.info(
                "waiting up to %.0fs for %d command(s)", self.settings.shutdown_grace, len(running)
            )
            _, pending = await asyncio.wait(running, timeout=self.settings.shutdown_grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self.online.is_set() and self._outbox:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._outbox_empty.wait(), _FLUSH_SECONDS)
        self._closing.set()
        assert self._connection is not None
        if self.online.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._connection), _FLUSH_SECONDS)
        self._connection.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._connection
        self._save_unread_messages()
        assert self._ledger is not None
        self._ledger.close()
        log.info("agent %s stopped", self.id)

    async def kill(self) -> None:
        """Drop the connection without a goodbye, as a crash would (for tests and demos)."""
        self._stopping = True
        for task in self._tasks.values():
            task.cancel()
        if self._connection is not None:
            self._connection.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._connection
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        if self._ledger is not None:
            self._ledger.close()

    # -- connection ------------------------------------------------------------------------

    async def _session(self, client: aiomqtt.Client) -> None:
        await client.subscribe([(self.topics.cmd(self.id), 1), (self.topics.broadcast_cmd, 1)])
        await client.publish(self.topics.status(self.id), encode(self._birth()), qos=1, retain=True)
        self.online.set()
        log.info("agent %s online; commands: %s", self.id, ", ".join(self.commands()))
        async with asyncio.TaskGroup() as tg:
            reader = tg.create_task(self._read(client), name=f"fleet-agent-{self.id}-read")
            outbox = tg.create_task(self._drain_outbox(client), name=f"fleet-agent-{self.id}-out")
            await self._closing.wait()
            goodbye = Status(
                agent=self.id, state=AgentState.OFFLINE, reason="shutdown", at=utcnow()
            )
            await client.publish(self.topics.status(self.id), encode(goodbye), qos=1, retain=True)
            reader.cancel()
            outbox.cancel()
        self.online.clear()

    def commands(self) -> list[str]:
        """The commands this agent accepts: registered and enabled, plus cancel."""
        return sorted([*(n for n in self.registry.names() if self.policy.allows(n)), CANCEL])

    def _birth(self) -> Status:
        return Status(
            agent=self.id,
            state=AgentState.ONLINE,
            version=__version__,
            commands=self.commands(),
            started_at=self.started_at,
            host=dict(host_facts()),
            session_present=self._session_flag.present if self._session_flag else None,
            at=utcnow(),
        )

    async def _read(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            self._on_message(message)
            # New commands start only once everything already received is handled, so a
            # cancel queued right behind its command (agent offline) stops it from starting.
            if len(client.messages) == 0:
                self._inbox_idle.set()
            else:
                self._inbox_idle.clear()

    def _save_unread_messages(self) -> None:
        """Messages the client acknowledged but nobody read yet are claimed, never dropped."""
        if self._client is None:
            return
        queue = self._client._queue  # private: aiomqtt exposes no drain
        while not queue.empty():
            self._on_message(queue.get_nowait())

    # -- inbound ---------------------------------------------------------------------------

    def _on_message(self, message: aiomqtt.Message) -> None:
        """Never raises: bad input becomes a `rejected` result and the agent keeps serving."""
        parsed = self.topics.parse(str(message.topic))
        if (
            parsed is None
            or parsed.kind is not TopicKind.CMD
            or parsed.agent_id not in (self.id, BROADCAST)
        ):
            # amqtt sends retained messages matching *any* client's subscription on connect.
            log.debug(
                "ignored a message on %s: not one of this agent's command topics", message.topic
            )
            return
        payload = message.payload
        if not isinstance(payload, bytes | bytearray):
            payload = str(payload).encode() if payload is not None else b""
        # With a public key, nothing unverified may enter the ledger: a forged payload
        # reusing the id of a genuine command must not stop that command from running.
        verified = self._verifier is None
        try:
            command, fields = decode_command_fields(
                bytes(payload), max_bytes=self.settings.max_payload_bytes
            )
        except PayloadError as exc:
            warn = log.warning if verified else self._refusals.warn
            warn("rejected payload on %s: %s", message.topic, exc.reason)
            self._reject(exc.command_id, exc.command, exc.reason, record=verified)
            return
        if self._verifier is not None:
            refusal = self._verifier.refusal(str(message.topic), command, fields, utcnow())
            if refusal is not None:
                self._refusals.warn("refused %s on %s: %s", command.id, message.topic, refusal)
                self._reject(command.id, command.command, refusal, record=False)
                return
        if command.id is None:
            command = command.model_copy(update={"id": new_command_id()})
        self._accept(command)

    def _accept(self, command: Command) -> None:
        assert command.id is not None and self._ledger is not None
        if command.id in self._tasks:
            log.debug("duplicate delivery of %s ignored: it is in progress", command.id)
            return
        entry = self._ledger.get(command.id)
        if entry is not None and entry.final is not None:
            log.info("duplicate delivery of %s: republishing its result", command.id)
            self._emit(entry.final)
            return
        now = utcnow()
        if command.is_expired(now):
            self._finish(command, CommandStatus.EXPIRED, now, error="expired before it arrived")
            return
        if command.command == CANCEL:
            self._cancel(command, now)
            return
        spec = self.registry.get(command.command)
        if spec is not None and not self.policy.allows(command.command):
            self._reject(command.id, command.command, self.policy.refusal(command.command))
            return
        if spec is None:
            reason = f"unknown command {command.command!r}; this agent supports: " + ", ".join(
                self.commands()
            )
            self._reject(command.id, command.command, reason)
            return
        try:
            args = spec.args_model.model_validate(command.args)
        except ValidationError as exc:
            detail = describe_validation_error(exc)
            self._reject(command.id, command.command, f"invalid args: {detail}")
            return
        vetted, refusal = self.policy.vet(command.command, args)
        if vetted is None:
            self._reject(command.id, command.command, refusal or "refused by policy")
            return
        args = vetted
        if entry is None:
            self._ledger.claim(command.id, command.command, encode(command).decode())
        self._emit(
            Result(
                id=command.id,
                agent=self.id,
                command=command.command,
                status=CommandStatus.RECEIVED,
                received_at=now,
            )
        )
        self._tasks[command.id] = asyncio.create_task(
            self._execute(command, spec, args, now), name=f"fleet-agent-{self.id}-cmd-{command.id}"
        )

    def _reject(
        self, command_id: str | None, name: str | None, reason: str, *, record: bool = True
    ) -> None:
        assert self._ledger is not None
        if command_id is not None:
            if command_id in self._tasks:
                warn = log.warning if record else self._refusals.warn
                warn("ignored a bad payload reusing the id of running command %s", command_id)
                return
            entry = self._ledger.get(command_id)
            if entry is not None:
                # Never overwrite what is recorded under an id: answer with what we know.
                if entry.final is not None:
                    self._emit(entry.final)
                return
        result = Result(
            id=command_id or new_command_id(),
            agent=self.id,
            command=name,
            status=CommandStatus.REJECTED,
            error=reason,
            finished_at=utcnow(),
        )
        if record:
            self._store_final(result)
        else:
            self._unrecorded.add(id(result))
            self._emit(result)

    def _cancel(self, command: Command, now: datetime) -> None:
        """Cancel another command: a queued one is skipped, a running one is killed, one
        that has not arrived yet is recorded as canceled so that it never runs."""
        assert command.id is not None and self._ledger is not None
        try:
            target = CancelArgs.model_validate(command.args).command_id
        except ValidationError as exc:
            self._reject(command.id, CANCEL, f"invalid args: {describe_validation_error(exc)}")
            return
        self._ledger.claim(command.id, CANCEL, encode(command).decode())
        reason = f"canceled by {command.id}"
        task = self._tasks.get(target)
        entry = None if task is not None else self._ledger.get(target)
        if task is not None:
            self._canceling[target] = reason
            task.cancel()
            outcome = "canceled"
        elif entry is None:
            self._store_final(
                Result(
                    id=target,
                    agent=self.id,
                    status=CommandStatus.CANCELED,
                    error=reason + " before it arrived",
                    finished_at=now,
                )
            )
            outcome = "canceled before it arrived"
        elif entry.final is not None:
            outcome = f"already {entry.final.status.value}"
        else:
            outcome = "not running"
        log.info("cancel %s of %s: %s", command.id, target, outcome)
        self._finish(
            command,
            CommandStatus.SUCCEEDED,
            now,
            output={"command_id": target, "outcome": outcome},
        )

    # -- execution -------------------------------------------------------------------------

    async def _execute(
        self, command: Command, spec: CommandSpec[Any], args: BaseModel, received_at: datetime
    ) -> None:
        assert command.id is not None and self._ledger is not None
        started_at: datetime | None = None
        try:
            # Yield once so that commands accepted earlier, already parked on the event,
            # take their slots first: starts stay in arrival order.
            await asyncio.sleep(0)
            await self._inbox_idle.wait()
            async with self._slots:
                if self._stopping:
                    return  # stays 'queued' in the ledger and runs at the next start
                if command.is_expired():
                    self._finish(
                        command,
                        CommandStatus.EXPIRED,
                        received_at,
                        error="expired while waiting for a free slot",
                    )
                    return
                self._ledger.start(command.id)
                started_at = utcnow()
                self._emit(
                    Result(
                        id=command.id,
                        agent=self.id,
                        command=command.command,
                        status=CommandStatus.RUNNING,
                        received_at=received_at,
                        started_at=started_at,
                    )
                )
                await self._run_handler(command, spec, args, received_at, started_at)
        except asyncio.CancelledError:
            reason = self._canceling.pop(command.id, None)
            if reason is None:
                raise
            self._finish(
                command, CommandStatus.CANCELED, received_at, started_at=started_at, error=reason
            )
        finally:
            self._tasks.pop(command.id, None)

    async def _run_handler(
        self,
        command: Command,
        spec: CommandSpec[Any],
        args: BaseModel,
        received_at: datetime,
        started_at: datetime,
    ) -> None:
        assert command.id is not None
        ctx = Context(
            agent_id=self.id,
            command_id=command.id,
            state_dir=self._state_dir,
            max_output_bytes=self.settings.max_output_bytes,
        )
        limit = command.timeout or self.settings.default_timeout
        t0 = time.monotonic()
        deadline = asyncio.timeout(limit)
        try:
            async with deadline:
                outcome = await spec.handler(args, ctx)
            if not isinstance(outcome, Outcome):
                raise TypeError(f"handler returned {type(outcome).__name__}, not Outcome")
        except TimeoutError as exc:
            if not deadline.expired():
                self._finish(
                    command,
                    CommandStatus.FAILED,
                    received_at,
                    started_at=started_at,
                    error=f"TimeoutError: {exc}",
                )
                return
            self._finish(
                command,
                CommandStatus.TIMED_OUT,
                received_at,
                started_at=started_at,
                error=f"timed out after {limit:g}s; the process group was killed"
                if command.command == "run"
                else f"timed out after {limit:g}s",
            )
            return
        except CommandError as exc:
            self._finish(
                command,
                CommandStatus.FAILED,
                received_at,
                started_at=started_at,
                error=str(exc),
                exit_code=exc.exit_code,
            )
            return
        except asyncio.CancelledError:
            if command.id in self._canceling:
                raise  # canceled on request: _execute reports it
            self._finish(
                command,
                CommandStatus.FAILED,
                received_at,
                started_at=started_at,
                error=SHUTDOWN_INTERRUPTED,
            )
            raise
        except Exception as exc:
            log.exception("command %s (%s) crashed", command.id, command.command)
            self._finish(
                command,
                CommandStatus.FAILED,
                received_at,
                started_at=started_at,
                error=f"{type(exc).__name__}: {exc}",
            )
            return
        log.debug("command %s (%s) took %.3fs", command.id, command.command, time.monotonic() - t0)
        try:
            self._finish(
                command,
                CommandStatus.SUCCEEDED if outcome.ok else CommandStatus.FAILED,
                received_at,
                started_at=started_at,
                exit_code=outcome.exit_code,
                output=outcome.output,
                error=outcome.error,
            )
        except ValidationError as exc:
            self._finish(
                command,
                CommandStatus.FAILED,
                received_at,
                started_at=started_at,
                error=f"the handler's output is not JSON: {describe_validation_error(exc)}",
            )

    def _finish(
        self,
        command: Command,
        status: CommandStatus,
        received_at: datetime,
        *,
        started_at: datetime | None = None,
        exit_code: int | None = None,
        output: Any = None,
        error: str | None = None,
    ) -> None:
        assert command.id is not None
        self._store_final(
            Result(
                id=command.id,
                agent=self.id,
                command=command.command,
                status=status,
                exit_code=exit_code,
                output=output,
                error=error,
                received_at=received_at,
                started_at=started_at,
                finished_at=utcnow(),
            )
        )

    # -- outbound --------------------------------------------------------------------------

    def _store_final(self, result: Result) -> None:
        assert self._ledger is not None
        self._ledger.finish(result)
        self._emit(result)

    def _emit(self, result: Result) -> None:
        self._outbox.append(result)
        self._wake_outbox()

    def _wake_outbox(self) -> None:
        if self._outbox:
            self._outbox_empty.clear()
            self._outbox_ready.set()

    async def _drain_outbox(self, client: aiomqtt.Client) -> None:
        """Publish results in order as soon as they exist, up to a window of unacknowledged
        ones; each leaves the outbox only once the broker acknowledged it (after a lost
        connection, everything still in the outbox is sent again)."""
        assert self._ledger is not None
        topic = self.topics.result(self.id)
        inflight: deque[asyncio.Task[None]] = deque()
        sent = asyncio.Event()
        async with asyncio.TaskGroup() as tg:

            async def send() -> None:
                while True:
                    if len(inflight) >= len(self._outbox) or len(inflight) >= _OUTBOX_WINDOW:
                        self._outbox_ready.clear()
                        await self._outbox_ready.wait()
                        continue
                    result = self._outbox[len(inflight)]
                    # Tasks start in creation order, so results leave in outbox order.
                    inflight.append(tg.create_task(client.publish(topic, encode(result), qos=1)))
                    sent.set()

            tg.create_task(send(), name=f"fleet-agent-{self.id}-send")
            while True:
                if not inflight:
                    if not self._outbox:
                        self._outbox_empty.set()
                    sent.clear()
                    await sent.wait()
                    continue
                await inflight[0]
                inflight.popleft()
                result = self._outbox.popleft()
                if id(result) in self._unrecorded:
                    self._unrecorded.discard(id(result))
                elif result.status.is_terminal:
                    self._ledger.mark_published([result.id])
                self._outbox_ready.set()
