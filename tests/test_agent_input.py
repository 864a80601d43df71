"""Bad input never stops an agent: each bad payload gets a `rejected` (or `expired`) result
with a reason, and the agent keeps serving."""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

import pytest

from fleet_agent.protocol import CommandStatus

if TYPE_CHECKING:
    from fleet_testing import AgentRunner, Probe, Seen

MAX_PAYLOAD = 1024
GENERATED_ID = re.compile(r"[0-9a-f]{32}")


def as_json(data: Any) -> bytes:
    return json.dumps(data).encode()


BAD_INPUT = [
    pytest.param(b"{not json", None, "payload is not JSON", id="malformed-json"),
    pytest.param(b'{"command": "ping", "id": "\xff"}', None, "payload is not UTF-8", id="not-utf8"),
    pytest.param(b'["ping"]', None, "payload must be a JSON object, not list", id="not-an-object"),
    pytest.param(
        as_json({"command": "ping", "id": "huge", "pad": "x" * MAX_PAYLOAD}),
        None,
        f"exceeds the limit of {MAX_PAYLOAD}",
        id="oversize",
    ),
    pytest.param(
        as_json({"id": "no-name"}),
        "no-name",
        "invalid command: command: Field required",
        id="no-name",
    ),
    pytest.param(
        as_json({"command": "ping", "id": "extra", "colour": "red"}),
        "extra",
        "invalid command: colour: Extra inputs are not permitted",
        id="unknown-field",
    ),
    pytest.param(
        as_json({"command": "frobnicate", "id": "unknown"}),
        "unknown",
        "unknown command 'frobnicate'; this agent supports: cancel, info, ping, run, sleep",
        id="unknown-command",
    ),
    pytest.param(
        as_json({"command": "run", "id": "no-argv", "args": {"argv": []}}),
        "no-argv",
        "invalid args: argv: List should have at least 1 item",
        id="invalid-args",
    ),
    pytest.param(
        as_json({"command": "ping", "id": "ping-args", "args": {"verbose": True}}),
        "ping-args",
        "invalid args: verbose: Extra inputs are not permitted",
        id="args-for-no-args-command",
    ),
]


@pytest.mark.parametrize(("payload", "command_id", "reason"), BAD_INPUT)
async def test_bad_payload_is_rejected_and_agent_keeps_serving(
    probe: Probe, agents: AgentRunner, payload: bytes, command_id: str | None, reason: str
) -> None:
    """A bad payload gets a `rejected` result naming the problem; a ping afterwards succeeds."""

    def is_rejection(s: Seen) -> bool:
        r = s.result
        return r is not None and r.status is CommandStatus.REJECTED and reason in (r.error or "")

    async with agents.run("picky", max_payload_bytes=MAX_PAYLOAD):
        await probe.publish(probe.topics.cmd("picky"), payload)
        seen = await probe.wait_for(is_rejection, what=f"rejection with {reason!r}")
        ping = await probe.send("picky", "ping")
        await probe.wait_result("picky", ping, CommandStatus.SUCCEEDED)
    rejected = seen.result
    assert rejected is not None
    assert rejected.agent == "picky"
    if command_id is None:
        assert GENERATED_ID.fullmatch(rejected.id), rejected.id
    else:
        assert rejected.id == command_id
    # Nothing ran: the rejection is the only result for that id.
    assert probe.statuses_of("picky", rejected.id) == [CommandStatus.REJECTED]


async def test_command_past_its_expiry_is_expired_not_run(
    probe: Probe, agents: AgentRunner
) -> None:
    """A command whose expires_at is in the past gets `expired` and never runs."""
    async with agents.run("picky"):
        cid = await probe.send("picky", "ping", expires_at="2000-01-01T00:00:00Z")
        result = await probe.wait_result("picky", cid)
        ping = await probe.send("picky", "ping")
        await probe.wait_result("picky", ping, CommandStatus.SUCCEEDED)
    assert result.status is CommandStatus.EXPIRED
    assert result.error == "expired before it arrived"
    assert probe.statuses_of("picky", cid) == [CommandStatus.EXPIRED]


async def test_redelivered_rejection_gets_the_same_rejection(
    probe: Probe, agents: AgentRunner
) -> None:
    """A rejected command id sent again is answered with the stored rejection, byte for byte."""
    async with agents.run("picky"):
        await probe.send("picky", "reboot", id="nope")
        first = await probe.wait_for(lambda s: s.result is not None and s.result.id == "nope")
        await probe.send("picky", "reboot", id="nope")
        again = await probe.wait_for(
            lambda s: s.result is not None and s.result.id == "nope", since=first.index + 1
        )
    assert first.result is not None and first.result.status is CommandStatus.REJECTED
    assert again.payload == first.payload


async def test_command_without_id_gets_one(probe: Probe, agents: AgentRunner) -> None:
    """A valid command without an id runs under an id the agent generates."""
    async with agents.run("picky"):
        await probe.publish(probe.topics.cmd("picky"), b'{"command": "ping"}')
        seen = await probe.wait_for(
            lambda s: s.result is not None and s.result.status is CommandStatus.SUCCEEDED,
            what="a succeeded ping",
        )
    assert seen.result is not None
    assert GENERATED_ID.fullmatch(seen.result.id)
    assert probe.statuses_of("picky", seen.result.id) == [
        CommandStatus.RECEIVED,
        CommandStatus.RUNNING,
        CommandStatus.SUCCEEDED,
    ]


async def test_malformed_copy_of_a_finished_command_keeps_its_result(
    probe: Probe, agents: AgentRunner
) -> None:
    """A malformed payload reusing a finished command's id never replaces that id's result."""
    async with agents.run("picky"):
        await probe.send("picky", "ping", id="once")
        first = await probe.wait_result("picky", "once", CommandStatus.SUCCEEDED)
        malformed = as_json({"command": "ping", "id": "once", "colour": "red"})
        await probe.publish(probe.topics.cmd("picky"), malformed)
        await probe.send("picky", "ping", id="once")
        ping = await probe.send("picky", "ping")
        await probe.wait_result("picky", ping, CommandStatus.SUCCEEDED)
    # The malformed copy and the valid duplicate are both answered with the original result.
    finals = [r for r in probe.results("picky", "once") if r.status.is_terminal]
    assert finals == [first, first, first]
