"""MQTT identities: each attack on the broker layer, against amqtt (with the fleet's auth
plugins) and against mosquitto (with the password and ACL files `fleet credentials` writes)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
import pytest

from fleet_agent.mqtt import NODELAY
from fleet_agent.protocol import Command, CommandStatus, Result, Topics, encode, new_command_id
from fleet_controller.credentials import Credentials, Role, filter_covers

from controller_testing import controller_settings, run_controller
from fleet_testing import (
    BROKER_KINDS,
    DEFAULT_TIMEOUT,
    AgentRunner,
    BrokerEndpoint,
    run_secure_broker,
)

TOPICS = Topics()


@dataclass
class Fleet:
    endpoint: BrokerEndpoint
    passwords: dict[str, str]
    creds: Credentials
    agents: AgentRunner


@pytest.fixture(params=BROKER_KINDS)
async def fleet(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Fleet]:
    """A broker that checks logins and topics; users a1, a2 (agents), fleet-controller, ops."""
    creds = Credentials(tmp_path / "mqtt")
    users = [
        ("a1", Role.AGENT),
        ("a2", Role.AGENT),
        ("fleet-controller", Role.CONTROLLER),
        ("ops", Role.OPERATOR),
    ]
    passwords = {name: creds.add(name, role) for name, role in users}
    async with run_secure_broker(request.param, tmp_path, creds.directory) as endpoint:
        yield Fleet(endpoint, passwords, creds, AgentRunner(endpoint, tmp_path))


def client(
    fleet: Fleet,
    username: str | None,
    password: str | None = None,
    *,
    identifier: str | None = None,
    clean_session: bool = True,
) -> aiomqtt.Client:
    """A raw MQTT client; by default with the user's own password and client id."""
    if password is None and username is not None:
        password = fleet.passwords.get(username)
    return aiomqtt.Client(
        fleet.endpoint.host,
        fleet.endpoint.port,
        identifier=identifier or username or "",
        username=username,
        password=password,
        clean_session=clean_session,
        socket_options=NODELAY,
        timeout=DEFAULT_TIMEOUT,
    )


@contextlib.asynccontextmanager
async def agent(fleet: Fleet, agent_id: str) -> AsyncIterator[None]:
    async with fleet.agents.run(agent_id, password=fleet.passwords[agent_id]):
        yield


async def next_message(c: aiomqtt.Client) -> aiomqtt.Message:
    async with asyncio.timeout(DEFAULT_TIMEOUT):
        return await anext(aiomqtt_messages(c))


async def aiomqtt_messages(c: aiomqtt.Client) -> AsyncIterator[aiomqtt.Message]:
    async for message in c.messages:
        yield message


async def wait_result(c: aiomqtt.Client, command_id: str, status: CommandStatus) -> Result:
    """The first result for ``command_id`` with ``status`` that ``c`` receives."""
    async with asyncio.timeout(DEFAULT_TIMEOUT):
        async for message in c.messages:
            result = Result.model_validate_json(bytes(message.payload))  # type: ignore[arg-type]
            if result.id == command_id and result.status is status:
                return result
    raise AssertionError("message stream ended")


@pytest.mark.parametrize(
    ("username", "password", "identifier"),
    [
        ("a1", "wrong-password", None),
        ("a1", "", None),
        ("nobody", "whatever", None),
        (None, None, "a1"),
    ],
    ids=["wrong-password", "empty-password", "unknown-user", "anonymous"],
)
async def test_login_without_the_right_password_is_refused(
    fleet: Fleet, username: str | None, password: str | None, identifier: str | None
) -> None:
    """A wrong, empty or missing password, or an unknown user, gets no connection."""
    async with client(fleet, "a1"):
        pass  # the right password works
    with pytest.raises(aiomqtt.MqttCodeError):
        async with client(fleet, username, password, identifier=identifier):
            pass


