"""Fixtures: real brokers on free ports (embedded amqtt and a mosquitto process), a probe
client that records what the fleet publishes, and agents that can be restarted."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from fleet_testing import (
    BROKER_KINDS,
    MOSQUITTO,
    AgentRunner,
    BrokerEndpoint,
    Probe,
    require,
    run_amqtt,
    run_mosquitto,
)

MOSQUITTO_PUB = Path("/usr/bin/mosquitto_pub")


@pytest.fixture
async def amqtt_broker() -> AsyncIterator[BrokerEndpoint]:
    """The controller's embedded amqtt broker, configured by the repository's broker.yaml."""
    async with run_amqtt() as endpoint:
        yield endpoint


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--chaos-scale",
        type=int,
        default=1,
        help="Multiply the chaos soak test's agents and commands by this factor.",
    )


@pytest.fixture
def chaos_scale(request: pytest.FixtureRequest) -> int:
    """How much larger than the CI size the chaos soak runs (--chaos-scale)."""
    scale: int = request.config.getoption("--chaos-scale")
    return max(scale, 1)


@pytest.fixture
def mosquitto_pub() -> str:
    """Path of the real mosquitto_pub client."""
    return require(MOSQUITTO_PUB, "mosquitto-clients")


@pytest.fixture
async def mosquitto_broker(tmp_path: Path) -> AsyncIterator[BrokerEndpoint]:
    """A mosquitto process with a config written to tmp_path."""
    require(MOSQUITTO, "mosquitto")
    async with run_mosquitto(tmp_path) as endpoint:
        yield endpoint


@pytest.fixture(params=BROKER_KINDS)
def broker(request: pytest.FixtureRequest) -> BrokerEndpoint:
    """Each test that uses it runs once against amqtt and once against mosquitto."""
    endpoint: BrokerEndpoint = request.getfixturevalue(f"{request.param}_broker")
    return endpoint


@pytest.fixture
async def probe(broker: BrokerEndpoint) -> AsyncIterator[Probe]:
    """Connected and subscribed before any agent starts, so it sees every message."""
    async with Probe(broker) as p:
        yield p


@pytest.fixture
def agents(broker: BrokerEndpoint, tmp_path: Path) -> AgentRunner:
    """Start agents with ``agents.run(agent_id)``; the same id again is a restart."""
    return AgentRunner(broker, tmp_path)
