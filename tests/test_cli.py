"""The `fleet` CLI against a live controller, as a user runs it (a real subprocess)."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from controller_testing import Controller, controller_settings, run_controller
from fleet_testing import DEFAULT_TIMEOUT, AgentRunner, BrokerEndpoint, free_port


@dataclass
class Run:
    code: int
    out: str
    err: str


async def fleet(*args: str, env: dict[str, str] | None = None) -> Run:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fleet_controller", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin", **(env or {})},
    )  # fmt: skip
    async with asyncio.timeout(DEFAULT_TIMEOUT * 3):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return Run(proc.returncode, out.decode(), err.decode())


def at(controller: Controller) -> tuple[str, ...]:
    """The flags that point `fleet` at ``controller``, with its admin token."""
    assert controller.token is not None
    return ("--url", controller.url, "--token", controller.token)


@pytest.fixture
async def controller(amqtt_broker: BrokerEndpoint, tmp_path: Path) -> AsyncIterator[Controller]:
    """A controller on the embedded broker, with agent a1 online."""
    settings = controller_settings(amqtt_broker, tmp_path / "f.sqlite3", sweep_grace=0)
    async with run_controller(settings) as c, AgentRunner(amqtt_broker, tmp_path).run("a1"):
        await c.wait_agent("a1")
        yield c


async def test_send_wait_prints_results_and_exits_zero(controller: Controller) -> None:
    """`fleet send a1 ping --wait` shows the per-agent table and exits 0 on success."""
    r = await fleet("send", "a1", "ping", "--wait", *at(controller))
    assert r.code == 0, r.err
    assert "a1" in r.out and "succeeded" in r.out


async def test_send_wait_exits_one_when_an_agent_fails(controller: Controller) -> None:
    """A failed run makes `fleet send --wait` exit 1 and show the exit code."""
    r = await fleet("send", "a1", "run", "--wait", *at(controller), "--", "sh", "-c", "exit 3")
    assert r.code == 1, (r.out, r.err)
    assert "failed" in r.out and "3" in r.out


async def test_send_wait_exits_one_when_an_agent_does_not_answer(controller: Controller) -> None:
    """An agent that does not answer within --max-wait makes the exit code 1."""
    r = await fleet(
        "send", "a1,late", "ping", "--allow-unknown", "--wait", "--max-wait", "0.5",
        *at(controller),
    )  # fmt: skip
    assert r.code == 1, (r.out, r.err)
    assert "not every agent answered" in r.err
    assert "pending" in r.out


async def test_send_to_unknown_agent_is_a_clear_error(controller: Controller) -> None:
    """Unknown agents give exit code 2 and a one-line message naming them."""
    r = await fleet("send", "ghost", "ping", *at(controller))
    assert r.code == 2
    assert "unknown agent(s): ghost" in r.err


async def test_unreachable_controller_is_a_clear_error(tmp_path: Path) -> None:
    """No controller at the URL: exit code 2 and a message saying how to point at one."""
    url = f"http://127.0.0.1:{free_port()}"
    r = await fleet("agents", "--url", url, env={"FLEET_STATE_DIR": str(tmp_path)})
    assert r.code == 2
    assert "cannot reach the controller" in r.err and "--url" in r.err


async def test_agents_commands_and_show(controller: Controller) -> None:
    """`fleet agents`, `fleet commands` and `fleet show` print what the API holds."""
    sent = await controller.send(target="a1", command="info", wait=10)
    command_id = sent.json()["id"]
    agents = await fleet("agents", "--json", *at(controller))
    assert agents.code == 0, agents.err
    assert [(a["id"], a["online"]) for a in json.loads(agents.out)] == [("a1", True)]
    table = await fleet("agents", *at(controller))
    assert "a1" in table.out and "online" in table.out
    listed = await fleet("commands", *at(controller))
    assert listed.code == 0 and command_id in listed.out
    shown = await fleet("show", command_id, *at(controller))
    assert shown.code == 0, shown.err
    assert "info" in shown.out and "succeeded" in shown.out
    missing = await fleet("show", "nope", *at(controller))
    assert missing.code == 2 and "404" in missing.err


async def test_url_comes_from_environment(controller: Controller) -> None:
    """FLEET_URL and FLEET_TOKEN point every subcommand at the controller."""
    assert controller.token is not None
    env = {"FLEET_URL": controller.url, "FLEET_TOKEN": controller.token}
    r = await fleet("agents", "--json", env=env)
    assert r.code == 0, r.err
    assert json.loads(r.out)[0]["id"] == "a1"


async def test_every_subcommand_has_help() -> None:
    """`--help` works on every subcommand."""
    for sub in (
        "up",
        "broker",
        "controller",
        "agent",
        "send",
        "agents",
        "commands",
        "show",
        "watch",
        "token",
        "token create",
        "token list",
        "token revoke",
    ):
        r = await fleet(*sub.split(), "--help")
        assert r.code == 0, (sub, r.err)
        assert "usage" in r.out.lower(), sub