async def test_agent_cannot_read_another_agents_commands(fleet: Fleet) -> None:
    """a1 subscribing to fleet/a2/cmd, fleet/+/cmd or fleet/# receives nothing of a2's."""
    async with client(fleet, "a1") as a1, client(fleet, "ops") as ops:
        for topic in (TOPICS.cmd("a2"), "fleet/+/cmd", "fleet/#", TOPICS.cmd("a1")):
            with contextlib.suppress(aiomqtt.MqttError):  # a refused SUBACK is fine too
                await a1.subscribe(topic, qos=1)
        await ops.publish(TOPICS.cmd("a2"), b'{"command":"ping","id":"for-a2"}', qos=1)
        await ops.publish(TOPICS.cmd("a1"), b'{"command":"ping","id":"for-a1"}', qos=1)
        # One publisher's messages arrive in order: a2's would come before this marker.
        first = await next_message(a1)
        assert str(first.topic) == TOPICS.cmd("a1"), (first.topic, first.payload)


async def test_agent_gets_no_other_agents_retained_messages(fleet: Fleet) -> None:
    """Logging in as a1 hands it none of a2's retained status or retained commands."""
    async with agent(fleet, "a2"), client(fleet, "ops") as ops:
        await ops.publish(TOPICS.cmd("a2"), b'{"command":"ping","id":"kept"}', qos=1, retain=True)
        async with client(fleet, "a1", clean_session=False) as a1:
            await a1.subscribe(TOPICS.cmd("a1"), qos=1)
            await ops.publish(TOPICS.cmd("a1"), b'{"command":"ping","id":"for-a1"}', qos=1)
            first = await next_message(a1)  # a2's retained messages would have come first
            assert str(first.topic) == TOPICS.cmd("a1"), (first.topic, first.payload)
        await ops.publish(TOPICS.cmd("a2"), b"", qos=1, retain=True)


async def test_forged_result_for_another_agent_is_not_recorded(
    fleet: Fleet, tmp_path: Path
) -> None:
    """a1 publishing a result for a2's command (on a2's topic or its own) changes nothing."""
    settings = controller_settings(
        fleet.endpoint,
        tmp_path / "c.sqlite3",
        password=fleet.passwords["fleet-controller"],
        sweep_grace=0,
    )
    async with run_controller(settings) as ctl:
        for agent_id in ("a1", "a2"):
            async with agent(fleet, agent_id):
                await ctl.wait_agent(agent_id)
            await ctl.wait_agent(agent_id, until="offline")
        r = await ctl.send(target="a2", command="ping")
        assert r.status_code == 202, r.text
        victim = r.json()["id"]
        r = await ctl.send(target="a1", command="ping")
        own = r.json()["id"]
        async with client(fleet, "a1", clean_session=False) as a1:
            forged = Result(id=victim, agent="a2", status=CommandStatus.SUCCEEDED, output="pwned")
            await a1.publish(TOPICS.result("a2"), encode(forged), qos=1)
            await a1.publish(TOPICS.result("a1"), encode(forged), qos=1)
            await a1.publish(TOPICS.cmd("a2"), b'{"command":"run","id":"x"}', qos=1)
            honest = Result(id=own, agent="a1", status=CommandStatus.SUCCEEDED, output="pong")
            await a1.publish(TOPICS.result("a1"), encode(honest), qos=1)
            # The controller reads a1's messages in order: once the honest one is in, the
            # forged ones have been dropped.
            done = await ctl.command(own, wait=DEFAULT_TIMEOUT)
            assert done["status"] == "succeeded", done
        detail = await ctl.command(victim)
        assert detail["status"] == "pending", detail
        assert detail["results"][0]["output"] is None, detail


