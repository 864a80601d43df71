"""MQTT over TLS against real brokers: a full command round trip, and every refusal that
makes TLS worth having (unknown CA, wrong hostname, plain TCP, missing client certificate)."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import httpx
import pytest
from test_cli import fleet
from test_fleet_up import ROOT, banner_token, fleet_up

from fleet_agent.mqtt import make_client
from fleet_agent.settings import BrokerSettings
from fleet_controller.broker import ServerTLS

from controller_testing import controller_settings, run_controller
from fleet_testing import (
    MOSQUITTO,
    AgentRunner,
    BrokerEndpoint,
    Issued,
    TestCA,
    bearer,
    free_port,
    mosquitto_tls_config,
    require,
    run_amqtt,
    run_mosquitto,
)

SHIPPED_MOSQUITTO_CONF = Path(__file__).resolve().parent.parent / "deploy/mosquitto/fleet.conf"
NOT_TRUSTED = "certificate verify failed: unable to get local issuer certificate"
DROPPED = "the broker closed the connection before accepting it"


@pytest.fixture
def ca(tmp_path: Path) -> TestCA:
    """The fleet's private CA, written under tmp_path."""
    return TestCA(tmp_path, "fleet")


@pytest.fixture
def server_cert(ca: TestCA) -> Issued:
    """The broker's certificate, for localhost and 127.0.0.1."""
    return ca.server()


@pytest.fixture
async def tls_broker(server_cert: Issued) -> AsyncIterator[BrokerEndpoint]:
    """The embedded broker with a TLS listener; no client certificate required."""
    async with run_amqtt(tls=ServerTLS(server_cert.cert, server_cert.key)) as endpoint:
        yield endpoint


@pytest.fixture
async def mtls_broker(ca: TestCA, server_cert: Issued) -> AsyncIterator[BrokerEndpoint]:
    """The embedded broker with a TLS listener that requires certificates from ``ca``."""
    async with run_amqtt(tls=ServerTLS(server_cert.cert, server_cert.key, ca.cert)) as endpoint:
        yield endpoint


async def connect(endpoint: BrokerEndpoint, **tls: Any) -> None:
    """Connect once through the fleet's own client factory and disconnect cleanly."""
    settings = BrokerSettings(broker_host=endpoint.host, broker_port=endpoint.port, **tls)
    async with make_client(settings, identifier="tls-probe", username="tls-probe") as client:
        await client.publish("fleet/tls-probe/probe", b"hello", qos=1)


async def refused(endpoint: BrokerEndpoint, **tls: Any) -> str:
    """The reason a connection attempt with these settings fails (it must fail)."""
    with pytest.raises(aiomqtt.MqttError) as caught:
        await connect(endpoint, **tls)
    return str(caught.value)


def fleet_env(tmp_path: Path) -> dict[str, str]:
    """Where `fleet` finds the `fleet up` started by ``fleet_up(tmp_path, ...)``."""
    return {"FLEET_STATE_DIR": str(tmp_path / "state")}


def client_tls(ca: TestCA, name: str | None) -> dict[str, Path]:
    """Settings that trust ``ca`` and, given a name, present a client certificate for it."""
    if name is None:
        return {"tls_ca": ca.cert}
    issued = ca.issue(name, server=False)
    return {"tls_ca": ca.cert, "tls_cert": issued.cert, "tls_key": issued.key}


async def ping_round_trip(
    endpoint: BrokerEndpoint, tmp_path: Path, ca: TestCA, *, client_certs: bool
) -> None:
    """A controller and agent a1 over TLS: a ping dispatched over HTTP comes back succeeded."""
    controller_tls = client_tls(ca, "fleet-controller" if client_certs else None)
    agents = AgentRunner(endpoint, tmp_path, **client_tls(ca, "a1" if client_certs else None))
    settings = controller_settings(endpoint, tmp_path / "fleet.sqlite3", **controller_tls)
    async with run_controller(settings) as controller, agents.run("a1"):
        await controller.wait_agent("a1")
        r = await controller.send(target="a1", command="ping", wait=10)
    assert r.status_code == 202, r.text
    body = r.json()
    assert (body["complete"], body["status"]) == (True, "succeeded"), body
    assert body["results"][0]["output"]["pong"] is True


