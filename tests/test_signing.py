"""Signed commands: an agent with a public key runs only commands signed by the matching
private key for its own topic (or the broadcast topic), each at most once, and refusals never
stop a genuine command from running."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.rsa import generate_private_key
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from fleet_agent.agent import Agent
from fleet_agent.errors import ConfigError
from fleet_agent.protocol import Command, CommandStatus, Result, new_command_id, utcnow
from fleet_agent.signing import (
    BAD_SIGNATURE,
    NEEDS_ID_AND_EXPIRY,
    SIGNATURE_REQUIRED,
    Signer,
    WarningBudget,
    generate_key_pair,
)

from fleet_testing import AgentRunner, BrokerEndpoint, Probe

KeyPair = tuple[Path, Path]


@pytest.fixture
def keys(tmp_path: Path) -> KeyPair:
    """The fleet's key pair: (private, public)."""
    return generate_key_pair(tmp_path / "keys")


@pytest.fixture
def signer(keys: KeyPair) -> Signer:
    return Signer.from_file(keys[0])


class Marks:
    """A `run` command whose only effect is one line appended to a file, so a test can count
    how often it really ran."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def args(self, word: str) -> dict[str, Any]:
        return {"argv": ["sh", "-c", f'echo {word} >> "{self.path}"']}

    def lines(self) -> list[str]:
        return self.path.read_text().split() if self.path.exists() else []


@pytest.fixture
def marks(tmp_path: Path) -> Marks:
    return Marks(tmp_path / "marks.txt")


def new_signed_command(
    name: str, *, ttl: timedelta = timedelta(minutes=5), **fields: Any
) -> Command:
    """A command with what signed commands must carry: an id and an expiry."""
    fields.setdefault("id", new_command_id())
    return Command(command=name, expires_at=utcnow() + ttl, **fields)


async def publish_signed(
    probe: Probe, signer: Signer, agent: str, name: str, *, on: str | None = None, **fields: Any
) -> str:
    """Sign a command for ``agent``'s topic and publish it on ``on`` (default: the same)."""
    command = new_signed_command(name, **fields)
    topic = probe.topics.cmd(agent)
    await probe.publish(on or topic, signer.encode(topic, command))
    assert command.id is not None
    return command.id


async def refused(
    probe: Probe, agent: str, command_id: str, error: str, *, since: int = 0
) -> Result:
    result = await probe.wait_result(agent, command_id, since=since)
    assert result.status is CommandStatus.REJECTED, result
    assert result.error is not None and error in result.error, result
    return result


# -- the agent -------------------------------------------------------------------------------


async def test_signed_command_runs(
    probe: Probe, agents: AgentRunner, signer: Signer, keys: KeyPair, marks: Marks
) -> None:
    """A command signed for the agent's topic runs on an agent that requires signatures."""
    async with agents.run("a1", command_public_key=keys[1]):
        cid = await publish_signed(probe, signer, "a1", "run", args=marks.args("ok"))
        result = await probe.wait_result("a1", cid)
    assert result.status is CommandStatus.SUCCEEDED, result
    assert marks.lines() == ["ok"]


async def test_agent_without_a_key_accepts_signed_and_unsigned_commands(
    probe: Probe, agents: AgentRunner, signer: Signer
) -> None:
    """An agent with no public key ignores `sig`, so signing can be turned on before agents
    are given the key."""
    async with agents.run("a1"):
        signed = await publish_signed(probe, signer, "a1", "ping")
        plain = await probe.send("a1", "ping")
        results = [await probe.wait_result("a1", cid) for cid in (signed, plain)]
    assert [r.status for r in results] == [CommandStatus.SUCCEEDED] * 2, results


async def test_unsigned_command_is_rejected_and_not_run(
    probe: Probe, agents: AgentRunner, keys: KeyPair, marks: Marks
) -> None:
    """An unsigned command is answered `rejected: signature required` and never runs."""
    async with agents.run("a1", command_public_key=keys[1]):
        cid = await probe.send("a1", "run", args=marks.args("unsigned"))
        await refused(probe, "a1", cid, SIGNATURE_REQUIRED)
    assert marks.lines() == []


