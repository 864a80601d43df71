"""The controller records what happened to every command: offline agents, expiry, restarts and
commands published by others."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fleet_agent.protocol import Command, CommandStatus
from fleet_controller.settings import ControllerSettings

from controller_testing import controller_settings, run_controller
from fleet_testing import AgentRunner, BrokerEndpoint, Probe
from fleet_testing import mosquitto_pub as publish_with

SettingsFactory = Callable[..., ControllerSettings]


@pytest.fixture
def settings_for(broker: BrokerEndpoint, tmp_path: Path) -> SettingsFactory:
    """Controller settings on the test broker, one database per test, a brisk sweeper."""

    def make(**overrides: Any) -> ControllerSettings:
        return controller_settings(
            broker, tmp_path / "fleet.sqlite3", sweep_interval=0.1, sweep_grace=0, **overrides
        )

    return make


async def test_offline_agent_gets_queued_command_after_reconnect(
    agents: AgentRunner, settings_for: SettingsFactory
) -> None:
    """A command sent while its agent is offline is queued, run on reconnect, and recorded."""
    async with run_controller(settings_for()) as controller:
        async with agents.run("a1"):
            await controller.wait_agent("a1")
        await controller.wait_agent("a1", until="offline")
        r = await controller.send(target="a1", command="info", wait=0.2)
        body = r.json()
        assert r.status_code == 202, body
        assert body["complete"] is False
        assert body["results"][0]["status"] == "pending"
        assert body["results"][0]["published_at"] is not None
        async with agents.run("a1"):
            done = await controller.command(body["id"], wait=10)
    assert done["complete"] is True
    assert done["results"][0]["status"] == "succeeded"
    assert done["results"][0]["output"]["agent_version"]


async def test_ttl_expires_agent_that_never_returns(
    agents: AgentRunner, settings_for: SettingsFactory
) -> None:
    """An agent that never answers ends as expired when the ttl passes; the command closes."""
    async with run_controller(settings_for()) as controller:
        async with agents.run("a1"):
            await controller.wait_agent("a1")
        await controller.wait_agent("a1", until="offline")
        r = await controller.send(target="a1", command="ping", ttl=0.5, wait=10)
    body = r.json()
    assert body["complete"] is True
    assert body["status"] == "failed"
    (result,) = body["results"]
    assert result["status"] == "expired"
    assert "deadline" in result["error"]


async def test_results_published_while_controller_down_are_recorded(
    agents: AgentRunner, probe: Probe, settings_for: SettingsFactory
) -> None:
    """The controller's persistent session keeps results that arrive while it is stopped."""
    async with run_controller(settings_for()) as controller, agents.run("a1"):
        await controller.wait_agent("a1")
        # Controller is stopped before the command is sent.
    async with agents.run("a1"):
        cmd = Command(id="while-down-1", command="ping")
        await probe.send("a1", cmd)
        await probe.wait_result("a1", "while-down-1", CommandStatus.SUCCEEDED)
        async with run_controller(settings_for()) as controller:
            done = await controller.command("while-down-1", wait=10)
    assert done["source"] == "mqtt"
    assert done["results"][0]["status"] == "succeeded"


async def test_mosquitto_pub_command_is_recorded(
    agents: AgentRunner, settings_for: SettingsFactory, mosquitto_pub: str
) -> None:
    """A command published with mosquitto_pub shows up in the command list, source mqtt."""
    async with run_controller(settings_for()) as controller, agents.run("a1"):
        await controller.wait_agent("a1")
        await publish_with(
            mosquitto_pub, agents.endpoint, "fleet/a1/cmd", '{"command":"ping","id":"adhoc-1"}'
        )
        done = await controller.command("adhoc-1", wait=10)
        listed = (await controller.http.get("/api/v1/commands", params={"agent": "a1"})).json()
    assert done["source"] == "mqtt"
    assert done["command"] == "ping"
    assert done["complete"] is True
    assert done["results"][0]["status"] == "succeeded"
    assert [c["id"] for c in listed["items"]] == ["adhoc-1"]


async def test_mosquitto_pub_without_id_is_recorded_from_its_result(
    agents: AgentRunner, probe: Probe, settings_for: SettingsFactory, mosquitto_pub: str
) -> None:
    """An id-less ad-hoc command is recorded under the id the agent assigned."""
    async with run_controller(settings_for()) as controller, agents.run("a1"):
        await controller.wait_agent("a1")
        await publish_with(mosquitto_pub, agents.endpoint, "fleet/a1/cmd", '{"command":"ping"}')
        seen = await probe.wait_for(
            lambda s: s.result is not None and s.result.status is CommandStatus.SUCCEEDED
        )
        assert seen.result is not None
        await controller.command(seen.result.id, wait=10)
        page = (await controller.http.get("/api/v1/commands", params={"agent": "a1"})).json()
    (item,) = page["items"]
    assert item["id"] == seen.result.id
    assert item["source"] == "mqtt"
    assert item["command"] == "ping"
    assert item["status"] == "succeeded"
