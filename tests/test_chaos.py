"""Chaos soak: commands to one agent, lists and everyone while agents, the controller and the
broker are killed and connections cut; then every invariant of the delivery guarantees is
checked. A small run is part of the suite; `--chaos-scale N` makes it N times larger."""

from __future__ import annotations

import contextlib
import json
import random
import sqlite3
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from fleet_testing import AgentProcess, AgentRunner, BrokerProcess, ControllerProcess, FaultProxy

TERMINAL = {"succeeded", "failed", "rejected", "expired", "timed_out", "canceled"}
FAST_RECONNECT = ("--reconnect-min", "0.05", "--reconnect-max", "0.5")


@dataclass
class Tally:
    faults: Counter[str] = field(default_factory=Counter)
    sent: Counter[str] = field(default_factory=Counter)
    refused: int = 0


@dataclass
class Fleet:
    broker: BrokerProcess
    proxy: FaultProxy
    controller: ControllerProcess
    agents: dict[str, AgentProcess]
    effects: Path


def effect_argv(effects: Path) -> list[str]:
    """A `run` whose side effect the test can count: one line per execution, per agent."""
    script = 'echo "$FLEET_COMMAND_ID" >> "$0/$FLEET_AGENT_ID.log"; sleep 0.05'
    return ["sh", "-c", script, str(effects)]


async def send(fleet: Fleet, rng: random.Random, tally: Tally) -> None:
    ids = sorted(fleet.agents)
    shape = rng.choice(["one", "list", "all"])
    target: str | list[str] = (
        rng.choice(ids) if shape == "one" else rng.sample(ids, 2) if shape == "list" else "all"
    )
    body = {
        "target": target,
        "command": "run",
        "args": {"argv": effect_argv(fleet.effects)},
        "ttl": 300,
        "timeout": 30,
    }
    try:
        r = await fleet.controller.http.post("/api/v1/commands", json=body)
    except httpx.HTTPError:
        tally.refused += 1  # the controller is down: nothing was recorded
        return
    if r.status_code == 503:
        tally.refused += 1  # broker down; the command may be recorded and is checked below
        return
    assert r.status_code == 202, r.text
    tally.sent[shape] += 1


async def inject(fleet: Fleet, rng: random.Random, tally: Tally) -> None:
    fault = rng.choice(["agent_kill", "controller_kill", "broker_restart", "cut", "agent_stop"])
    tally.faults[fault] += 1
    if fault in ("agent_kill", "agent_stop"):
        agent = fleet.agents[rng.choice(sorted(fleet.agents))]
        await (agent.kill() if fault == "agent_kill" else agent.stop())
        await agent.start()
    elif fault == "controller_kill":
        await fleet.controller.restart(kill=True)
    elif fault == "broker_restart":
        await fleet.broker.restart(kill=True)
        # Let the controller notice and reconnect, so that later commands are not all refused.
        await fleet.controller.http.get("/readyz", params={"wait": 10})
    else:
        fleet.proxy.cut()


def ledger_results(state_dir: Path) -> dict[str, dict[str, Any]]:
    """Final results an agent recorded (its outbox included), by command id."""
    db = sqlite3.connect(state_dir / "ledger.sqlite3")
    try:
        rows = db.execute(
            "SELECT id, result FROM commands WHERE result IS NOT NULL AND command != 'cancel'"
        ).fetchall()
    finally:
        db.close()
    return {command_id: json.loads(result) for command_id, result in rows}


async def all_commands(http: httpx.AsyncClient) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 500, **({"cursor": cursor} if cursor else {})}
        page = (await http.get("/api/v1/commands", params=params)).json()
        items += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            return items


@pytest.mark.chaos
@pytest.mark.parametrize("kind", ["amqtt", "mosquitto"])
async def test_chaos_soak_keeps_every_guarantee(
    kind: str, tmp_path: Path, chaos_scale: int, request: pytest.FixtureRequest
) -> None:
    """Under random agent/controller/broker kills and connection cuts, every command ends on
    every agent, none runs twice on an agent, and no agent's result is missing from the store."""
    if kind == "mosquitto":
        request.getfixturevalue("mosquitto_pub")  # skips or fails (CI) without mosquitto
    rng = random.Random(f"fleet-chaos-{kind}-{chaos_scale}")
    n_agents, n_commands = 3 * chaos_scale, 24 * chaos_scale
    effects = tmp_path / "effects"
    effects.mkdir()
    tally = Tally()
    async with contextlib.AsyncExitStack() as stack:
        broker = await stack.enter_async_context(BrokerProcess(kind, tmp_path))
        proxy = await stack.enter_async_context(FaultProxy(broker.endpoint))
        controller = await stack.enter_async_context(
            ControllerProcess(
                broker.endpoint,
                tmp_path,
                args=["--redeliver-interval", "1", *FAST_RECONNECT],
            )
        )
        runner = AgentRunner(proxy.endpoint, tmp_path)
        agents = {}
        for i in range(n_agents):
            agent = runner.process(f"c{i}", *FAST_RECONNECT)
            agents[f"c{i}"] = await stack.enter_async_context(agent)
        fleet = Fleet(broker, proxy, controller, agents, effects)
        for agent_id in agents:
            r = await controller.http.get(f"/api/v1/agents/{agent_id}", params={"wait": 30})
            assert r.status_code == 200 and r.json()["online"], r.text

        for _ in range(n_commands):
            await send(fleet, rng, tally)
            if rng.random() < 0.25:
                await inject(fleet, rng, tally)

        # Settle: everything must end, with no more faults.
        commands = await all_commands(controller.http)
        for command in commands:
            r = await controller.http.get(f"/api/v1/commands/{command['id']}", params={"wait": 120})
            assert r.json()["complete"], r.text
        commands = await all_commands(controller.http)
        details = [
            (await controller.http.get(f"/api/v1/commands/{c['id']}")).json() for c in commands
        ]
        for agent in agents.values():
            await agent.stop()

    # 1. Every command reached a terminal status on every targeted agent.
    statuses: Counter[str] = Counter()
    recorded: dict[tuple[str, str], str] = {}
    for detail in details:
        assert detail["complete"], detail
        for result in detail["results"]:
            assert result["status"] in TERMINAL, (detail["id"], result)
            statuses[result["status"]] += 1
            recorded[(detail["id"], result["agent"])] = result["status"]
    # 2. No agent executed a command id twice (real side effects, counted per agent).
    runs = 0
    for log in effects.glob("*.log"):
        counts = Counter(log.read_text().split())
        runs += sum(counts.values())
        assert max(counts.values(), default=1) == 1, (log.name, counts.most_common(3))
    # 3. No result lost: every final result in an agent's ledger is in the controller's store.
    for agent_id in agents:
        for command_id, result in ledger_results(runner.state_dir(agent_id)).items():
            assert recorded.get((command_id, agent_id)) == result["status"], (
                agent_id,
                result,
            )
    # 4. Nothing failed but what a kill interrupted, and nothing expired: all was delivered.
    for detail in details:
        for result in detail["results"]:
            if result["status"] != "succeeded":
                assert result["status"] == "failed", result
                assert result["error"].startswith("interrupted"), result
    sent = sum(tally.sent.values())
    assert sent >= n_commands // 2, tally
    print(
        f"\nchaos[{kind}]: {n_agents} agents, {sent} commands sent {dict(tally.sent)},"
        f" {tally.refused} refused while down, faults {dict(tally.faults)},"
        f" deliveries {dict(statuses)}, executions {runs}"
    )