async def test_tampered_command_is_rejected(
    probe: Probe, agents: AgentRunner, signer: Signer, keys: KeyPair, marks: Marks
) -> None:
    """Changing a signed command's args after signing makes it `bad signature`."""
    command = new_signed_command("run", args=marks.args("good"))
    payload = json.loads(signer.encode(probe.topics.cmd("a1"), command))
    payload["args"] = marks.args("evil")
    async with agents.run("a1", command_public_key=keys[1]):
        await probe.publish(probe.topics.cmd("a1"), json.dumps(payload))
        await refused(probe, "a1", payload["id"], BAD_SIGNATURE)
    assert marks.lines() == []


async def test_signature_ignores_whitespace_and_key_order(
    probe: Probe, agents: AgentRunner, signer: Signer, keys: KeyPair
) -> None:
    """A signed command re-serialised with other spacing and key order is still accepted."""
    command = new_signed_command("ping")
    payload = json.loads(signer.encode(probe.topics.cmd("a1"), command))
    reordered = json.dumps(dict(reversed(payload.items())), indent=3, ensure_ascii=True)
    async with agents.run("a1", command_public_key=keys[1]):
        await probe.publish(probe.topics.cmd("a1"), reordered)
        result = await probe.wait_result("a1", payload["id"])
    assert result.status is CommandStatus.SUCCEEDED, result


async def test_command_signed_by_another_key_is_rejected(
    probe: Probe, agents: AgentRunner, keys: KeyPair, marks: Marks, tmp_path: Path
) -> None:
    """A well-formed signature made with a key the agent does not trust is `bad signature`."""
    other = Signer.from_file(generate_key_pair(tmp_path / "other")[0])
    async with agents.run("a1", command_public_key=keys[1]):
        cid = await publish_signed(probe, other, "a1", "run", args=marks.args("x"))
        await refused(probe, "a1", cid, BAD_SIGNATURE)
    assert marks.lines() == []


async def test_command_signed_for_another_topic_is_rejected(
    probe: Probe, agents: AgentRunner, signer: Signer, keys: KeyPair, marks: Marks
) -> None:
    """A command signed for a1 is refused on a2's topic and on the broadcast topic; one
    signed for the broadcast topic is refused on a1's own topic."""
    async with (
        agents.run("a1", command_public_key=keys[1]),
        agents.run("a2", command_public_key=keys[1]),
    ):
        on_a2 = await publish_signed(
            probe, signer, "a1", "run", args=marks.args("a2"), on=probe.topics.cmd("a2")
        )
        await refused(probe, "a2", on_a2, BAD_SIGNATURE)
        on_all = await publish_signed(
            probe, signer, "a1", "run", args=marks.args("all"), on=probe.topics.broadcast_cmd
        )
        await refused(probe, "a1", on_all, BAD_SIGNATURE)
        await refused(probe, "a2", on_all, BAD_SIGNATURE)
        broadcast = new_signed_command("run", args=marks.args("bc"))
        await probe.publish(
            probe.topics.cmd("a1"), signer.encode(probe.topics.broadcast_cmd, broadcast)
        )
        assert broadcast.id is not None
        await refused(probe, "a1", broadcast.id, BAD_SIGNATURE)
    assert marks.lines() == []


async def test_signed_broadcast_runs_on_every_agent(
    probe: Probe, agents: AgentRunner, signer: Signer, keys: KeyPair, marks: Marks
) -> None:
    """A command signed for the broadcast topic runs once on each agent."""
    command = new_signed_command("run", args=marks.args("bc"))
    async with (
        agents.run("a1", command_public_key=keys[1]),
        agents.run("a2", command_public_key=keys[1]),
    ):
        await probe.publish(
            probe.topics.broadcast_cmd, signer.encode(probe.topics.broadcast_cmd, command)
        )
        assert command.id is not None
        results = [await probe.wait_result(a, command.id) for a in ("a1", "a2")]
    assert [r.status for r in results] == [CommandStatus.SUCCEEDED] * 2, results
    assert marks.lines() == ["bc", "bc"]