async def test_round_trip_over_tls_through_embedded_broker(
    tls_broker: BrokerEndpoint, tmp_path: Path, ca: TestCA
) -> None:
    """Controller and agent verify the embedded broker's certificate and do a ping round trip."""
    await ping_round_trip(tls_broker, tmp_path, ca, client_certs=False)


async def test_round_trip_over_mutual_tls_through_embedded_broker(
    mtls_broker: BrokerEndpoint, tmp_path: Path, ca: TestCA
) -> None:
    """With client certificates required, controller and agent present theirs and round-trip."""
    await ping_round_trip(mtls_broker, tmp_path, ca, client_certs=True)


@pytest.mark.mosquitto
async def test_round_trip_over_tls_through_mosquitto(
    tmp_path: Path, ca: TestCA, server_cert: Issued
) -> None:
    """The same round trip through mosquitto with a TLS listener."""
    require(MOSQUITTO, "mosquitto")
    async with run_mosquitto(tmp_path, extra_config=mosquitto_tls_config(server_cert)) as endpoint:
        await ping_round_trip(endpoint, tmp_path, ca, client_certs=False)


def shipped_tls_example(server: Issued, ca: TestCA) -> list[str]:
    """The commented-out TLS listener options of deploy/mosquitto/fleet.conf, uncommented,
    with the test's files; the listener line itself is the test runner's, on a free port."""
    files = {"certfile": server.cert, "keyfile": server.key, "cafile": ca.cert}
    lines = []
    for line in SHIPPED_MOSQUITTO_CONF.read_text().splitlines():
        if line.startswith("#") and not line.startswith("# "):
            key, _, value = line[1:].partition(" ")
            if key != "listener":
                lines.append(f"{key} {files.get(key, value)}")
    return [*lines, "user root"]  # mosquitto as root would read them as user `mosquitto`


@pytest.mark.mosquitto
async def test_shipped_mosquitto_tls_example_does_mutual_tls(
    tmp_path: Path, ca: TestCA, server_cert: Issued
) -> None:
    """The shipped TLS example, uncommented: clients without a certificate are dropped, and
    controller and agent with theirs do a round trip."""
    require(MOSQUITTO, "mosquitto")
    example = shipped_tls_example(server_cert, ca)
    assert "tls_version tlsv1.2" in example and "require_certificate true" in example
    async with run_mosquitto(tmp_path, extra_config=example) as endpoint:
        assert DROPPED in await refused(endpoint, tls_ca=ca.cert)
        await ping_round_trip(endpoint, tmp_path, ca, client_certs=True)


@pytest.mark.parametrize("trust", ["other-ca", "system-store"])
async def test_client_that_does_not_trust_the_broker_ca_is_refused(
    tls_broker: BrokerEndpoint, tmp_path: Path, trust: str
) -> None:
    """A client trusting another CA, or only the system trust store, refuses the broker."""
    other = {"tls_ca": TestCA(tmp_path, "other").cert} if trust == "other-ca" else {"tls": True}
    assert NOT_TRUSTED in await refused(tls_broker, **other)


async def test_broker_certificate_itself_can_be_the_trust_anchor(
    tls_broker: BrokerEndpoint, server_cert: Issued
) -> None:
    """tls_ca may be the broker's own (CA-signed) certificate: the client pins it."""
    await connect(tls_broker, tls_ca=server_cert.cert)


@pytest.fixture
async def misnamed_broker(ca: TestCA) -> AsyncIterator[BrokerEndpoint]:
    """A TLS broker on 127.0.0.1 whose certificate, signed by the trusted CA, names another host."""
    other_host = ca.issue("broker.example.com", dns=("broker.example.com",), client=False)
    async with run_amqtt(tls=ServerTLS(other_host.cert, other_host.key)) as endpoint:
        yield endpoint


async def test_certificate_for_another_host_is_refused_by_default(
    misnamed_broker: BrokerEndpoint, ca: TestCA
) -> None:
    """Hostname verification is on by default: a trusted certificate for another host fails."""
    reason = await refused(misnamed_broker, tls_ca=ca.cert)
    assert "certificate is not valid for '127.0.0.1'" in reason