async def test_client_id_takeover_of_another_agent_is_refused(fleet: Fleet) -> None:
    """a1's credentials with client id a2 cannot take over a2's session or read its commands."""
    async with agent(fleet, "a2"), client(fleet, "ops") as ops:
        await ops.subscribe(TOPICS.result("a2"), qos=1)
        try:
            async with client(fleet, "a1", identifier="a2", clean_session=False) as thief:
                # mosquitto makes the username the client id: the thief is just a1.
                assert fleet.endpoint.kind == "mosquitto"
                await thief.subscribe(TOPICS.cmd("a2"), qos=1)
                await thief.subscribe(TOPICS.cmd("a1"), qos=1)
                await run_ping(ops, "a2")
                await ops.publish(TOPICS.cmd("a1"), b'{"command":"ping","id":"marker"}', qos=1)
                first = await next_message(thief)  # a2's command would have come first
                assert str(first.topic) == TOPICS.cmd("a1"), (first.topic, first.payload)
        except aiomqtt.MqttCodeError:
            assert fleet.endpoint.kind == "amqtt"  # the login itself is refused
        await run_ping(ops, "a2")  # a2 still has its session and still answers


async def test_failed_login_as_an_agent_leaves_its_queued_commands(fleet: Fleet) -> None:
    """A clean-session login as a2 with a wrong password does not wipe a2's offline queue."""
    async with agent(fleet, "a2"):
        pass
    async with client(fleet, "ops") as ops:
        await ops.subscribe(TOPICS.result("a2"), qos=1)
        command_id = new_command_id()
        command = Command(command="ping", id=command_id)
        await ops.publish(TOPICS.cmd("a2"), encode(command), qos=1)
        with pytest.raises(aiomqtt.MqttCodeError):
            async with client(fleet, "a2", "wrong", clean_session=True):
                pass
        async with agent(fleet, "a2"):
            await wait_result(ops, command_id, CommandStatus.SUCCEEDED)


async def run_ping(ops: aiomqtt.Client, agent_id: str) -> None:
    command_id = new_command_id()
    await ops.publish(TOPICS.cmd(agent_id), encode(Command(command="ping", id=command_id)), qos=1)
    await wait_result(ops, command_id, CommandStatus.SUCCEEDED)


async def test_credentials_cli_adds_and_removes_users_on_a_running_broker(tmp_path: Path) -> None:
    """`fleet credentials add` lets a new agent log in at once; `remove` locks it out again."""
    directory = tmp_path / "mqtt"
    secret = tmp_path / "a9.password"
    creds = Credentials(directory)
    creds.add("fleet-controller", Role.CONTROLLER)
    async with run_secure_broker("amqtt", tmp_path, directory) as endpoint:
        added = await fleet_cli(
            "credentials", "add", "a9", "--role", "agent", "--dir", str(directory),
            "--password-file", str(secret),
        )  # fmt: skip
        assert added.returncode == 0, added.stderr
        password = secret.read_text().strip()
        assert password in added.stdout.replace("\n", "")
        assert secret.stat().st_mode & 0o777 == 0o600
        listed = await fleet_cli("credentials", "list", "--dir", str(directory))
        assert "a9" in listed.stdout and "agent" in listed.stdout, listed.stdout
        runner = AgentRunner(endpoint, tmp_path)
        async with runner.run("a9", password_file=secret):
            pass
        nowhere = await fleet_cli(
            "credentials", "add", "a8", "--role", "agent", "--dir", str(directory),
            "--password-file", str(tmp_path / "missing" / "a8.password"),
        )  # fmt: skip
        assert nowhere.returncode == 2 and "cannot write" in nowhere.stderr, nowhere.stderr
        assert "a8" not in creds.users()
        again = await fleet_cli(
            "credentials", "add", "a9", "--role", "agent", "--dir", str(directory)
        )
        assert again.returncode == 2 and "--replace" in again.stderr, again.stderr
        removed = await fleet_cli("credentials", "remove", "a9", "--dir", str(directory))
        assert removed.returncode == 0, removed.stderr
        fake = Fleet(endpoint, {"a9": password}, creds, runner)
        with pytest.raises(aiomqtt.MqttCodeError):
            async with client(fake, "a9"):
                pass


@dataclass
class CliRun:
    returncode: int
    stdout: str
    stderr: str


async def fleet_cli(*args: str) -> CliRun:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fleet_controller", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    async with asyncio.timeout(DEFAULT_TIMEOUT * 3):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return CliRun(proc.returncode, out.decode(), err.decode())


def _mqtt_string(data: bytes) -> bytes:
    return len(data).to_bytes(2, "big") + data


