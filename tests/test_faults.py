"""The fault-injection harness itself: the proxy forwards, cuts, stalls, refuses and
retargets connections; the broker and the controller survive SIGKILL and restart on the same
ports as real processes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from fleet_agent.protocol import AgentState, CommandStatus

from fleet_testing import (
    DEFAULT_TIMEOUT,
    MOSQUITTO,
    PROCESS_START_TIMEOUT,
    AgentRunner,
    BrokerEndpoint,
    BrokerProcess,
    ControllerProcess,
    FaultProxy,
    Probe,
    require,
    run_amqtt,
    run_traced_agent,
)

BRISK = {"reconnect_min": 0.05, "reconnect_max": 0.2}
"""Agent settings that reconnect within a fraction of a second, whatever the backoff drew."""


@pytest.fixture
async def proxy(amqtt_broker: BrokerEndpoint) -> AsyncIterator[FaultProxy]:
    """A fault proxy in front of the embedded amqtt broker."""
    async with FaultProxy(amqtt_broker) as p:
        yield p


@pytest.fixture
async def direct_probe(amqtt_broker: BrokerEndpoint) -> AsyncIterator[Probe]:
    """A probe connected straight to the broker, never through the proxy."""
    async with Probe(amqtt_broker) as p:
        yield p


@pytest.fixture
def proxied(proxy: FaultProxy, tmp_path: Path) -> AgentRunner:
    """Agents that reach the broker through the proxy."""
    return AgentRunner(proxy.endpoint, tmp_path, **BRISK)


@pytest.fixture
def mosquitto_binary() -> None:
    """Skips without mosquitto on a developer's machine; fails in CI, where nothing may skip."""
    require(MOSQUITTO, "mosquitto")


class TestFaultProxy:
    async def test_agent_process_round_trips_through_the_proxy_and_after_a_restart(
        self, proxy: FaultProxy, proxied: AgentRunner, direct_probe: Probe
    ) -> None:
        """An agent process behind the proxy answers a ping, and again after SIGKILL and start."""
        process = proxied.process("far")
        try:
            async with process:
                await direct_probe.wait_status("far", AgentState.ONLINE, timeout=30)
                first = await direct_probe.send("far", "ping")
                await direct_probe.wait_result("far", first, CommandStatus.SUCCEEDED)
                assert (proxy.accepted, proxy.active) == (1, 1)

                assert await process.kill() == -9
                await proxy.wait_for(lambda: proxy.active == 0, what="the dead agent's pair gone")
                mark = direct_probe.mark()
                await process.start()
                await direct_probe.wait_status(
                    "far", AgentState.ONLINE, since=mark, timeout=PROCESS_START_TIMEOUT
                )
                second = await direct_probe.send("far", "ping")
                await direct_probe.wait_result("far", second, CommandStatus.SUCCEEDED)
                assert (proxy.accepted, proxy.active) == (2, 1)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nagent log:\n{process.log()}") from None

    async def test_cut_makes_an_agent_reconnect_and_serve_again(
        self, proxy: FaultProxy, proxied: AgentRunner, direct_probe: Probe
    ) -> None:
        """cut() drops the agent (online clears, the broker fires its will); it comes back."""
        async with run_traced_agent(proxied, "a1") as (_, online):
            mark, seen = online.mark(), direct_probe.mark()
            assert proxy.cut() == 1
            lost = await online.wait_transition(False, since=mark)
            await online.wait_transition(True, since=lost)
            will = await direct_probe.wait_status("a1", AgentState.OFFLINE, since=seen)
            await direct_probe.wait_status("a1", AgentState.ONLINE, since=seen)
            cid = await direct_probe.send("a1", "ping")
            await direct_probe.wait_result("a1", cid, CommandStatus.SUCCEEDED)
        assert will.reason == "connection lost"
        assert (proxy.cuts, proxy.accepted) == (1, 2)

    async def test_stall_delays_a_command_until_resume_without_losing_it(
        self, proxy: FaultProxy, proxied: AgentRunner, direct_probe: Probe
    ) -> None:
        """A command sent during a stall waits in the proxy and runs once after resume()."""
        async with run_traced_agent(proxied, "a1") as (_, online):
            proxy.stall()
            cid = await direct_probe.send("a1", "ping", id="stalled-ping")
            await proxy.wait_holding(b"stalled-ping")
            assert direct_probe.results("a1", cid) == []
            proxy.resume()
            await direct_probe.wait_result("a1", cid, CommandStatus.SUCCEEDED)
            assert online.transitions == [True]  # the connection stayed up throughout
        assert direct_probe.statuses_of("a1", cid).count(CommandStatus.SUCCEEDED) == 1
        assert (proxy.accepted, proxy.cuts) == (1, 0)

    async def test_refuse_resets_new_connections_only_until_accept(
        self, proxy: FaultProxy, proxied: AgentRunner
    ) -> None:
        """While refusing, a new connection is reset at once and an open one keeps working."""
        async with run_traced_agent(proxied, "a1") as (_, online):
            proxy.refuse()
            reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
            with contextlib.suppress(ConnectionResetError):
                assert await reader.read(1) == b""
            writer.close()
            with contextlib.suppress(ConnectionResetError):
                await writer.wait_closed()
            proxy.accept()
            async with Probe(proxy.endpoint) as probe:
                cid = await probe.send("a1", "ping")
                await probe.wait_result("a1", cid, CommandStatus.SUCCEEDED)
            assert online.transitions == [True]
        assert (proxy.accepted, proxy.refused) == (3, 1)

    async def test_a_silent_client_never_reaches_the_broker_and_cut_closes_it(
        self, proxy: FaultProxy
    ) -> None:
        """A client that sends nothing gets no broker connection; cut() closes it all the same."""
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        await proxy.wait_for(lambda: proxy.accepted == 1, what="the connection accepted")
        assert proxy.active == 0
        assert proxy.cut() == 0
        with contextlib.suppress(ConnectionResetError):
            assert await reader.read(1) == b""
        writer.close()
        with contextlib.suppress(ConnectionResetError):
            await writer.wait_closed()

    async def test_retarget_and_cut_move_an_agent_to_another_broker(
        self, proxy: FaultProxy, proxied: AgentRunner
    ) -> None:
        """After retarget() and cut() the agent reconnects, through the proxy, to the new broker."""
        async with (
            run_amqtt() as other,
            Probe(other) as probe,
            run_traced_agent(proxied, "a1") as (_, online),
        ):
            proxy.retarget(other.port)
            mark = online.mark()
            proxy.cut()
            await online.wait_transition(True, since=mark + 1)
            await probe.wait_status("a1", AgentState.ONLINE)
            cid = await probe.send("a1", "ping")
            await probe.wait_result("a1", cid, CommandStatus.SUCCEEDED)


