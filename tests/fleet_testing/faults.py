"""Network faults for chaos and soak tests: a TCP proxy in front of the broker that cuts,
stalls or refuses the fleet's connections, and an agent whose ``online`` event can be watched
going down as well as up."""

# Waits take a ``timeout=`` argument on purpose: a test reads better with the limit in the call.
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator, Callable
from typing import Any, Self

from fleet_agent.agent import Agent

from fleet_testing.agents import AgentRunner
from fleet_testing.brokers import DEFAULT_TIMEOUT, BrokerEndpoint

_CHUNK = 64 * 1024
_HOLD_LIMIT = 1024 * 1024
"""Bytes a stalled direction buffers before it stops reading, so TCP pushes back the sender."""
_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST instead of FIN


class Pulse:
    """Wakes every waiter on each change; each waiter re-checks its own condition."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Whether ``predicate()`` came true within ``timeout`` seconds."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while not predicate():
                    await self._event.wait()
        return predicate()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close at once with a TCP RST, as a dropped network path would look to the peer."""
    with contextlib.suppress(OSError):
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
    writer.transport.abort()


class _Pair:
    """One client connection and the proxy's connection to the broker on its behalf."""

    def __init__(self, client: asyncio.StreamWriter, broker: asyncio.StreamWriter) -> None:
        self.held = {client: bytearray(), broker: bytearray()}
        """Bytes read while stalled, by the writer they are bound for."""

    def flush(self) -> None:
        for writer, held in self.held.items():
            if held and not writer.is_closing():
                writer.write(bytes(held))
            held.clear()

    def reset(self) -> None:
        for writer in self.held:
            _reset(writer)


