"""The broker and the controller as real processes on fixed ports, for chaos tests: SIGKILL
them, restart them on the same ports, and wait on what they log instead of sleeping."""

# Waits take a ``timeout=`` argument on purpose: a test reads better with the limit in the call.
# ruff: noqa: ASYNC109

from __future__ import annotations

import abc
import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Self

import httpx

from fleet_controller.models import Scope
from fleet_controller.tokens import create_token_offline

from fleet_testing.brokers import (
    BROKER_YAML,
    DEFAULT_TIMEOUT,
    MOSQUITTO,
    BrokerEndpoint,
    free_port,
    stop_process,
)
from fleet_testing.faults import Pulse

PROCESS_START_TIMEOUT = 30.0
"""How long a fresh interpreter may take to import everything and listen, on a busy machine."""
_PORT_ATTEMPTS = 5


def admin_token(db_path: Path, name: str = "test admin") -> str:
    """An admin API token written straight into the controller database at ``db_path``."""
    return create_token_offline(db_path, name=name, scope=Scope.ADMIN, created_by="tests").token


def bearer(token: str | None) -> dict[str, str]:
    """The Authorization header for ``token`` (none for None)."""
    return {"authorization": f"Bearer {token}"} if token else {}


class _LoggedProcess(abc.ABC):
    """A child process restartable under the same argv, its stdout and stderr kept line by
    line in :attr:`log` across restarts. Subclasses say what "ready" and "port taken" look
    like; ports picked here move only if taken before the very first start."""

    ready_text = ""
    port_taken_text = "already in use"
    stop_signal = signal.SIGTERM

    def __init__(self) -> None:
        self.log: list[str] = []
        self.proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._reading = False
        self._pulse = Pulse()
        self._movable = False

    @abc.abstractmethod
    def argv(self) -> list[str]:
        """The command line that starts the process."""

    @abc.abstractmethod
    def move(self) -> None:
        """Pick new free ports (only before the first successful start)."""

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def mark(self) -> int:
        return len(self.log)

    async def start(self) -> None:
        """Start and return once ready; before the first start a taken port is replaced."""
        assert not self.running, "already running"
        for _ in range(_PORT_ATTEMPTS if self._movable else 1):
            since = self.mark()
            env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv(),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env={**env, "PYTHONUNBUFFERED": "1"},
            )
            assert self.proc.stdout is not None
            self._reading = True
            self._reader = asyncio.create_task(self._read(self.proc.stdout), name="process-log")
            try:
                await self.wait_log(self.ready_text, since=since, timeout=PROCESS_START_TIMEOUT)
            except AssertionError:
                await self._end(signal.SIGKILL)
                if self._movable and any(self.port_taken_text in x for x in self.log[since:]):
                    self.move()
                    continue
                raise
            self._movable = False
            try:
                await self._ready()
            except BaseException:
                await self._end(signal.SIGKILL)
                raise
            return
        raise RuntimeError(f"no free port after {_PORT_ATTEMPTS} attempts:\n{self.tail()}")

    async def _ready(self) -> None:
        """Extra readiness checks once the ready line is out (none by default)."""
        return None

    async def kill(self) -> int:
        """SIGKILL, as a power cut would; returns the exit status (-9)."""
        return await self._end(signal.SIGKILL)

    async def stop(self) -> int:
        """A graceful stop (SIGKILL only if it outlives DEFAULT_TIMEOUT); the exit status."""
        return await self._end(self.stop_signal)

    async def restart(self, *, kill: bool = False) -> int:
        """Stop (or kill) and start again on the same ports; the old exit status."""
        status = await (self.kill() if kill else self.stop())
        await self.start()
        return status

    async def _end(self, sig: signal.Signals) -> int:
        assert self.proc is not None, "never started"
        status = await stop_process(self.proc, sig)
        if self._reader is not None:
            await self._reader
        return status

    async def _read(self, stream: asyncio.StreamReader) -> None:
        try:
            while line := await stream.readline():
                self.log.append(line.decode(errors="replace").rstrip())
                self._pulse.notify()
        finally:
            self._reading = False
            self._pulse.notify()

    async def wait_log(self, text: str, *, since: int = 0, timeout: float = DEFAULT_TIMEOUT) -> int:
        """The index of the first log line from ``since`` on that contains ``text``; raises
        AssertionError with the log's tail if the process ends or ``timeout`` passes first."""

        def found() -> int | None:
            return next((i for i in range(since, len(self.log)) if text in self.log[i]), None)

        await self._pulse.until(lambda: found() is not None or not self._reading, timeout)
        index = found()
        if index is None:
            why = "the process ended" if not self._reading else f"not within {timeout:g}s"
            raise AssertionError(f"no log line with {text!r}: {why}; log:\n{self.tail()}")
        return index

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log[-lines:])

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self.running:
            await self.stop()


