"""The probe: an MQTT client that records what the fleet publishes and sends it commands."""

# Waits take a ``timeout=`` argument on purpose: a test reads better with the limit in the call.
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Self

import aiomqtt

from fleet_agent.errors import PayloadError
from fleet_agent.mqtt import NODELAY
from fleet_agent.protocol import (
    DEFAULT_PREFIX,
    AgentState,
    Command,
    CommandStatus,
    Result,
    Status,
    TopicKind,
    Topics,
    decode_result,
    decode_status,
    encode,
    new_command_id,
)

from fleet_testing.brokers import DEFAULT_TIMEOUT

if TYPE_CHECKING:
    from fleet_testing.brokers import BrokerEndpoint

_MAX_RECORDED_PAYLOAD = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Seen:
    """One message the probe received, decoded when it is a result or a status."""

    index: int
    topic: str
    kind: TopicKind | None
    agent_id: str | None
    retain: bool
    payload: bytes
    message: Result | Status | None

    @property
    def result(self) -> Result | None:
        return self.message if isinstance(self.message, Result) else None

    @property
    def status(self) -> Status | None:
        return self.message if isinstance(self.message, Status) else None


class Probe:
    """An MQTT client that records the fleet's results and statuses, and sends commands.

    Every wait has a timeout and raises AssertionError listing what was seen instead.
    ``since`` (from :meth:`mark`) restricts a wait to messages received after that point.
    """

    def __init__(
        self,
        endpoint: BrokerEndpoint,
        *,
        prefix: str = DEFAULT_PREFIX,
        username: str = "fleet-probe",
        kinds: Sequence[TopicKind] = (TopicKind.RESULT, TopicKind.STATUS),
    ) -> None:
        self.topics = Topics(prefix)
        self.identifier = f"probe-{uuid.uuid4().hex[:12]}"
        self._kinds = kinds
        self._sync_topic = f"fleet-probe/{self.identifier}/sync"
        self._client = aiomqtt.Client(
            endpoint.host,
            endpoint.port,
            identifier=self.identifier,
            username=username,
            clean_session=True,
            socket_options=NODELAY,
            timeout=DEFAULT_TIMEOUT,
        )
        self._seen: list[Seen] = []
        self._sync_tokens: set[bytes] = set()
        self._changed = asyncio.Condition()
        self._reader: asyncio.Task[None] | None = None
        self._lost: BaseException | None = None

    async def __aenter__(self) -> Self:
        await self._client.__aenter__()
        filters = [(self.topics.any_agent(kind), 1) for kind in self._kinds]
        await self._client.subscribe([*filters, (self._sync_topic, 1)])
        self._reader = asyncio.create_task(self._read(), name=f"{self.identifier}-read")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._lost is None:
            await self._client.__aexit__(None, None, None)

    async def _read(self) -> None:
        try:
            async for message in self._client.messages:
                payload = message.payload if isinstance(message.payload, bytes) else b""
                async with self._changed:
                    if message.topic.matches(self._sync_topic):
                        self._sync_tokens.add(payload)
                    else:
                        seen = self._decode(str(message.topic), message.retain, payload)
                        self._seen.append(seen)
                    self._changed.notify_all()
        except aiomqtt.MqttError as exc:
            # Wake every waiter: nothing more will arrive.
            async with self._changed:
                self._lost = exc
                self._changed.notify_all()

    def _decode(self, topic: str, retain: bool, payload: bytes) -> Seen:
        parsed = self.topics.parse(topic)
        decoded: Result | Status | None = None
        with contextlib.suppress(PayloadError):
            if parsed is not None and parsed.kind is TopicKind.RESULT:
                decoded = decode_result(payload, max_bytes=_MAX_RECORDED_PAYLOAD)
            elif parsed is not None and parsed.kind is TopicKind.STATUS:
                decoded = decode_status(payload, max_bytes=_MAX_RECORDED_PAYLOAD)
        return Seen(
            index=len(self._seen),
            topic=topic,
            kind=parsed.kind if parsed else None,
            agent_id=parsed.agent_id if parsed else None,
            retain=retain,
            payload=payload,
            message=decoded,
        )

    # -- what was seen -----------------------------------------------------------------------

    @property
    def seen(self) -> list[Seen]:
        return list(self._seen)

    def mark(self) -> int:
        """A position to pass as ``since``: later waits ignore what was received before it."""
        return len(self._seen)

    def results(self, agent_id: str | None = None, command_id: str | None = None) -> list[Result]:
        """Results received so far, in order, optionally for one agent and one command."""
        return [
            s.result
            for s in self._seen
            if s.result is not None
            and (agent_id is None or s.result.agent == agent_id)
            and (command_id is None or s.result.id == command_id)
        ]

    def statuses_of(self, agent_id: str, command_id: str) -> list[CommandStatus]:
        """The sequence of statuses one agent reported for one command."""
        return [r.status for r in self.results(agent_id, command_id)]

    # -- waiting -----------------------------------------------------------------------------

    async def wait_for(
        self,
        predicate: Callable[[Seen], bool],
        *,
        since: int = 0,
        timeout: float = DEFAULT_TIMEOUT,
        what: str = "matching message",
    ) -> Seen:
        """The first message from ``since`` on that satisfies ``predicate``."""

        def find() -> Seen | None:
            return next((s for s in self._seen[since:] if predicate(s)), None)

        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout), self._changed:
                await self._changed.wait_for(lambda: find() is not None or self._lost is not None)
        found = find()
        if found is None:
            why = f"the probe lost its connection ({self._lost})" if self._lost else "timed out"
            summary = "\n".join(f"  {s.topic}: {s.payload[:300]!r}" for s in self._seen[since:])
            raise AssertionError(
                f"no {what} within {timeout:g}s: {why}; received since #{since}:\n"
                f"{summary or '  nothing'}"
            )
        return found

    async def wait_result(
        self,
        agent_id: str,
        command_id: str,
        status: CommandStatus | None = None,
        *,
        since: int = 0,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> Result:
        """The first result of ``command_id`` from ``agent_id`` (with ``status``, or terminal)."""

        def match(s: Seen) -> bool:
            r = s.result
            return (
                r is not None
                and r.agent == agent_id
                and r.id == command_id
                and (r.status is status if status is not None else r.status.is_terminal)
            )

        what = f"result {status or 'terminal'} of {command_id} from {agent_id}"
        seen = await self.wait_for(match, since=since, timeout=timeout, what=what)
        assert seen.result is not None
        return seen.result

    async def wait_status(
        self,
        agent_id: str,
        state: AgentState,
        *,
        since: int = 0,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> Status:
        """The first presence message of ``agent_id`` saying ``state``."""

        def match(s: Seen) -> bool:
            return s.status is not None and s.status.agent == agent_id and s.status.state is state

        what = f"status {state} from {agent_id}"
        seen = await self.wait_for(match, since=since, timeout=timeout, what=what)
        assert seen.status is not None
        return seen.status

    # -- sending -----------------------------------------------------------------------------

    async def publish(
        self, topic: str, payload: bytes | str | Command, *, qos: int = 1, retain: bool = False
    ) -> None:
        """Publish raw bytes, text or an encoded command (QoS 1: returns once the broker has it)."""
        data = encode(payload) if isinstance(payload, Command) else payload
        await self._client.publish(topic, data, qos=qos, retain=retain)

    async def send(self, agent_id: str, command: Command | str, **fields: Any) -> str:
        """Send a command (a model, or a name plus fields) to one agent; return its id,
        which is generated if the command has none."""
        cmd = with_id(Command(command=command, **fields) if isinstance(command, str) else command)
        await self.publish(self.topics.cmd(agent_id), cmd)
        assert cmd.id is not None
        return cmd.id

    async def broadcast(self, command: Command | str, **fields: Any) -> str:
        """Send a command to every agent of the fleet; return its id."""
        cmd = with_id(Command(command=command, **fields) if isinstance(command, str) else command)
        await self.publish(self.topics.broadcast_cmd, cmd)
        assert cmd.id is not None
        return cmd.id

    async def sync(self, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Return once the broker has routed everything this probe published before.

        Brokers route one client's messages in order, so when a marker published after them
        comes back, they have been delivered to (or queued for) every subscriber.
        """
        token = uuid.uuid4().hex.encode()
        await self._client.publish(self._sync_topic, token, qos=1)
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: token in self._sync_tokens)


def with_id(command: Command) -> Command:
    """``command`` itself if it has an id, else a copy with a fresh one."""
    if command.id is not None:
        return command
    return command.model_copy(update={"id": new_command_id()})
