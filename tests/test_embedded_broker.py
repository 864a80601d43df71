"""The controller's embedded amqtt broker, as the tests and `fleet up` start it."""

from __future__ import annotations

import socket

import aiomqtt
import pytest

from fleet_controller.broker import EmbeddedBroker, load_broker_config
from fleet_controller.errors import PortInUse

from fleet_testing import BROKER_YAML, Probe, run_amqtt


async def test_busy_port_is_reported_as_port_in_use_naming_the_flag() -> None:
    """Starting on a port another socket listens on raises PortInUse naming the port and flag."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        config = load_broker_config(BROKER_YAML, host="127.0.0.1", port=port)
        with pytest.raises(PortInUse) as caught:
            async with EmbeddedBroker(config, port_flag="--mqtt-port"):
                pass
    assert caught.value.port == port
    assert caught.value.flag == "--mqtt-port"
    assert str(caught.value) == (
        f"MQTT port {port} on 127.0.0.1 is already in use; choose another with --mqtt-port"
    )


async def test_anonymous_clients_are_refused_and_named_ones_accepted() -> None:
    """broker.yaml refuses clients without a username, so every session can queue offline."""
    async with run_amqtt() as endpoint:
        anonymous = aiomqtt.Client(endpoint.host, endpoint.port, timeout=10)
        with pytest.raises(aiomqtt.MqttCodeError):
            async with anonymous:
                pass
        async with Probe(endpoint, username="someone") as named:
            await named.sync()
