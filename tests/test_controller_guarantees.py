"""End-to-end guarantees through the controller: a command counts as delivered only when
the agent says `received`; what a broker lost is sent again; cancel reaches every agent."""

from __future__ import annotations

import contextlib
from pathlib import Path

from fleet_agent.protocol import CommandStatus

from controller_testing import controller_settings, run_controller
from fleet_testing import AgentRunner, BrokerEndpoint, Probe, run_amqtt

FAST = {"reconnect_min": 0.05, "reconnect_max": 0.2}


async def test_command_for_a_never_seen_agent_arrives_when_it_first_connects(
    amqtt_broker: BrokerEndpoint, tmp_path: Path
) -> None:
    """The broker drops a command for an agent with no session; the controller sends it again
    when the agent's birth says its session was new."""
    settings = controller_settings(amqtt_broker, tmp_path / "f.sqlite3")
    async with run_controller(settings) as controller:
        r = await controller.send(target="fresh", command="ping", allow_unknown=True)
        command_id = r.json()["id"]
        async with AgentRunner(amqtt_broker, tmp_path).run("fresh"):
            done = await controller.command(command_id, wait=10)
    assert done["status"] == "succeeded", done
    assert done["results"][0]["status"] == "succeeded"


async def test_commands_lost_in_an_amqtt_restart_are_sent_again(tmp_path: Path) -> None:
    """amqtt forgets queued commands when it restarts; agent and controller reconnect by
    themselves and the command still completes."""
    async with contextlib.AsyncExitStack() as broker_life:
        first = await broker_life.enter_async_context(run_amqtt())
        settings = controller_settings(first, tmp_path / "f.sqlite3", **FAST)
        async with run_controller(settings) as controller:
            agents = AgentRunner(first, tmp_path, **FAST)
            async with agents.run("a1"):
                await controller.wait_agent("a1")
            await controller.wait_agent("a1", until="offline")
            r = await controller.send(target="a1", command="info", ttl=120)
            command_id = r.json()["id"]
            assert r.json()["results"][0]["published_at"]
            await broker_life.aclose()  # the queued command dies with the broker's sessions
            async with run_amqtt(port=first.port):
                ready = await controller.http.get("/readyz", params={"wait": 10})
                assert ready.status_code == 200
                async with agents.run("a1"):
                    done = await controller.command(command_id, wait=15)
    assert done["status"] == "succeeded", done


async def test_cancel_kills_a_running_command_via_http(
    amqtt_broker: BrokerEndpoint, tmp_path: Path
) -> None:
    """POST /commands/{id}/cancel kills a running command; the command ends canceled."""
    settings = controller_settings(amqtt_broker, tmp_path / "f.sqlite3")
    async with (
        run_controller(settings) as controller,
        AgentRunner(amqtt_broker, tmp_path).run("a1"),
    ):
        await controller.wait_agent("a1")
        r = await controller.send(target="a1", command="sleep", args={"seconds": 60})
        command_id = r.json()["id"]
        running = await controller.command(command_id, wait=10, after=r.json()["version"])
        while running["results"][0]["status"] != "running":
            running = await controller.command(command_id, wait=10, after=running["version"])
        c = await controller.http.post(f"/api/v1/commands/{command_id}/cancel", params={"wait": 10})
    assert c.status_code == 200, c.text
    body = c.json()
    assert body["status"] == "canceled"
    assert body["results"][0]["status"] == "canceled"
    assert body["results"][0]["error"].startswith("canceled by ")


async def test_cancel_for_an_offline_agent_is_immediate_and_sticks(
    amqtt_broker: BrokerEndpoint, tmp_path: Path
) -> None:
    """A command an offline agent never received is canceled at once, and the agent never
    runs it when it comes back."""
    settings = controller_settings(amqtt_broker, tmp_path / "f.sqlite3")
    agents = AgentRunner(amqtt_broker, tmp_path)
    marker = tmp_path / "ran"
    async with run_controller(settings) as controller:
        async with agents.run("a1"):
            await controller.wait_agent("a1")
        await controller.wait_agent("a1", until="offline")
        r = await controller.send(target="a1", command="run", args={"argv": ["touch", str(marker)]})
        command_id = r.json()["id"]
        c = await controller.http.post(f"/api/v1/commands/{command_id}/cancel")
        assert c.json()["status"] == "canceled"
        cancel_id = c.json()["results"][0]["error"].removeprefix("canceled by ")
        async with agents.run("a1"):
            ack = await controller.command(cancel_id, wait=10)
        after = await controller.command(command_id)
    assert ack["status"] == "succeeded"
    assert after["results"][0]["status"] == "canceled"
    assert not marker.exists()


async def test_cancel_unknown_command_is_404(amqtt_broker: BrokerEndpoint, tmp_path: Path) -> None:
    """Canceling a command nobody sent is a 404 in the error shape."""
    settings = controller_settings(amqtt_broker, tmp_path / "f.sqlite3")
    async with run_controller(settings) as controller:
        r = await controller.http.post("/api/v1/commands/nope/cancel")
    assert r.status_code == 404
    assert r.json()["error"] == "not_found"


async def test_a_lost_final_result_is_recovered_from_the_agent(
    broker: BrokerEndpoint, probe: Probe, tmp_path: Path
) -> None:
    """A result the controller never got (here: it came back under a new session) is
    recovered: the command is sent again and the agent answers with its stored result."""
    db = tmp_path / "f.sqlite3"
    agents = AgentRunner(broker, tmp_path)
    async with agents.run("a1"):
        async with run_controller(controller_settings(broker, db)) as controller:
            await controller.wait_agent("a1")
            r = await controller.send(target="a1", command="sleep", args={"seconds": 0.3})
            command_id = r.json()["id"]
            await probe.wait_result("a1", command_id, CommandStatus.RUNNING)
        await probe.wait_result("a1", command_id, CommandStatus.SUCCEEDED)
        fresh = controller_settings(
            broker, db, client_id="fleet-controller-2", redeliver_interval=0.2
        )
        async with run_controller(fresh) as controller:
            done = await controller.command(command_id, wait=15)
    assert done["status"] == "succeeded", done
    assert probe.statuses_of("a1", command_id).count(CommandStatus.SUCCEEDED) == 2
