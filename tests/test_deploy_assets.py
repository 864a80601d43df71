"""The shipped configuration files work as shipped."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiomqtt
import pytest
import yaml

from fleet_agent.mqtt import NODELAY
from fleet_agent.protocol import Command, CommandStatus, decode_result, encode
from fleet_controller.broker import BUILTIN_CONFIG
from fleet_controller.credentials import Credentials, Role

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


def shipped_config_for_test(workdir: Path, credentials: Credentials) -> list[str]:
    """The shipped mosquitto config with only its paths and listener replaced (port chosen
    by the test runner, files under tmp_path, logs to stderr with the `information` level
    for the readiness check)."""
    lines = []
    for line in SHIPPED.read_text().splitlines():
        key = line.split(" ", 1)[0]
        if key in ("listener", "log_dest"):
            continue
        if key == "password_file":
            line = f"password_file {credentials.mosquitto_passwords}"
        elif key == "acl_file":
            line = f"acl_file {credentials.mosquitto_acl}"
        lines.append(line)
    # Debian's main config sets persistence_location, so the shipped file leaves it out.
    return [*lines, f"persistence_location {workdir}/", "log_type information"]


async def test_round_trip_through_shipped_mosquitto_config(
    tmp_path: Path, mosquitto_pub: str
) -> None:
    """An agent and an operator made by `fleet credentials` do a round trip through
    deploy/mosquitto/fleet.conf; anonymous clients are refused."""
    require(MOSQUITTO, "mosquitto")
    creds = Credentials(tmp_path / "mqtt")
    passwords = creds.add_many([("a1", Role.AGENT), ("operator", Role.OPERATOR)])
    (tmp_path / "data").mkdir()
    (tmp_path / "data").chmod(0o777)
    extra = [*shipped_config_for_test(tmp_path / "data", creds), "user root"]
    async with run_mosquitto(tmp_path, extra_config=extra, defaults=False) as endpoint:
        with pytest.raises(aiomqtt.MqttError):
            async with aiomqtt.Client(endpoint.host, endpoint.port, identifier="anon"):
                pass
        runner = AgentRunner(endpoint, tmp_path, password=passwords["a1"])
        async with runner.run("a1"), aiomqtt.Client(
            endpoint.host, endpoint.port, username="operator", password=passwords["operator"],
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