async def test_replayed_signed_command_runs_once(
    probe: Probe, agents: AgentRunner, signer: Signer, keys: KeyPair, marks: Marks
) -> None:
    """Publishing the same signed payload again, even after a restart, does not run it again."""
    topic = probe.topics.cmd("a1")
    payload = signer.encode(topic, new_signed_command("run", id="once", args=marks.args("x")))
    async with agents.run("a1", command_public_key=keys[1]):
        await probe.publish(topic, payload)
        first = await probe.wait_result("a1", "once")
        mark = probe.mark()
        await probe.publish(topic, payload)
        again = await probe.wait_result("a1", "once", since=mark)
    mark = probe.mark()
    async with agents.run("a1", command_public_key=keys[1]):
        await probe.publish(topic, payload)
        after_restart = await probe.wait_result("a1", "once", since=mark)
    assert first.status is CommandStatus.SUCCEEDED, first
    assert again == first and after_restart == first
    assert marks.lines() == ["x"]


async def test_expired_signed_command_is_not_run(
    probe: Probe, agents: AgentRunner, signer: Signer, keys: KeyPair, marks: Marks
) -> None:
    """A validly signed command whose expires_at has passed is answered `expired`."""
    async with agents.run("a1", command_public_key=keys[1]):
        cid = await publish_signed(
            probe, signer, "a1", "run", args=marks.args("late"), ttl=timedelta(seconds=-1)
        )
        result = await probe.wait_result("a1", cid)
    assert result.status is CommandStatus.EXPIRED, result
    assert marks.lines() == []


async def test_expiry_beyond_ledger_retention_is_rejected(
    probe: Probe, agents: AgentRunner, signer: Signer, keys: KeyPair, marks: Marks
) -> None:
    """expires_at further ahead than the ledger remembers ids is refused: a replay could
    otherwise run again once the id is pruned."""
    async with agents.run("a1", command_public_key=keys[1], ledger_retention_days=1):
        far = await publish_signed(
            probe, signer, "a1", "run", args=marks.args("far"), ttl=timedelta(days=1, minutes=5)
        )
        await refused(probe, "a1", far, "expires_at is too far ahead")
        near = await publish_signed(
            probe, signer, "a1", "run", args=marks.args("near"), ttl=timedelta(hours=23)
        )
        result = await probe.wait_result("a1", near)
    assert result.status is CommandStatus.SUCCEEDED, result
    assert marks.lines() == ["near"]


async def test_signed_command_without_id_or_expiry_is_rejected(
    probe: Probe, agents: AgentRunner, signer: Signer, keys: KeyPair, marks: Marks
) -> None:
    """A correct signature over a command without expires_at (or without id) is refused."""
    topic = probe.topics.cmd("a1")
    no_expiry = Command(command="run", id="no-expiry", args=marks.args("x"))
    async with agents.run("a1", command_public_key=keys[1]):
        await probe.publish(topic, signer.encode(topic, no_expiry))
        await refused(probe, "a1", "no-expiry", NEEDS_ID_AND_EXPIRY)
        mark = probe.mark()
        no_id = Command(command="run", args=marks.args("y"), expires_at=utcnow() + timedelta(1))
        await probe.publish(topic, signer.encode(topic, no_id))
        seen = await probe.wait_for(lambda s: s.result is not None, since=mark)
    assert seen.result is not None and seen.result.error == NEEDS_ID_AND_EXPIRY
    assert marks.lines() == []


