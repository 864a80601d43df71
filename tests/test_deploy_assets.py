"""The shipped configuration files work as shipped."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import aiomqtt
import pytest
import yaml

from fleet_agent.mqtt import NODELAY
from fleet_agent.protocol import Command, CommandStatus, decode_result, encode
from fleet_controller.broker import BUILTIN_CONFIG

from fleet_testing import (
    DEFAULT_TIMEOUT,
    MOSQUITTO,
    AgentRunner,
    BrokerEndpoint,
    require,
    run_mosquitto,
)

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "deploy" / "mosquitto" / "fleet.conf"


def test_builtin_broker_config_matches_broker_yaml() -> None:
    """The built-in embedded-broker config is exactly the repository's broker.yaml."""
    assert yaml.safe_load((ROOT / "broker.yaml").read_text()) == BUILTIN_CONFIG


def shipped_config_for_test(workdir: Path, password_file: Path) -> list[str]:
    """The shipped mosquitto config with only its paths and listener replaced (port chosen
    by the test runner, files under tmp_path, logs to stderr with the `information` level
    for the readiness check)."""
    lines = []
    for line in SHIPPED.read_text().splitlines():
        key = line.split(" ", 1)[0]
        if key in ("listener", "log_dest"):
            continue
        if key == "password_file":
            line = f"password_file {password_file}"
        elif key == "persistence_location":
            line = f"persistence_location {workdir}/"
        lines.append(line)
    return [*lines, "log_type information"]


async def passwd(path: Path, user: str, password: str) -> None:
    mosquitto_passwd = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    flags = ["-b"] if path.is_file() else ["-c", "-b"]  # noqa: ASYNC240 - a stat
    proc = await asyncio.create_subprocess_exec(mosquitto_passwd, *flags, str(path), user, password)
    assert await proc.wait() == 0


async def test_round_trip_through_shipped_mosquitto_config(
    tmp_path: Path, mosquitto_pub: str
) -> None:
    """An agent and an operator with passwords do a round trip through deploy/mosquitto/fleet.conf;
    anonymous clients are refused."""
    require(MOSQUITTO, "mosquitto")
    pw = tmp_path / "fleet.passwd"
    await passwd(pw, "a1", "agent-secret")
    await passwd(pw, "operator", "operator-secret")
    pw.chmod(0o644)
    (tmp_path / "data").mkdir()
    (tmp_path / "data").chmod(0o777)
    extra = [*shipped_config_for_test(tmp_path / "data", pw), "user root"]
    async with run_mosquitto(tmp_path, extra_config=extra, defaults=False) as endpoint:
        with pytest.raises(aiomqtt.MqttError):
            async with aiomqtt.Client(endpoint.host, endpoint.port, identifier="anon"):
                pass
        runner = AgentRunner(endpoint, tmp_path, password="agent-secret")
        async with runner.run("a1"), aiomqtt.Client(
            endpoint.host, endpoint.port, username="operator", password="operator-secret",
            socket_options=NODELAY,
        ) as client:  # fmt: skip
            await client.subscribe("fleet/a1/result", qos=1)
            await client.publish("fleet/a1/cmd", encode(Command(id="c1", command="ping")), qos=1)
            async with asyncio.timeout(DEFAULT_TIMEOUT):
                async for message in client.messages:
                    assert isinstance(message.payload, bytes)
                    result = decode_result(message.payload, max_bytes=1 << 20)
                    if result.status is CommandStatus.SUCCEEDED:
                        break
    assert result.id == "c1"
    assert isinstance(endpoint, BrokerEndpoint)