async def test_tls_insecure_accepts_another_host_and_warns(
    misnamed_broker: BrokerEndpoint, ca: TestCA, caplog: pytest.LogCaptureFixture
) -> None:
    """tls_insecure skips the hostname check (the CA check stays) and logs a warning."""
    with caplog.at_level(logging.WARNING, logger="fleet_agent.tls"):
        await connect(misnamed_broker, tls_ca=ca.cert, tls_insecure=True)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "hostname of broker 127.0.0.1 is not verified" in warnings[0].getMessage()
    assert NOT_TRUSTED in await refused(misnamed_broker, tls=True, tls_insecure=True)


async def test_plaintext_client_on_tls_port_fails_at_once(
    tls_broker: BrokerEndpoint, ca: TestCA
) -> None:
    """A plain-TCP client on the TLS port gets an MqttError at once; the broker keeps serving."""
    assert DROPPED in await refused(tls_broker)
    await connect(tls_broker, tls_ca=ca.cert)


async def test_mutual_tls_refuses_client_without_certificate(
    mtls_broker: BrokerEndpoint, ca: TestCA
) -> None:
    """A broker that requires client certificates drops a client that has none."""
    assert DROPPED in await refused(mtls_broker, tls_ca=ca.cert)


async def test_mutual_tls_refuses_certificate_from_another_ca(
    mtls_broker: BrokerEndpoint, ca: TestCA, tmp_path: Path
) -> None:
    """A client certificate signed by a CA the broker does not require is refused."""
    stranger = TestCA(tmp_path, "stranger").issue("a1", server=False)
    reason = await refused(
        mtls_broker, tls_ca=ca.cert, tls_cert=stranger.cert, tls_key=stranger.key
    )
    assert DROPPED in reason


async def test_mutual_tls_accepts_client_certificate_from_its_ca(
    mtls_broker: BrokerEndpoint, ca: TestCA
) -> None:
    """A client certificate signed by the required CA is accepted."""
    await connect(mtls_broker, **client_tls(ca, "a1"))


@pytest.mark.mosquitto
async def test_fleet_up_over_mutual_tls(tmp_path: Path, ca: TestCA, mosquitto_pub: str) -> None:
    """`fleet up` with --tls-cert/--tls-key/--tls-ca: its own agents and controller connect,
    `fleet send` works, and so does the mosquitto_pub example it prints."""
    # fleet up's own clients present the server certificate, so it allows client auth too.
    both = ca.issue("localhost", dns=("localhost",), ips=("127.0.0.1",))
    mqtt, http = free_port(), free_port()
    tls = ["--tls-cert", str(both.cert), "--tls-key", str(both.key), "--tls-ca", str(ca.cert)]
    args = ["--agents", "1", "--mqtt-port", str(mqtt), "--http-port", str(http), *tls]
    async with fleet_up(tmp_path, *args) as (_, banner):
        assert any("TLS" in line for line in banner), banner
        sent = await fleet("send", "all", "ping", "--wait", env=fleet_env(tmp_path))
        assert sent.code == 0, (sent.out, sent.err)
        pub = next(line.strip() for line in banner if line.strip().startswith("mosquitto_pub"))
        assert f"--cafile {ca.cert}" in pub
        # The example signs with `fleet sign` inside $(...): it needs a shell and the CLI.
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        run = await asyncio.create_subprocess_exec("sh", "-c", pub, cwd=ROOT, env=env)
        assert await run.wait() == 0
        auth = bearer(banner_token(banner))
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{http}", headers=auth) as client:
            r = await client.get("/api/v1/commands/hello-1", params={"wait": 10})
        assert r.json()["status"] == "succeeded", r.text
        plain = re.sub(r" --cafile \S+ --cert \S+ --key \S+", "", pub)
        assert plain != pub
        attempt = await asyncio.create_subprocess_exec(
            "sh", "-c", plain, cwd=ROOT, env=env, stderr=asyncio.subprocess.DEVNULL
        )
        assert await attempt.wait() != 0
