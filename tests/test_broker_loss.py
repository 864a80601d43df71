"""Broker loss: after the broker is SIGKILLed and restarted, agents and the controller come
back by themselves and every pending command completes (amqtt loses its sessions; mosquitto
keeps them on disk up to its last save)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from fleet_testing import AgentRunner, BrokerProcess, ControllerProcess

FAST_RECONNECT = ("--reconnect-min", "0.05", "--reconnect-max", "0.5")


@pytest.mark.parametrize("kind", ["amqtt", "mosquitto"])
async def test_pending_commands_complete_after_broker_kill(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Commands queued for an offline agent, and one running on an online agent, all
    complete after a SIGKILL and restart of the broker."""
    if kind == "mosquitto":
        request.getfixturevalue("mosquitto_pub")  # skips or fails (CI) without mosquitto
    async with contextlib.AsyncExitStack() as stack:
        broker = await stack.enter_async_context(BrokerProcess(kind, tmp_path))
        controller = await stack.enter_async_context(
            ControllerProcess(
                broker.endpoint, tmp_path, args=["--redeliver-interval", "1", *FAST_RECONNECT]
            )
        )
        runner = AgentRunner(broker.endpoint, tmp_path)
        online = await stack.enter_async_context(runner.process("up", *FAST_RECONNECT))
        away = runner.process("away", *FAST_RECONNECT)
        async with away:
            for agent_id in ("up", "away"):
                r = await controller.http.get(f"/api/v1/agents/{agent_id}", params={"wait": 30})
                assert r.json()["online"], r.text
        http = controller.http
        r = await http.get("/api/v1/agents/away", params={"wait": 30, "until": "offline"})
        assert r.json()["state"] == "offline"
        queued = [
            (
                await http.post("/api/v1/commands", json={"target": "away", "command": "ping"})
            ).json()["id"]
            for _ in range(3)
        ]
        running = (
            await http.post(
                "/api/v1/commands",
                json={"target": "up", "command": "sleep", "args": {"seconds": 1}},
            )
        ).json()["id"]
        if kind == "mosquitto":
            await broker.wait_saved(force=True)
        await broker.restart(kill=True)
        await stack.enter_async_context(away)
        done = [
            (await http.get(f"/api/v1/commands/{cid}", params={"wait": 30})).json()
            for cid in [*queued, running]
        ]
        assert online.proc is not None
    assert [d["status"] for d in done] == ["succeeded"] * 4, done