class FaultProxy:
    """A TCP proxy on a free port in front of a broker; clients connect to :attr:`endpoint`.

    ``cut()`` resets every open connection, ``stall()`` holds bytes in both directions until
    ``resume()`` (a silent network: no FIN, no RST), ``refuse()`` resets new connections until
    ``accept()``, ``retarget()`` sends new connections to another port. The broker is dialled
    when a client sends its first bytes. Counters: ``accepted`` (every connection, refused ones
    included), ``refused``, ``unreachable`` (the broker did not answer), ``cuts`` (pairs reset
    by ``cut()``), ``active`` (pairs forwarding now).
    """

    def __init__(self, target: BrokerEndpoint, *, host: str = "127.0.0.1") -> None:
        self.target = target
        self.host = host
        self.port = 0
        self.accepted = self.refused = self.unreachable = self.cuts = 0
        self._pairs: set[_Pair] = set()
        self._silent: set[asyncio.StreamWriter] = set()
        """Clients that have not sent anything yet, so have no broker connection."""
        self._handlers: set[asyncio.Task[None]] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._refusing = False
        self._pulse = Pulse()
        self._server: asyncio.Server | None = None

    @property
    def endpoint(self) -> BrokerEndpoint:
        """Where clients connect: the proxy, labelled with the broker's kind and log."""
        return BrokerEndpoint(self.host, self.port, self.target.kind, self.target.log)

    @property
    def active(self) -> int:
        return len(self._pairs)

    @property
    def stalled(self) -> bool:
        return not self._flowing.is_set()

    def __repr__(self) -> str:
        return (
            f"<FaultProxy :{self.port} -> {self.target.host}:{self.target.port}"
            f" accepted={self.accepted} refused={self.refused} unreachable={self.unreachable}"
            f" cuts={self.cuts} active={self.active} stalled={self.stalled}>"
        )

    async def __aenter__(self) -> Self:
        assert self._server is None, "a FaultProxy is not reusable"
        self._server = await asyncio.start_server(self._serve, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        self._flowing.set()  # so that no pump waits for resume()
        self.cut()
        # Cut pairs end by themselves; cancelling a handler would make asyncio log an error.
        handlers = set(self._handlers)
        if handlers:
            _, stuck = await asyncio.wait(handlers, timeout=DEFAULT_TIMEOUT)
            for task in stuck:
                task.cancel()
            await asyncio.gather(*stuck, return_exceptions=True)
        await self._server.wait_closed()

    # -- faults ------------------------------------------------------------------------------

    def cut(self) -> int:
        """Reset both sides of every open pair at once, and clients that have not spoken yet;
        return how many pairs were cut."""
        for writer in self._silent:
            _reset(writer)
        pairs, self._pairs = self._pairs, set()
        for pair in pairs:
            pair.reset()
        self.cuts += len(pairs)
        self._pulse.notify()
        return len(pairs)

    def stall(self) -> None:
        """Stop forwarding in both directions; connections stay open, bytes are held."""
        self._flowing.clear()

    def resume(self) -> None:
        """Forward what was held, in order, then carry on."""
        for pair in self._pairs:
            pair.flush()
        self._flowing.set()
        self._pulse.notify()

    def refuse(self) -> None:
        """Reset every new connection as soon as it is accepted (open ones are kept)."""
        self._refusing = True

    def accept(self) -> None:
        self._refusing = False

    def retarget(self, port: int, host: str | None = None) -> None:
        """Send new connections to another broker address; cut() moves the open ones."""
        target = self.target
        self.target = BrokerEndpoint(host or target.host, port, target.kind, target.log)

    # -- waiting -----------------------------------------------------------------------------

    async def wait_for(
        self, predicate: Callable[[], bool], *, timeout: float = DEFAULT_TIMEOUT, what: str = ""
    ) -> None:
        """Return once ``predicate()`` holds; it is re-checked on every connection change."""
        if not await self._pulse.until(predicate, timeout):
            raise AssertionError(f"{what or 'condition'}: not within {timeout:g}s ({self!r})")

    async def wait_holding(self, data: bytes, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Return once a stalled direction holds ``data`` (e.g. a command id): it has reached
        the proxy and not its destination."""

        def holding() -> bool:
            return any(data in held for pair in self._pairs for held in pair.held.values())

        await self.wait_for(holding, timeout=timeout, what=f"holding {data!r}")

    # -- forwarding --------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self.accepted += 1
        self._pulse.notify()
        broker_writer: asyncio.StreamWriter | None = None
        pair: _Pair | None = None
        pumps: list[asyncio.Task[None]] = []
        try:
            if self._refusing:
                self.refused += 1
                _reset(writer)
                return
            # Dial the broker only once the client speaks: amqtt 0.12 never closes a connection
            # that ends before CONNECT, so one that never speaks would leak in its process.
            first = b""
            self._silent.add(writer)
            with contextlib.suppress(OSError):
                first = await reader.read(_CHUNK)
            self._silent.discard(writer)
            if not first:
                return
            try:
                broker_reader, broker_writer = await asyncio.open_connection(
                    self.target.host, self.target.port
                )
            except OSError:
                self.unreachable += 1
                _reset(writer)
                return
            pair = _Pair(writer, broker_writer)
            self._pairs.add(pair)
            if self._flowing.is_set():
                broker_writer.write(first)
            else:
                pair.held[broker_writer] += first
            self._pulse.notify()
            pumps = [
                asyncio.create_task(self._pump(reader, broker_writer, pair), name="proxy-up"),
                asyncio.create_task(self._pump(broker_reader, writer, pair), name="proxy-down"),
            ]
            # Either side closing ends the pair: MQTT never half-closes.
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            # Close before awaiting anything: __aexit__ may cancel this task once more.
            writer.close()
            self._silent.discard(writer)
            if broker_writer is not None:
                broker_writer.close()
            if pair is not None:
                self._pairs.discard(pair)
            self._handlers.discard(task)
            self._pulse.notify()
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pair: _Pair
    ) -> None:
        held = pair.held[writer]
        with contextlib.suppress(OSError):
            while True:
                if len(held) >= _HOLD_LIMIT:
                    await self._flowing.wait()
                data = await reader.read(_CHUNK)
                if not data:
                    return
                if self._flowing.is_set() and not held:
                    writer.write(data)
                    await writer.drain()
                else:
                    held += data
                    self._pulse.notify()


class TracedEvent(asyncio.Event):
    """An :class:`asyncio.Event` that records its transitions, so a test can wait for it to
    be cleared (an Event can only be awaited until set). ``transitions[i]`` is the state after
    the i-th change."""

    def __init__(self) -> None:
        super().__init__()
        self.transitions: list[bool] = []
        self._pulse = Pulse()

    def set(self) -> None:
        if not self.is_set():
            self.transitions.append(True)
            self._pulse.notify()
        super().set()

    def clear(self) -> None:
        if self.is_set():
            self.transitions.append(False)
            self._pulse.notify()
        super().clear()

    def mark(self) -> int:
        return len(self.transitions)

    async def wait_transition(
        self, state: bool, *, since: int = 0, timeout: float = DEFAULT_TIMEOUT
    ) -> int:
        """The index of the first change to ``state`` at or after ``since``."""

        def found() -> int | None:
            return next(
                (i for i, s in enumerate(self.transitions) if i >= since and s is state), None
            )

        await self._pulse.until(lambda: found() is not None, timeout)
        index = found()
        if index is None:
            raise AssertionError(f"no change to {state} within {timeout:g}s: {self.transitions}")
        return index


@contextlib.asynccontextmanager
async def run_traced_agent(
    runner: AgentRunner, agent_id: str, **overrides: Any
) -> AsyncIterator[tuple[Agent, TracedEvent]]:
    """Like ``runner.run(agent_id)``, also yielding the agent's ``online`` event as a
    :class:`TracedEvent`, to see it clear on connection loss and set again on reconnect."""
    agent = Agent(runner.settings(agent_id, **overrides))
    online = TracedEvent()
    agent.online = online  # before entering: the reconnect loop binds online.clear then
    async with agent:
        try:
            async with asyncio.timeout(DEFAULT_TIMEOUT):
                await online.wait()
        except TimeoutError:
            where = f"{runner.endpoint.host}:{runner.endpoint.port}"
            raise AssertionError(f"agent {agent_id} not online via {where}") from None
        yield agent, online