async def test_forgeries_with_a_pending_id_do_not_block_the_real_command(
    probe: Probe, agents: AgentRunner, signer: Signer, keys: KeyPair, marks: Marks
) -> None:
    """Unsigned, invalid and unsigned-cancel payloads that use the id of a command not yet
    delivered are refused without being recorded: the signed command then runs."""
    async with agents.run("a1", command_public_key=keys[1]):
        forged = await probe.send("a1", "run", id="real-1", args=marks.args("forged"))
        await refused(probe, "a1", forged, SIGNATURE_REQUIRED)
        mark = probe.mark()
        await probe.publish(probe.topics.cmd("a1"), '{"id":"real-1","command":"run","x":1}')
        await refused(probe, "a1", "real-1", "invalid command", since=mark)
        cancel = await probe.send("a1", "cancel", args={"command_id": "real-1"})
        await refused(probe, "a1", cancel, SIGNATURE_REQUIRED)
        mark = probe.mark()
        await publish_signed(probe, signer, "a1", "run", id="real-1", args=marks.args("real"))
        result = await probe.wait_result("a1", "real-1", since=mark)
    assert result.status is CommandStatus.SUCCEEDED, result
    assert marks.lines() == ["real"]


async def test_unsigned_cancel_is_rejected(
    probe: Probe, agents: AgentRunner, signer: Signer, keys: KeyPair
) -> None:
    """An unsigned cancel leaves the running command alone; a signed one cancels it."""
    async with agents.run("a1", command_public_key=keys[1]):
        target = await publish_signed(probe, signer, "a1", "sleep", args={"seconds": 60})
        await probe.wait_result("a1", target, CommandStatus.RUNNING)
        unsigned = await probe.send("a1", "cancel", args={"command_id": target})
        await refused(probe, "a1", unsigned, SIGNATURE_REQUIRED)
        assert probe.statuses_of("a1", target)[-1] is CommandStatus.RUNNING
        cancel = await publish_signed(probe, signer, "a1", "cancel", args={"command_id": target})
        result = await probe.wait_result("a1", target)
        ack = await probe.wait_result("a1", cancel)
    assert result.status is CommandStatus.CANCELED and result.error == f"canceled by {cancel}"
    assert ack.status is CommandStatus.SUCCEEDED


async def test_bad_public_key_is_a_config_error(
    amqtt_broker: BrokerEndpoint, tmp_path: Path, keys: KeyPair
) -> None:
    """A missing public key file, a private key given as the public one, or a key of another
    type stops the agent at start with a ConfigError naming the file."""
    runner = AgentRunner(amqtt_broker, tmp_path)
    with pytest.raises(ConfigError, match=r"cannot read command public key .*nope\.pub"):
        Agent(runner.settings("a1", command_public_key=tmp_path / "nope.pub"))
    with pytest.raises(ConfigError, match="is not a PEM public key"):
        Agent(runner.settings("a1", command_public_key=keys[0]))
    rsa = tmp_path / "rsa.pub"
    rsa.write_bytes(
        generate_private_key(public_exponent=65537, key_size=2048)
        .public_key()
        .public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(ConfigError, match="is not an Ed25519 key"):
        Agent(runner.settings("a1", command_public_key=rsa))


def test_refusal_warnings_are_bounded(caplog: pytest.LogCaptureFixture) -> None:
    """A flood of refusals logs at most the budget, then says how many were suppressed."""
    budget = WarningBudget(logging.getLogger("test-budget"), limit=3, period=3600)
    with caplog.at_level(logging.WARNING, logger="test-budget"):
        for i in range(50):
            budget.warn("refused %d", i)
    assert [r.getMessage() for r in caplog.records] == ["refused 0", "refused 1", "refused 2"]


def test_agent_without_a_key_does_not_import_cryptography() -> None:
    """Importing the agent and its CLI does not load the cryptography package."""
    code = "import sys, fleet_agent.agent, fleet_agent.cli; print('cryptography' in sys.modules)"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


# -- the controller ----------------------------------------------------------------------
