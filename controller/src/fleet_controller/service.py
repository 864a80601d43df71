"""Dispatch: turn an HTTP request into recorded, published commands, and wait on them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fleet_agent.protocol import (
    CANCEL,
    AgentState,
    Command,
    Topics,
    new_command_id,
    utcnow,
)
from fleet_controller.errors import BrokerUnavailable, InvalidCommand, NotFound, UnknownAgents
from fleet_controller.models import AgentPublic, Caller, CommandCreate, CommandDetail, Source
from fleet_controller.store import NewCommand, agent_key

if TYPE_CHECKING:
    from fleet_controller.hub import Hub
    from fleet_controller.link import Link
    from fleet_controller.settings import ControllerSettings
    from fleet_controller.store import Store

log = logging.getLogger(__name__)
audit = logging.getLogger("fleet_controller.audit")


@dataclass
class Dispatcher:
    settings: ControllerSettings
    store: Store
    link: Link
    hub: Hub
    _background: set[asyncio.Task[int]] = field(default_factory=set)

    @property
    def topics(self) -> Topics:
        return self.link.topics

    async def dispatch(self, request: CommandCreate, caller: Caller) -> CommandDetail:
        """Record the command with the agents expected to answer, then publish it."""
        if not self.link.connected.is_set():
            raise BrokerUnavailable(
                "the controller is not connected to the MQTT broker; nothing was sent"
            )
        known = set(await self.store.agent_ids())
        if request.is_broadcast:
            agents = sorted(known)
        else:
            agents = [request.target] if isinstance(request.target, str) else list(request.target)
            unknown = [a for a in agents if a not in known]
            if unknown and not request.allow_unknown:
                raise UnknownAgents(unknown)
        ttl = request.ttl or self.settings.default_ttl
        if self.settings.signing_key is not None and ttl > self.settings.signed_max_ttl:
            raise InvalidCommand(
                f"ttl {ttl:g}s is longer than signed_max_ttl ({self.settings.signed_max_ttl:g}s):"
                " agents refuse signed commands that expire further ahead than their ledger"
                " remembers ids"
            )
        record = NewCommand(
            id=new_command_id(),
            command=request.command,
            args=dict(request.args),
            target=request.target,
            source=Source.HTTP,
            timeout=request.timeout,
            ttl=ttl,
            created_at=utcnow(),
            sent_by=caller,
        )
        wire = Command(
            id=record.id,
            command=record.command,
            args=request.args,
            timeout=record.timeout,
            expires_at=record.expires_at,
        )
        size = len(self.link.encode(self.topics.broadcast_cmd, wire))
        if size > self.settings.max_payload_bytes:
            raise InvalidCommand(
                f"args: the command is {size} bytes once encoded; agents accept at most"
                f" {self.settings.max_payload_bytes} (max_payload_bytes)"
            )
        await self.store.create_command(record, agents)
        audit.info(
            "audit: command %s (%s) to %s sent by %s",
            record.id,
            record.command,
            "all" if request.is_broadcast else ",".join(agents),
            caller.describe(),
        )
        try:
            if request.is_broadcast:
                await self.link.publish(self.topics.broadcast_cmd, wire)
                self.store.record_published(record.id, None)
            else:
                await asyncio.gather(*(self._publish_one(wire, agent) for agent in agents))
        except BrokerUnavailable as exc:
            raise BrokerUnavailable(
                f"{exc}; command {record.id} is recorded and stays pending until it expires"
                f" at {record.expires_at.isoformat()}"
            ) from exc
        detail = await self.store.get_command(record.id)
        assert detail is not None
        return detail

    async def _publish_one(self, wire: Command, agent: str) -> None:
        assert wire.id is not None
        await self.link.publish(self.topics.cmd(agent), wire)
        self.store.record_published(wire.id, [agent])

    async def redeliver(self, agent_id: str | None = None, *, due_only: bool = False) -> int:
        """Publish again what agents have not acknowledged; the agent's ledger makes a
        duplicate harmless. Returns how many deliveries were sent."""
        if not self.link.connected.is_set():
            return 0
        if due_only:
            pending = await self.store.due_redeliveries(interval=self.settings.redeliver_interval)
        else:
            pending = await self.store.undelivered(agent_id)
        sent = 0
        for item in pending:
            try:
                await self.link.publish(self.topics.cmd(item.agent_id), item.command)
            except BrokerUnavailable:
                break
            assert item.command.id is not None
            await self.store.mark_sent(item.command.id, [item.agent_id])
            sent += 1
        if sent:
            log.info("sent %d unacknowledged command(s) again", sent)
        return sent

    def on_birth(self, agent_id: str, session_present: bool | None) -> None:
        """An agent whose broker session is gone lost its queue: send it again now."""
        if session_present:
            return
        task = asyncio.create_task(
            self.redeliver(agent_id), name=f"fleet-controller-redeliver-{agent_id}"
        )
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def cancel(self, command_id: str, caller: Caller) -> CommandDetail:
        """Tell every agent that has not finished the command to cancel it."""
        if not self.link.connected.is_set():
            raise BrokerUnavailable("the controller is not connected to the MQTT broker")
        cancel_id = new_command_id()
        agents = await self.store.cancel(command_id, f"canceled by {cancel_id}", caller)
        if agents is None:
            raise NotFound(f"no command with id {command_id!r}")
        audit.info(
            "audit: command %s canceled (on %d agent(s)) by %s",
            command_id,
            len(agents),
            caller.describe(),
        )
        if agents:
            record = NewCommand(
                id=cancel_id,
                command=CANCEL,
                args={"command_id": command_id},
                target=agents,
                source=Source.HTTP,
                timeout=None,
                ttl=self.settings.default_ttl,
                created_at=utcnow(),
                sent_by=caller,
            )
            await self.store.create_command(record, agents)
            wire = Command(
                id=cancel_id,
                command=CANCEL,
                args={"command_id": command_id},
                expires_at=record.expires_at,
            )
            await asyncio.gather(*(self._publish_one(wire, agent) for agent in agents))
        self.hub.notify([command_id])
        return await self.get(command_id)

    async def get(self, command_id: str) -> CommandDetail:
        detail = await self.store.get_command(command_id)
        if detail is None:
            raise NotFound(f"no command with id {command_id!r}")
        return detail

    async def agent(
        self, agent_id: str, *, wait: float = 0, until: AgentState = AgentState.ONLINE
    ) -> AgentPublic | None:
        """The agent, waiting up to ``wait`` seconds for it to be known and in state ``until``."""
        deadline = time.monotonic() + wait
        with self.hub.watch(agent_key(agent_id)) as changed:
            while True:
                changed.clear()
                found = await self.store.list_agents(
                    broker_up=self.link.connected.is_set(), agent_id=agent_id
                )
                remaining = deadline - time.monotonic()
                if (found and found[0].state == until.value) or remaining <= 0:
                    return found[0] if found else None
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):
                        await changed.wait()

    async def changes(
        self, disconnected: Callable[[], Awaitable[bool]], allowed: Callable[[], bool]
    ) -> AsyncIterator[str]:
        """Server-sent events: `change` when anything changed (coalesced), comments to keep
        the connection alive, until the client goes away or ``allowed`` turns false (its
        token was revoked): then one `revoked` event ends the stream."""
        with self.hub.watch() as changed:
            yield "event: ready\ndata: {}\n\n"
            while not await disconnected():
                if not allowed():
                    yield "event: revoked\ndata: {}\n\n"
                    return
                if await _heartbeat_or_change(changed):
                    changed.clear()
                    yield "event: change\ndata: {}\n\n"
                else:
                    yield ": keep-alive\n\n"

    async def wait(
        self, command_id: str, seconds: float, *, after: str | None = None
    ) -> CommandDetail:
        """The command once every expected agent is terminal (or, with ``after``, once its
        version differs from ``after``), or as it stands after ``seconds``. A command not
        recorded yet (sent by someone else over MQTT) is waited for too."""
        deadline = time.monotonic() + seconds
        with self.hub.watch(command_id) as changed:
            while True:
                changed.clear()
                progress = await self.store.progress(command_id)
                remaining = deadline - time.monotonic()
                if progress is not None:
                    complete, version = progress
                    if complete or (after is not None and version != after) or remaining <= 0:
                        return await self.get(command_id)
                elif remaining <= 0:
                    raise NotFound(f"no command with id {command_id!r}")
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):
                        await changed.wait()


HEARTBEAT_SECONDS = 15.0


async def _heartbeat_or_change(changed: asyncio.Event) -> bool:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(HEARTBEAT_SECONDS):
            await changed.wait()
            return True
    return False


async def sweep_forever(dispatcher: Dispatcher) -> None:
    """End deliveries whose deadline has passed, so no command stays open forever."""
    settings = dispatcher.settings
    while True:
        try:
            expired = await dispatcher.store.sweep(
                grace=settings.sweep_grace, agent_timeout=settings.agent_timeout
            )
        except Exception:
            log.exception("sweeping expired commands failed; will retry")
        else:
            if expired:
                log.info("expired unanswered deliveries of %d command(s)", len(expired))
                dispatcher.hub.notify(expired)
        try:
            await dispatcher.redeliver(due_only=True)
        except Exception:
            log.exception("sending unacknowledged commands again failed; will retry")
        await asyncio.sleep(settings.sweep_interval)