class BrokerProcess(_LoggedProcess):
    """An MQTT broker in its own process, on one free port for its whole life.

    ``kind="amqtt"`` runs ``python -m fleet_controller broker`` with the repository's
    broker.yaml. ``kind="mosquitto"`` runs mosquitto with persistence in ``workdir`` (autosave
    every second), TCP_NODELAY, 100,000 queued messages per client and anonymous logins;
    ``extra_config`` lines are appended to its config.
    """

    def __init__(
        self,
        kind: str,
        workdir: Path,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        extra_config: Sequence[str] = (),
    ) -> None:
        super().__init__()
        if kind not in ("amqtt", "mosquitto"):
            raise ValueError(f"unknown broker kind {kind!r}")
        self.kind = kind
        self.workdir = workdir
        self.host = host
        self.port = port or free_port(host)
        self.extra_config = list(extra_config)
        self.ready_text = "embedded MQTT broker on" if kind == "amqtt" else " running"
        self.port_taken_text = "already in use" if kind == "amqtt" else "Address already in use"
        # amqtt's CLI stops cleanly only on SIGINT.
        self.stop_signal = signal.SIGINT if kind == "amqtt" else signal.SIGTERM
        self._movable = port is None

    @property
    def endpoint(self) -> BrokerEndpoint:
        return BrokerEndpoint(self.host, self.port, self.kind, self.log)

    @property
    def state_dir(self) -> Path:
        """mosquitto's config and persistence database."""
        return self.workdir / f"mosquitto-{self.port}"

    def move(self) -> None:
        self.port = free_port(self.host)

    def argv(self) -> list[str]:
        if self.kind == "amqtt":
            return [
                *(sys.executable, "-m", "fleet_controller", "broker"),
                *("--host", self.host, "--port", str(self.port), "--config", str(BROKER_YAML)),
            ]
        self.state_dir.mkdir(parents=True, exist_ok=True)
        config = self.state_dir / "mosquitto.conf"
        lines = [
            f"listener {self.port} {self.host}",
            "allow_anonymous true",
            "persistence true",
            f"persistence_location {self.state_dir}/",
            "autosave_interval 1",
            "set_tcp_nodelay true",
            "max_queued_messages 100000",
            "user root",  # as root, mosquitto would switch to a user that cannot write here
            "log_dest stderr",
            *(f"log_type {t}" for t in ("error", "warning", "notice", "information")),
            *self.extra_config,
        ]
        config.write_text("\n".join(lines) + "\n")
        return [str(MOSQUITTO), "-c", str(config)]

    async def log_barrier(self) -> int:
        """(mosquitto) The index of a log line written after the broker handled everything
        it had received before this call: mosquitto logs each new connection, in order."""
        assert self.kind == "mosquitto", "amqtt does not log connections"
        since = self.mark()
        _, writer = await asyncio.open_connection(self.host, self.port)
        try:
            local = writer.get_extra_info("sockname")[1]
            return await self.wait_log(f"New connection from {self.host}:{local} ", since=since)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def wait_saved(self, *, force: bool = False, timeout: float = 5.0) -> None:
        """(mosquitto) Return once a save of the in-memory database that began after this
        call is on disk: the next autosave, or one forced now with SIGUSR1."""
        start = await self.log_barrier()
        if force:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGUSR1)
        await self.wait_log("Saving in-memory database", since=start + 1, timeout=timeout)
        # mosquitto saves in its only thread: any later line means the file is complete.
        await self.log_barrier()


class ControllerProcess(_LoggedProcess):
    """``python -m fleet_controller controller`` on a free HTTP port with a brisk sweeper,
    ready once ``/readyz`` says so; restarts keep the ports and the database. ``args`` are
    extra settings flags, e.g. ``["--default-ttl", "5"]``; :attr:`http` is a client for it,
    sending :attr:`token`, an admin API token written to the database before the first start
    (None with ``token=False``)."""

    ready_text = "controller on http://"

    def __init__(
        self,
        broker: BrokerEndpoint,
        workdir: Path,
        *,
        db_path: Path | None = None,
        http_port: int | None = None,
        args: Sequence[str] = (),
        token: bool = True,
    ) -> None:
        super().__init__()
        self.broker = broker
        self.db_path = db_path or workdir / "controller.sqlite3"
        self.http_port = http_port or free_port()
        self.args = list(args)
        self.token = admin_token(self.db_path) if token else None
        self.http = httpx.AsyncClient(
            base_url=self.url, timeout=DEFAULT_TIMEOUT + 20, headers=bearer(self.token)
        )
        self._movable = http_port is None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def move(self) -> None:
        self.http_port = free_port()
        self.http.base_url = httpx.URL(self.url)

    def argv(self) -> list[str]:
        return [
            *(sys.executable, "-m", "fleet_controller", "controller"),
            *("--broker-host", self.broker.host, "--broker-port", str(self.broker.port)),
            *("--http-host", "127.0.0.1", "--http-port", str(self.http_port)),
            *("--db-path", str(self.db_path), "--sweep-interval", "0.2", "--sweep-grace", "0"),
            *self.args,
        ]

    async def _ready(self) -> None:
        # The log line comes after the socket listens, so this request queues, never refused.
        try:
            r = await self.http.get("/readyz", params={"wait": DEFAULT_TIMEOUT})
        except httpx.HTTPError as exc:
            raise AssertionError(f"/readyz: {exc!r}; log:\n{self.tail()}") from None
        assert r.status_code == 200, f"/readyz: {r.status_code} {r.text}; log:\n{self.tail()}"

    async def __aexit__(self, *exc_info: object) -> None:
        try:
            await super().__aexit__(*exc_info)
        finally:
            await self.http.aclose()
