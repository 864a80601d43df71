"""Agents under test: in-process (restartable on the same state dir) or as real processes,
and checks on the processes their commands leave behind."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

from fleet_agent.agent import Agent
from fleet_agent.settings import AgentSettings

from fleet_testing.brokers import DEFAULT_TIMEOUT, stop_process

if TYPE_CHECKING:
    from fleet_testing.brokers import BrokerEndpoint


class AgentRunner:
    """Starts agents against one broker. Each agent id keeps its own state dir under ``root``,
    so an agent started again under the same id is a restart: same ledger, same session.
    Test agents allow `run` of any executable (``run_allow=["*"]``) unless told otherwise."""

    def __init__(self, endpoint: BrokerEndpoint, root: Path, **defaults: Any) -> None:
        self.endpoint = endpoint
        self.root = root
        self.defaults = {"run_allow": ["*"], **defaults}

    def state_dir(self, agent_id: str) -> Path:
        return self.root / "agents" / agent_id

    def settings(self, agent_id: str, **overrides: Any) -> AgentSettings:
        return AgentSettings(
            agent_id=agent_id,
            broker_host=self.endpoint.host,
            broker_port=self.endpoint.port,
            state_dir=self.state_dir(agent_id),
            **{**self.defaults, **overrides},
        )

    @contextlib.asynccontextmanager
    async def run(self, agent_id: str, **overrides: Any) -> AsyncIterator[Agent]:
        """An in-process agent, yielded once it is online; leaving stops it gracefully."""
        async with Agent(self.settings(agent_id, **overrides)) as agent:
            try:
                async with asyncio.timeout(DEFAULT_TIMEOUT):
                    await agent.online.wait()
            except TimeoutError:
                raise AssertionError(
                    f"agent {agent_id} not online within {DEFAULT_TIMEOUT:g}s"
                    f" ({self.endpoint.kind} on {self.endpoint.host}:{self.endpoint.port})"
                ) from None
            yield agent

    def process(self, agent_id: str, *extra_args: str) -> AgentProcess:
        """A ``python -m fleet_agent`` process for ``agent_id`` (not started yet)."""
        argv = [
            sys.executable,
            "-m",
            "fleet_agent",
            "--agent-id",
            agent_id,
            "--broker-host",
            self.endpoint.host,
            "--broker-port",
            str(self.endpoint.port),
            "--state-dir",
            str(self.state_dir(agent_id)),
            *(("--run-allow", "*") if "--run-allow" not in extra_args else ()),
            *extra_args,
        ]
        return AgentProcess(argv, self.root / f"{agent_id}.log")


class AgentProcess:
    """An agent in its own process; its log goes to ``log_path``. Each start appends to it."""

    def __init__(self, argv: Sequence[str], log_path: Path) -> None:
        self.argv = list(argv)
        self.log_path = log_path
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        assert self.proc is None or self.proc.returncode is not None, "already running"
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_AGENT_")}
        with self.log_path.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
            )

    async def kill(self) -> int:
        """SIGKILL: the agent dies without a word, as in a power cut."""
        assert self.proc is not None
        return await stop_process(self.proc, signal.SIGKILL)

    async def stop(self) -> int:
        """SIGTERM: the agent shuts down gracefully."""
        assert self.proc is not None
        return await stop_process(self.proc, signal.SIGTERM)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self.proc is not None and self.proc.returncode is None:
            await self.kill()


async def wait_process_exit(pid: int) -> None:
    """Return once process ``pid`` has terminated (its pidfd becomes readable); wrap it in
    ``asyncio.timeout``."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    loop = asyncio.get_running_loop()
    exited: asyncio.Future[None] = loop.create_future()

    def on_exit() -> None:
        if not exited.done():
            exited.set_result(None)

    loop.add_reader(fd, on_exit)
    try:
        await exited
    finally:
        loop.remove_reader(fd)
        os.close(fd)


def is_gone(pid: int) -> bool:
    """True if ``pid`` no longer exists or is a zombie (dead, waiting to be reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rpartition(")")[2].split()[0] in ("Z", "X")
