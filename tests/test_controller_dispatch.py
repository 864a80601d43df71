"""End to end through HTTP: dispatch to one agent, a list, or all, with real agents and brokers."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from controller_testing import Controller, controller_settings, run_controller
from fleet_testing import AgentRunner, BrokerEndpoint


@pytest.fixture
async def controller(broker: BrokerEndpoint, tmp_path: Path) -> AsyncIterator[Controller]:
    """A controller on the parametrized broker (amqtt and mosquitto)."""
    settings = controller_settings(
        broker, tmp_path / "fleet.sqlite3", sweep_interval=0.1, sweep_grace=0
    )
    async with run_controller(settings) as c:
        yield c


@contextlib.asynccontextmanager
async def fleet_of(agents: AgentRunner, controller: Controller, *ids: str) -> AsyncIterator[None]:
    async with contextlib.AsyncExitStack() as stack:
        for agent_id in ids:
            await stack.enter_async_context(agents.run(agent_id))
        for agent_id in ids:
            await controller.wait_agent(agent_id)
        yield


async def test_ping_one_agent_with_wait(agents: AgentRunner, controller: Controller) -> None:
    """POST ?wait returns 202 with the agent's succeeded result and complete=true."""
    async with fleet_of(agents, controller, "a1"):
        r = await controller.send(target="a1", command="ping", wait=10)
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["complete"] is True
    assert body["status"] == "succeeded"
    assert body["agents"] == ["a1"]
    assert body["counts"] == {"succeeded": 1}
    (result,) = body["results"]
    assert result["agent"] == "a1"
    assert result["output"]["pong"] is True
    assert result["published_at"] and result["received_at"] and result["finished_at"]
    assert result["duration_s"] is not None


async def test_list_target_gets_one_result_per_agent(
    agents: AgentRunner, controller: Controller
) -> None:
    """A list target publishes to each agent's own topic and collects every answer."""
    async with fleet_of(agents, controller, "a1", "a2", "a3"):
        r = await controller.send(
            target=["a1", "a3"], command="run", args={"argv": ["echo", "hi"]}, wait=10
        )
    body = r.json()
    assert r.status_code == 202, body
    assert body["complete"] and body["status"] == "succeeded"
    assert [x["agent"] for x in body["results"]] == ["a1", "a3"]
    assert {x["output"]["stdout"] for x in body["results"]} == {"hi\n"}


async def test_all_expects_every_known_agent(agents: AgentRunner, controller: Controller) -> None:
    """`all` expects an answer from every known agent, offline ones included."""
    async with fleet_of(agents, controller, "gone"):
        pass  # known, now offline
    await controller.wait_agent("gone", until="offline")
    async with fleet_of(agents, controller, "a1", "a2"):
        r = await controller.send(target="all", command="ping", ttl=1, wait=30)
    body = r.json()
    assert r.status_code == 202, body
    assert body["agents"] == ["a1", "a2", "gone"]
    assert body["complete"] is True
    assert body["status"] == "failed"
    by_agent = {x["agent"]: x["status"] for x in body["results"]}
    assert by_agent == {"a1": "succeeded", "a2": "succeeded", "gone": "expired"}


async def test_failed_run_makes_command_failed(agents: AgentRunner, controller: Controller) -> None:
    """A non-zero exit is a failed result with its exit code, and fails the aggregate."""
    async with fleet_of(agents, controller, "a1"):
        r = await controller.send(
            target="a1", command="run", args={"argv": ["sh", "-c", "exit 3"]}, wait=10
        )
    body = r.json()
    assert body["status"] == "failed"
    assert body["results"][0]["exit_code"] == 3
    assert body["results"][0]["status"] == "failed"


async def test_agents_endpoint_reports_presence_and_latency(
    agents: AgentRunner, controller: Controller
) -> None:
    """GET /agents shows online agents with version, commands, host facts and ping latency."""
    async with fleet_of(agents, controller, "a1"):
        await controller.send(target="a1", command="ping", wait=10)
        r = await controller.http.get("/api/v1/agents")
        (agent,) = r.json()
        assert agent["id"] == "a1"
        assert agent["online"] is True
        assert agent["connected_since"] is not None
        assert {"ping", "info", "run", "sleep"} <= set(agent["commands"])
        assert agent["host"]["hostname"]
        assert agent["latency_ms"] is not None and agent["latency_ms"] >= 0
    # After a clean stop the agent is offline with a reason; the record stays.
    offline = await controller.wait_agent("a1", until="offline")
    assert offline["online"] is False
    assert offline["offline_reason"] == "shutdown"