async def connect_with_will(
    fleet: Fleet, username: str, will_topic: str, will: bytes
) -> tuple[int, asyncio.StreamWriter]:
    """A hand-made MQTT 3.1.1 CONNECT with a QoS 1 Last Will; returns the CONNACK code and
    the open connection, so the caller can drop it without DISCONNECT (which fires the will)."""
    password = fleet.passwords[username].encode()
    flags = 0x80 | 0x40 | 0x08 | 0x04 | 0x02  # username, password, will QoS 1, will, clean
    body = _mqtt_string(b"MQTT") + bytes([4, flags]) + (30).to_bytes(2, "big")
    body += b"".join(
        _mqtt_string(x) for x in (username.encode(), will_topic.encode(), will, username.encode())
    )
    body += _mqtt_string(password)
    assert len(body) < 128  # one-byte remaining length
    reader, writer = await asyncio.open_connection(fleet.endpoint.host, fleet.endpoint.port)
    writer.write(bytes([0x10, len(body)]) + body)
    async with asyncio.timeout(DEFAULT_TIMEOUT):
        connack = await reader.readexactly(4)
    return connack[3], writer


async def test_last_will_cannot_publish_where_the_client_may_not(fleet: Fleet) -> None:
    """a1 cannot get a command onto a2's topic through its Last Will."""
    async with client(fleet, "a2", clean_session=False) as a2, client(fleet, "ops") as ops:
        await a2.subscribe(TOPICS.cmd("a2"), qos=1)
        await ops.subscribe(TOPICS.status("a1"), qos=1)
        forged = b'{"command":"ping","id":"via-will"}'
        _, sneaky = await connect_with_will(fleet, "a1", TOPICS.cmd("a2"), forged)
        # A second login as a1 takes over (or follows) the first, so the first will has been
        # dealt with once this one is accepted; dropping it fires an allowed will we can see.
        code, control = await connect_with_will(fleet, "a1", TOPICS.status("a1"), b"control")
        assert code == 0
        sneaky.transport.abort()
        control.transport.abort()
        seen = await next_message(ops)
        assert seen.payload == b"control", seen.payload
        await ops.publish(TOPICS.cmd("a2"), b'{"command":"ping","id":"marker"}', qos=1)
        first = await next_message(a2)
        assert b"marker" in bytes(first.payload), first.payload  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("allowed", "requested", "covered"),
    [
        ("fleet/a1/cmd", "fleet/a1/cmd", True),
        ("fleet/a1/cmd", "fleet/a2/cmd", False),
        ("fleet/a1/cmd", "fleet/+/cmd", False),
        ("fleet/a1/cmd", "fleet/#", False),
        ("fleet/a1/cmd", "fleet/a1/cmd/x", False),
        ("fleet/a1/cmd", "fleet/a1", False),
        ("fleet/+/result", "fleet/+/result", True),
        ("fleet/+/result", "fleet/a9/result", True),
        ("fleet/+/result", "fleet/#", False),
        ("fleet/+/result", "fleet//result", True),
        ("fleet/#", "fleet/a/b/c", True),
        ("fleet/#/x", "fleet/a/x", False),
    ],
)
def test_acl_filter_cover(allowed: str, requested: str, covered: bool) -> None:
    """A subscription passes only if every topic it can match is matched by the rule."""
    assert filter_covers(allowed, requested) is covered


@pytest.mark.parametrize("prefix", ["#", "fleet/+", "fleet\nuser x\ntopic readwrite #", ""])
async def test_credentials_refuse_a_prefix_that_would_bend_the_acl(
    tmp_path: Path, prefix: str
) -> None:
    """A topic prefix with wildcards or line breaks is a one-line error, and no file is written."""
    run = await fleet_cli(
        "credentials", "add", "x1", "--role", "agent", "--dir", str(tmp_path / "mqtt"),
        "--prefix", prefix,
    )  # fmt: skip
    assert run.returncode == 2, (run.stdout, run.stderr)
    assert "invalid topic prefix" in run.stderr
    assert not (tmp_path / "mqtt").exists()
