"""Presence and fan-out: birth, Last Will, clean goodbye, and broadcasts."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import pytest

from fleet_agent import __version__
from fleet_agent.protocol import AgentState, CommandStatus

from fleet_testing import BROKER_KINDS, AgentRunner, Probe, run_broker

if TYPE_CHECKING:
    from pathlib import Path

    from fleet_testing import BrokerEndpoint

# A fresh interpreter imports pydantic and aiomqtt before it connects: allow for a slow CI box.
PROCESS_START_TIMEOUT = 30.0


async def retained_status(broker: BrokerEndpoint, agent_id: str) -> AgentState:
    """What a client connecting now learns from the retained status topic."""
    async with Probe(broker, username="late-probe") as late:
        status = await late.wait_for(
            lambda s: s.status is not None and s.status.agent == agent_id,
            what=f"retained status of {agent_id}",
        )
    assert status.retain and status.status is not None
    return status.status.state


async def test_birth_announces_the_agent_online(probe: Probe, agents: AgentRunner) -> None:
    """A connected agent publishes a retained `online` status with its version and commands."""
    async with agents.run("born"):
        status = await probe.wait_status("born", AgentState.ONLINE)
    assert status.version == __version__
    assert status.commands == ["cancel", "info", "ping", "run", "sleep"]
    assert status.started_at is not None and status.at is not None
    assert isinstance(status.host.get("hostname"), str)


async def test_clean_stop_says_offline_with_reason_shutdown(
    broker: BrokerEndpoint, probe: Probe, agents: AgentRunner
) -> None:
    """Leaving the agent's context publishes a retained `offline` status, reason `shutdown`."""
    async with agents.run("leaver"):
        await probe.wait_status("leaver", AgentState.ONLINE)
        mark = probe.mark()
    goodbye = await probe.wait_status("leaver", AgentState.OFFLINE, since=mark)
    assert goodbye.reason == "shutdown"
    assert goodbye.at is not None
    assert await retained_status(broker, "leaver") is AgentState.OFFLINE


async def test_last_will_marks_a_killed_agent_offline_and_birth_revives_it(
    broker: BrokerEndpoint, probe: Probe, agents: AgentRunner
) -> None:
    """SIGKILL of an agent process fires its Last Will; a restart announces it online again."""
    process = agents.process("mortal")
    async with process:
        try:
            await probe.wait_status("mortal", AgentState.ONLINE, timeout=PROCESS_START_TIMEOUT)
            mark = probe.mark()
            assert await process.kill() == -9
            will = await probe.wait_status("mortal", AgentState.OFFLINE, since=mark)
            assert will.reason == "connection lost"
            assert await retained_status(broker, "mortal") is AgentState.OFFLINE

            mark = probe.mark()
            await process.start()
            await probe.wait_status(
                "mortal", AgentState.ONLINE, since=mark, timeout=PROCESS_START_TIMEOUT
            )
            assert await retained_status(broker, "mortal") is AgentState.ONLINE

            mark = probe.mark()
            assert await process.stop() == 0
            goodbye = await probe.wait_status("mortal", AgentState.OFFLINE, since=mark)
            assert goodbye.reason == "shutdown"
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nagent log:\n{process.log()}") from None


async def test_broadcast_reaches_every_connected_agent(probe: Probe, agents: AgentRunner) -> None:
    """One command on `fleet/all/cmd` runs on each of three agents, each reporting its result."""
    names = ["fleet-1", "fleet-2", "fleet-3"]
    async with contextlib.AsyncExitStack() as stack:
        for name in names:
            await stack.enter_async_context(agents.run(name))
        cid = await probe.broadcast("ping")
        results = [await probe.wait_result(name, cid) for name in names]
    assert [r.agent for r in results] == names
    assert all(r.status is CommandStatus.SUCCEEDED for r in results)
    for name in names:
        assert probe.statuses_of(name, cid) == [
            CommandStatus.RECEIVED,
            CommandStatus.RUNNING,
            CommandStatus.SUCCEEDED,
        ]


@pytest.mark.parametrize("kind", BROKER_KINDS)
async def test_agent_reconnects_and_resubscribes_after_broker_restart(
    kind: str, tmp_path: Path
) -> None:
    """After a broker restart (sessions lost) the agent reconnects, is born again and serves."""
    first_broker = contextlib.AsyncExitStack()
    endpoint = await first_broker.enter_async_context(run_broker(kind, tmp_path))
    runner = AgentRunner(endpoint, tmp_path, reconnect_min=0.05, reconnect_max=0.2)
    try:
        async with runner.run("phoenix") as agent:
            await first_broker.aclose()
            async with (
                run_broker(kind, tmp_path, port=endpoint.port) as restarted,
                Probe(restarted) as probe,
            ):
                # The restarted broker has no retained state: this status is a new birth.
                await probe.wait_status("phoenix", AgentState.ONLINE)
                cid = await probe.send("phoenix", "ping")
                result = await probe.wait_result("phoenix", cid)
                mark = probe.mark()
                await agent.shutdown()  # while the broker is up, so the goodbye gets through
                goodbye = await probe.wait_status("phoenix", AgentState.OFFLINE, since=mark)
    finally:
        await first_broker.aclose()
    assert result.status is CommandStatus.SUCCEEDED
    assert goodbye.reason == "shutdown"