class TestBrokerProcess:
    async def test_amqtt_restarts_on_its_port_after_sigkill_and_agents_reconnect(
        self, tmp_path: Path
    ) -> None:
        """SIGKILLed amqtt restarts on the same port at once; a connected agent comes back."""
        async with BrokerProcess("amqtt", tmp_path) as broker:
            port = broker.port
            agents = AgentRunner(broker.endpoint, tmp_path, **BRISK)
            async with run_traced_agent(agents, "a1") as (_, online):
                mark = online.mark()
                assert await broker.kill() == -9
                await online.wait_transition(False, since=mark)
                await broker.start()
                await online.wait_transition(True, since=mark)
                async with Probe(broker.endpoint) as probe:
                    cid = await probe.send("a1", "ping")
                    await probe.wait_result("a1", cid, CommandStatus.SUCCEEDED)
            assert broker.port == port
            assert await broker.stop() == 0

    @pytest.mark.mosquitto
    @pytest.mark.usefixtures("mosquitto_binary")
    async def test_mosquitto_keeps_a_queued_command_across_a_graceful_restart(
        self, tmp_path: Path
    ) -> None:
        """A QoS 1 command queued for an offline agent survives a SIGTERM restart of mosquitto."""
        async with BrokerProcess("mosquitto", tmp_path) as broker:
            agents = AgentRunner(broker.endpoint, tmp_path)
            async with agents.run("a1"):
                pass  # leaves a persistent session subscribed to the agent's commands
            async with Probe(broker.endpoint) as probe:
                await probe.send("a1", "ping", id="queued-1")
            assert await broker.restart() == 0
            async with Probe(broker.endpoint) as probe, agents.run("a1"):
                await probe.wait_result("a1", "queued-1", CommandStatus.SUCCEEDED)

    @pytest.mark.mosquitto
    @pytest.mark.usefixtures("mosquitto_binary")
    async def test_mosquitto_keeps_a_queued_command_across_sigkill_once_autosaved(
        self, tmp_path: Path
    ) -> None:
        """Once an autosave that began after the publish is on disk, SIGKILL loses nothing."""
        async with BrokerProcess("mosquitto", tmp_path) as broker:
            agents = AgentRunner(broker.endpoint, tmp_path)
            async with agents.run("a1"):
                pass
            async with Probe(broker.endpoint) as probe:
                await probe.send("a1", "ping", id="queued-2")
            await broker.wait_saved()
            assert await broker.restart(kill=True) == -9
            async with Probe(broker.endpoint) as probe, agents.run("a1"):
                await probe.wait_result("a1", "queued-2", CommandStatus.SUCCEEDED)


class TestControllerProcess:
    async def test_sigkill_and_restart_keep_the_database(
        self, amqtt_broker: BrokerEndpoint, tmp_path: Path
    ) -> None:
        """A command recorded before a SIGKILL is still there after a restart on the same port."""
        async with ControllerProcess(amqtt_broker, tmp_path) as controller:
            async with AgentRunner(amqtt_broker, tmp_path).run("a1"):
                until_online: dict[str, float | str] = {"wait": DEFAULT_TIMEOUT, "until": "online"}
                r = await controller.http.get("/api/v1/agents/a1", params=until_online)
                assert r.json()["state"] == "online", r.text
            command = {"target": "a1", "command": "ping"}
            r = await controller.http.post("/api/v1/commands", json=command)
            assert r.status_code == 202, r.text
            command_id, url = r.json()["id"], controller.url
            assert await controller.restart(kill=True) == -9
            r = await controller.http.get(f"/api/v1/commands/{command_id}")
            assert r.status_code == 200, r.text
            assert [x["status"] for x in r.json()["results"]] == ["pending"]
            assert controller.url == url
            assert await controller.stop() == 0
