"""The controller with a signing key: everything it publishes runs on agents that require
signatures; a bad key stops it before it starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleet_agent.errors import ConfigError
from fleet_agent.protocol import CommandStatus
from fleet_agent.signing import generate_key_pair
from fleet_controller.app import create_app

from controller_testing import controller_settings, run_controller
from fleet_testing import AgentRunner, BrokerEndpoint, Probe

KeyPair = tuple[Path, Path]


@pytest.fixture
def keys(tmp_path: Path) -> KeyPair:
    """The fleet's key pair: (private, public)."""
    return generate_key_pair(tmp_path / "keys")


async def test_controller_signs_what_it_sends(
    amqtt_broker: BrokerEndpoint, tmp_path: Path, keys: KeyPair
) -> None:
    """With signing_key, the controller's dispatches, broadcasts, redeliveries and cancels
    all run on agents that require signatures."""
    settings = controller_settings(amqtt_broker, tmp_path / "f.sqlite3", signing_key=keys[0])
    runner = AgentRunner(amqtt_broker, tmp_path, command_public_key=keys[1])
    async with run_controller(settings) as c, Probe(amqtt_broker) as probe:
        async with runner.run("a1"), runner.run("a2"):
            await c.wait_agent("a1")
            await c.wait_agent("a2")
            one = (await c.send(target="a1", command="ping", wait=10)).json()
            assert one["status"] == "succeeded", one
            every = (await c.send(target="all", command="ping", wait=10)).json()
            assert every["status"] == "succeeded" and every["expected"] == 2, every
            sleep = (await c.send(target="a1", command="sleep", args={"seconds": 60})).json()
            await probe.wait_result("a1", sleep["id"], CommandStatus.RUNNING)
            r = await c.http.post(f"/api/v1/commands/{sleep['id']}/cancel", params={"wait": 10})
            assert r.json()["results"][0]["status"] == "canceled", r.text
        # Never connected, so the broker dropped the first copy: it arrives as a redelivery.
        late = (await c.send(target="a3", command="ping", allow_unknown=True)).json()
        async with runner.run("a3"):
            detail = await c.command(late["id"], wait=10)
    assert detail["status"] == "succeeded", detail


def test_bad_signing_key_is_a_config_error(tmp_path: Path, keys: KeyPair) -> None:
    """A missing signing key, or a public key given as the private one, is a ConfigError
    when the app is built, before anything starts."""
    endpoint = BrokerEndpoint("127.0.0.1", 1, "none")
    db = tmp_path / "f.sqlite3"
    with pytest.raises(ConfigError, match="cannot read signing key"):
        create_app(controller_settings(endpoint, db, signing_key=tmp_path / "nope.key"))
    with pytest.raises(ConfigError, match="not an unencrypted PEM private key"):
        create_app(controller_settings(endpoint, db, signing_key=keys[1]))


async def test_ttl_longer_than_agents_accept_is_refused_up_front(
    amqtt_broker: BrokerEndpoint, tmp_path: Path, keys: KeyPair
) -> None:
    """With a signing key, a ttl past signed_max_ttl is a 422 instead of a later refusal on
    every agent, and a default_ttl past it stops the start."""
    settings = controller_settings(amqtt_broker, tmp_path / "f.sqlite3", signing_key=keys[0])
    runner = AgentRunner(amqtt_broker, tmp_path, command_public_key=keys[1])
    async with run_controller(settings) as c, runner.run("a1"):
        await c.wait_agent("a1")
        r = await c.send(target="a1", command="ping", ttl=8 * 86400)
        assert r.status_code == 422 and "signed_max_ttl" in r.json()["message"], r.text
        r = await c.send(target="a1", command="ping", ttl=6 * 86400, wait=10)
        assert r.json()["status"] == "succeeded", r.text
    with pytest.raises(ConfigError, match="signed_max_ttl"):
        create_app(settings.model_copy(update={"default_ttl": 8 * 86400.0}))
