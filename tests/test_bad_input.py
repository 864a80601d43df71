"""Bad input on MQTT never stops the controller or an agent.

Garbage on a command, result or status topic is logged with the reason and counted under
``GET /api/v1/stats`` (``dropped.cmd`` / ``dropped.result`` / ``dropped.status``); agents answer
a bad command with a ``rejected`` result; both keep serving. Every test publishes its garbage,
then calls ``Probe.sync()`` (the broker has routed it), then pings a real agent through HTTP:
once the ping's result is recorded, the controller has read the garbage too, and both sides
have shown they still serve. HTTP input is covered by ``test_http_fuzz.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import signal
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from fleet_agent.protocol import CommandStatus

from controller_testing import Controller, controller_settings, run_controller
from fleet_testing import (
    BROKER_KINDS,
    DEFAULT_TIMEOUT,
    MOSQUITTO,
    AgentRunner,
    BrokerEndpoint,
    Probe,
    Seen,
    admin_token,
    bearer,
    require,
    run_broker,
    stop_process,
)

LIMIT = 2048
"""max_payload_bytes of the agent and the controller, and the controller's result_payload_bytes."""
AGENT = "a1"
GHOST = "g1"
"""An agent that never connects: a command to it stays pending unless a (forged) result lands."""
DEPTH = 1500
"""Deeper than the JSON decoder's recursion limit (1000): json.loads raises RecursionError."""
DIGITS = 5000
"""More digits than Python's int parsing limit (4300): json.loads raises ValueError."""
SURROGATE = "\\ud800"
"""A JSON escape for an unpaired UTF-16 surrogate: json.loads accepts it, but the str it yields
cannot be encoded as UTF-8, so neither SQLite nor pydantic's JSON encoder takes it."""

SHARED = pytest.mark.asyncio(loop_scope="module")
"""For tests on the module's shared scene (which lives in the module's event loop)."""

Garbage = Callable[[str, str], bytes]
"""A bad payload, built from the id of the command it pretends to be about and the agent id
of the topic it goes to."""


# -- the scene: a controller, one agent, a probe -----------------------------------------------


@dataclass(frozen=True)
class Scene:
    controller: Controller
    probe: Probe

    @property
    def http(self) -> httpx.AsyncClient:
        return self.controller.http


@contextlib.asynccontextmanager
async def scene(
    endpoint: BrokerEndpoint,
    root: Path,
    *,
    watch_results: bool = True,
    limit: int = LIMIT,
    **overrides: Any,
) -> AsyncIterator[Scene]:
    """A controller, agent ``a1`` (online and known to it) and a probe; every payload limit,
    the agent's and the controller's, is ``limit``. ``watch_results=False`` keeps the probe off
    the result and status topics, for tests that publish garbage there: a probe reading it
    would decode it with the very code under test.

    Tests whose input once took a process down start their own scene in the test body, not
    in a fixture: should that happen again, the test fails instead of erroring in teardown.
    """
    settings = controller_settings(
        endpoint,
        root / "controller.sqlite3",
        max_payload_bytes=limit,
        result_payload_bytes=limit,
        **overrides,
    )
    probe = Probe(endpoint) if watch_results else Probe(endpoint, kinds=())
    fleet = AgentRunner(endpoint, root, max_payload_bytes=limit)
    async with probe, run_controller(settings) as controller, fleet.run(AGENT):
        await controller.wait_agent(AGENT)
        yield Scene(controller, probe)


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=BROKER_KINDS)
async def shared(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Scene]:
    """One scene per broker kind for the tests whose garbage the fleet survives: starting a
    scene costs more than such a test, so they share it and count drops as differences."""
    kind: str = request.param
    if kind == "mosquitto":
        require(MOSQUITTO, "mosquitto")
    root = tmp_path_factory.mktemp(f"shared-{kind}")
    async with run_broker(kind, root) as endpoint, scene(endpoint, root) as s:
        yield s


async def ping_through(s: Scene) -> None:
    """Ping the agent through HTTP and wait for its result: both sides still serve, and the
    controller has read everything routed to it before (after the caller's ``probe.sync()``)."""
    r = await s.controller.send(target=AGENT, command="ping", wait=DEFAULT_TIMEOUT)
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["status"] == "succeeded", body


async def assert_ready(s: Scene) -> None:
    r = await s.http.get("/readyz")
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "ok", r.text


async def dropped(s: Scene) -> dict[str, int]:
    r = await s.http.get("/api/v1/stats")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["broker_connected"] is True, body
    counts: dict[str, int] = body["dropped"]
    return counts


async def newly_dropped(s: Scene, before: dict[str, int]) -> dict[str, int]:
    after = await dropped(s)
    return {kind: after.get(kind, 0) - before.get(kind, 0) for kind in ("cmd", "result", "status")}


def logged(caplog: pytest.LogCaptureFixture, logger: str, *fragments: str) -> bool:
    """Whether a record of ``logger`` (or of a child) contains every fragment."""
    return any(
        (r.name == logger or r.name.startswith(logger + "."))
        and all(f in r.getMessage() for f in fragments)
        for r in caplog.records
    )


def as_bytes(data: Any) -> bytes:
    return json.dumps(data).encode()


async def pending_command(s: Scene) -> dict[str, Any]:
    """A command to the ghost agent, as created: it stays pending unless a result lands."""
    r = await s.controller.send(target=GHOST, command="ping", allow_unknown=True)
    assert r.status_code == 202, r.text
    created: dict[str, Any] = r.json()
    return created


# -- commands ----------------------------------------------------------------------------------

PING = b'{"command": "ping", "id": "bad-1"}'
OVERSIZE_CMD = as_bytes({"command": "ping", "id": "big", "args": {"pad": "x" * LIMIT}})
BINARY = b"\x00\x01\xfe\xff" + bytes(range(256))

CMD_GARBAGE = [
    pytest.param(b'{"command": "ping", "id": "bad-1",}', "payload is not JSON", id="malformed"),
    pytest.param(PING[:-9], "payload is not JSON", id="truncated"),
    pytest.param(b'["ping", "bad-1"]', "payload must be a JSON object, not list", id="not-object"),
    pytest.param(BINARY, "payload is not UTF-8", id="binary"),
    pytest.param(OVERSIZE_CMD, f"exceeds the limit of {LIMIT}", id="oversize"),
    pytest.param(b"", "payload is not JSON", id="empty"),
]


@SHARED
@pytest.mark.parametrize("broadcast", [False, True], ids=["agent-topic", "broadcast-topic"])
@pytest.mark.parametrize(("payload", "reason"), CMD_GARBAGE)
async def test_garbage_command_is_rejected_and_counted(
    shared: Scene,
    caplog: pytest.LogCaptureFixture,
    broadcast: bool,
    payload: bytes,
    reason: str,
) -> None:
    """A bad command gets a `rejected` result with the reason and one dropped.cmd; all serve on."""
    caplog.set_level(logging.INFO)
    s = shared
    before = await dropped(s)
    topic = s.probe.topics.broadcast_cmd if broadcast else s.probe.topics.cmd(AGENT)
    since = s.probe.mark()
    await s.probe.publish(topic, payload)
    await s.probe.sync()
    await ping_through(s)

    def is_rejection(seen: Seen) -> bool:
        r = seen.result
        return (
            r is not None
            and r.agent == AGENT
            and r.status is CommandStatus.REJECTED
            and reason in (r.error or "")
        )

    await s.probe.wait_for(is_rejection, since=since, what=f"a rejection with {reason!r}")
    await assert_ready(s)
    assert await newly_dropped(s, before) == {"cmd": 1, "result": 0, "status": 0}
    assert logged(caplog, "fleet_agent", topic, reason), "the agent logs no reason"
    assert logged(caplog, "fleet_controller", topic, reason), "the controller logs no reason"


# -- results -----------------------------------------------------------------------------------


def forged(command_id: str, agent: str, **fields: Any) -> dict[str, Any]:
    """A final result that, were it recorded, would visibly end the command as `failed`."""
    return {
        "v": 1,
        "id": command_id,
        "agent": agent,
        "status": "failed",
        "command": "ping",
        "error": "forged",
        "finished_at": "2026-01-01T00:00:00Z",
        **fields,
    }


def forged_bytes(command_id: str, agent: str, **fields: Any) -> bytes:
    return as_bytes(forged(command_id, agent, **fields))


def without_id(command_id: str, agent: str) -> bytes:
    return as_bytes({k: v for k, v in forged(command_id, agent).items() if k != "id"})


RESULT_GARBAGE = [
    pytest.param(
        lambda cid, agent: forged_bytes(cid, agent).replace(b'"status"', b"status"),
        "payload is not JSON",
        id="malformed",
    ),
    pytest.param(
        lambda cid, agent: forged_bytes(cid, agent)[:-12], "payload is not JSON", id="truncated"
    ),
    pytest.param(
        lambda cid, agent: as_bytes([forged(cid, agent)]),
        "payload must be a JSON object",
        id="not-object",
    ),
    pytest.param(
        lambda cid, agent: forged_bytes(cid, agent).replace(b"forged", b"forged\xff\xfe"),
        "payload is not UTF-8",
        id="binary",
    ),
    pytest.param(
        lambda cid, agent: forged_bytes(cid, agent, output={"pad": "x" * LIMIT}),
        f"exceeds the limit of {LIMIT}",
        id="oversize",
    ),
    pytest.param(lambda cid, agent: b"", "payload is not JSON", id="empty"),
    pytest.param(
        lambda cid, agent: forged_bytes(cid, agent, status="exploded"), "status", id="bad-status"
    ),
    pytest.param(
        lambda cid, agent: forged_bytes(cid, agent, colour="red"), "colour", id="unknown-field"
    ),
    pytest.param(without_id, "id", id="missing-id"),
    pytest.param(
        lambda cid, agent: forged_bytes(cid, agent, exit_code="zero"), "exit_code", id="wrong-type"
    ),
    pytest.param(
        lambda cid, agent: forged_bytes(cid, agent, v=2), "v", id="other-protocol-version"
    ),
    pytest.param(
        lambda cid, agent: forged_bytes(cid, "g2"), "'g2'", id="other-agent-than-the-topic"
    ),
]


@SHARED
@pytest.mark.parametrize(("garbage", "reason"), RESULT_GARBAGE)
async def test_garbage_result_is_dropped_and_counted(
    shared: Scene, caplog: pytest.LogCaptureFixture, garbage: Garbage, reason: str
) -> None:
    """A bad result is logged with the reason, counted as one dropped.result, recorded nowhere."""
    caplog.set_level(logging.INFO)
    s = shared
    before = await dropped(s)
    created = await pending_command(s)
    topic = s.probe.topics.result(GHOST)
    await s.probe.publish(topic, garbage(created["id"], GHOST))
    await s.probe.sync()
    await ping_through(s)
    await assert_ready(s)
    assert await newly_dropped(s, before) == {"cmd": 0, "result": 1, "status": 0}
    after = await s.controller.command(created["id"])
    assert after["agents"] == [GHOST], after
    assert after["results"][0]["status"] == "pending", after
    assert after["results"][0]["error"] is None, after
    assert after["version"] == created["version"], after
    agents = (await s.http.get("/api/v1/agents")).json()
    assert [a["id"] for a in agents] == [AGENT], "a dropped result made an agent known"
    assert logged(caplog, "fleet_controller", topic, reason), "the controller logs no reason"


@SHARED
async def test_result_on_another_agents_topic_is_dropped(
    shared: Scene, caplog: pytest.LogCaptureFixture
) -> None:
    """A result naming agent g1 on a1's result topic (one agent posing as another) is dropped."""
    caplog.set_level(logging.INFO)
    s = shared
    before = await dropped(s)
    created = await pending_command(s)
    topic = s.probe.topics.result(AGENT)
    await s.probe.publish(topic, forged_bytes(created["id"], GHOST))
    await s.probe.sync()
    await ping_through(s)
    assert await newly_dropped(s, before) == {"cmd": 0, "result": 1, "status": 0}
    after = await s.controller.command(created["id"])
    assert after["agents"] == [GHOST], after
    assert after["results"][0]["status"] == "pending", after
    assert logged(caplog, "fleet_controller", topic, f"'{GHOST}'"), "no reason logged"


@SHARED
async def test_result_for_an_unknown_command_is_dropped(shared: Scene) -> None:
    """A well-formed `succeeded` result for an id nobody sent creates no command; it is counted."""
    s = shared
    before = await dropped(s)
    payload = forged_bytes("never-sent-1", AGENT, status="succeeded", error=None, output={})
    await s.probe.publish(s.probe.topics.result(AGENT), payload)
    await s.probe.sync()
    await ping_through(s)
    r = await s.http.get("/api/v1/commands/never-sent-1")
    assert r.status_code == 404, r.text
    assert await newly_dropped(s, before) == {"cmd": 0, "result": 1, "status": 0}


# -- statuses ----------------------------------------------------------------------------------


def goodbye(agent: str, **fields: Any) -> bytes:
    """A status that, were it recorded, would visibly take the agent offline."""
    return as_bytes({"v": 1, "agent": agent, "state": "offline", "reason": "forged", **fields})


def impostor(agent: str) -> str:
    return "g2" if agent == AGENT else AGENT


STATUS_GARBAGE = [
    pytest.param(
        lambda _, agent: goodbye(agent).replace(b'"state"', b"state"),
        "payload is not JSON",
        id="malformed",
    ),
    pytest.param(lambda _, agent: goodbye(agent)[:-8], "payload is not JSON", id="truncated"),
    pytest.param(
        lambda _, agent: b"[" + goodbye(agent) + b"]",
        "payload must be a JSON object",
        id="not-object",
    ),
    pytest.param(
        lambda _, agent: goodbye(agent).replace(b"forged", b"forged\xff\xfe"),
        "payload is not UTF-8",
        id="binary",
    ),
    pytest.param(
        lambda _, agent: goodbye(agent, host={"pad": "x" * LIMIT}),
        f"exceeds the limit of {LIMIT}",
        id="oversize",
    ),
    pytest.param(lambda _, agent: goodbye(agent, state="asleep"), "state", id="bad-state"),
    pytest.param(lambda _, agent: goodbye(agent, colour="red"), "colour", id="unknown-field"),
    pytest.param(lambda _, agent: goodbye(agent, commands="ping"), "commands", id="wrong-type"),
    pytest.param(lambda _, agent: goodbye(impostor(agent)), "names agent", id="other-agent"),
]

STABLE_AGENT_FIELDS = (
    "id", "online", "state", "offline_reason", "connected_since", "started_at", "version",
    "commands", "host", "first_seen",
)  # fmt: skip
"""What a status can change about an agent (last_seen and latency_ms move with every ping)."""


def stable(agents: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: a.get(k) for k in STABLE_AGENT_FIELDS} for a in agents]


@SHARED
@pytest.mark.parametrize(("garbage", "reason"), STATUS_GARBAGE)
async def test_garbage_status_is_dropped_and_counted(
    shared: Scene, caplog: pytest.LogCaptureFixture, garbage: Garbage, reason: str
) -> None:
    """Bad retained statuses, of a known agent and of a new id, are counted; no agent changes."""
    caplog.set_level(logging.INFO)
    s = shared
    before = await dropped(s)
    agents_before = (await s.http.get("/api/v1/agents")).json()
    topics = {AGENT: s.probe.topics.status(AGENT), "newcomer": s.probe.topics.status("newcomer")}
    for agent, topic in topics.items():
        await s.probe.publish(topic, garbage("", agent), retain=True)
    await s.probe.sync()
    await ping_through(s)
    await assert_ready(s)
    assert await newly_dropped(s, before) == {"cmd": 0, "result": 0, "status": 2}
    agents_after = (await s.http.get("/api/v1/agents")).json()
    assert stable(agents_after) == stable(agents_before)
    for topic in topics.values():
        assert logged(caplog, "fleet_controller", topic, reason), f"no reason logged for {topic}"


@SHARED
async def test_cleared_status_is_not_an_error(shared: Scene) -> None:
    """An empty retained status (a cleared topic) is not counted and changes no agent."""
    s = shared
    before = await dropped(s)
    agents_before = (await s.http.get("/api/v1/agents")).json()
    for agent in (AGENT, "newcomer"):
        await s.probe.publish(s.probe.topics.status(agent), b"", retain=True)
    await s.probe.sync()
    await ping_through(s)
    await assert_ready(s)
    assert await newly_dropped(s, before) == {"cmd": 0, "result": 0, "status": 0}
    agents_after = (await s.http.get("/api/v1/agents")).json()
    assert stable(agents_after) == stable(agents_before)


# -- payloads that break the JSON decoder itself ---------------------------------------------

DECODER_BREAKERS = [
    pytest.param(b"[" * DEPTH, id="deeply-nested"),
    pytest.param(b'{"v": 1, "n": ' + b"9" * DIGITS + b"}", id="huge-integer"),
]


@pytest.mark.parametrize("kind", ["cmd", "result", "status"])
@pytest.mark.parametrize("payload", DECODER_BREAKERS)
async def test_payload_that_breaks_the_json_decoder_is_dropped_like_any_other(
    amqtt_broker: BrokerEndpoint, tmp_path: Path, kind: str, payload: bytes
) -> None:
    """JSON nested too deep, or with a number too long, for json.loads is just more garbage."""
    # Default-sized limits: these payloads are a few kilobytes.
    async with scene(amqtt_broker, tmp_path, watch_results=kind == "cmd", limit=65536) as s:
        topic = {
            "cmd": s.probe.topics.cmd(AGENT),
            "result": s.probe.topics.result(AGENT),
            "status": s.probe.topics.status(AGENT),
        }[kind]
        since = s.probe.mark()
        await s.probe.publish(topic, payload)
        await s.probe.sync()
        await ping_through(s)
        await assert_ready(s)
        assert await dropped(s) == {"cmd": 0, "result": 0, "status": 0, kind: 1}
        if kind == "cmd":
            await s.probe.wait_for(
                lambda seen: (
                    seen.result is not None and seen.result.status is CommandStatus.REJECTED
                ),
                since=since,
                what="the rejection",
            )


# -- decodable, but not storable or not encodable -------------------------------------------


async def test_command_with_unpaired_surrogate_is_rejected(
    amqtt_broker: BrokerEndpoint, tmp_path: Path
) -> None:
    """A command holding an unpaired surrogate escape is rejected and counted, never run."""
    payload = f'{{"command": "run", "id": "s1", "args": {{"argv": ["echo", "{SURROGATE}"]}}}}'
    async with scene(amqtt_broker, tmp_path) as s:
        since = s.probe.mark()
        await s.probe.publish(s.probe.topics.cmd(AGENT), payload.encode())
        await s.probe.sync()
        await s.probe.wait_for(
            lambda seen: (
                seen.result is not None
                and seen.result.status is CommandStatus.REJECTED
                and "surrogate" in (seen.result.error or "")
            ),
            since=since,
            what="a rejection naming the surrogate",
        )
        await ping_through(s)
        assert await dropped(s) == {"cmd": 1, "result": 0, "status": 0}
        r = await s.http.get("/api/v1/commands/s1")
        assert r.status_code in (200, 404), r.text
        if r.status_code == 200:
            assert [x["status"] for x in r.json()["results"]] == ["rejected"], r.text
        ran = [x.status for x in s.probe.results(AGENT, "s1")]
        assert set(ran) <= {CommandStatus.REJECTED}, f"s1 was run: {ran}"


@contextlib.asynccontextmanager
async def controller_process(
    endpoint: BrokerEndpoint, root: Path
) -> AsyncIterator[tuple[str, dict[str, str]]]:
    """``fleet controller`` in a process of its own, on a port it picks; yields its URL and
    an admin token's headers once it is ready. For input that wedges the controller: an
    in-process controller that cannot shut down would hang the test run, while a process is
    simply killed at the end."""
    db_path = root / "controller.sqlite3"
    headers = bearer(admin_token(db_path))
    argv = [
        *(sys.executable, "-m", "fleet_controller", "controller"),
        *("--broker-host", endpoint.host, "--broker-port", str(endpoint.port)),
        *("--http-port", "0", "--db-path", str(db_path)),
        *("--log-level", "INFO"),
    ]
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    log: list[str] = []
    drain: asyncio.Task[None] | None = None
    try:
        url = ""
        async with asyncio.timeout(DEFAULT_TIMEOUT * 3):  # a fresh interpreter imports a lot
            while not url and (line := await proc.stderr.readline()):
                log.append(line.decode(errors="replace").rstrip())
                if match := re.search(r"controller on (http://[^,\s]+)", log[-1]):
                    url = match.group(1)
        assert url, "the controller ended before it listened:\n" + "\n".join(log)
        # Keep reading, so that a chatty controller never blocks on a full pipe.
        drain = asyncio.create_task(_drain(proc.stderr), name="controller-process-log")
        async with httpx.AsyncClient(base_url=url) as http:
            r = await http.get("/readyz", params={"wait": DEFAULT_TIMEOUT})
            assert r.status_code == 200, r.text
        yield url, headers
    finally:
        await stop_process(proc, signal.SIGKILL)
        if drain is not None:
            await drain


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.readline():
        pass


async def test_results_and_statuses_the_store_cannot_write_are_dropped(
    amqtt_broker: BrokerEndpoint, tmp_path: Path
) -> None:
    """A result or status SQLite cannot hold is dropped and counted; later ones are recorded."""
    async with (
        Probe(amqtt_broker, kinds=()) as probe,
        controller_process(amqtt_broker, tmp_path) as (url, headers),
        httpx.AsyncClient(base_url=url, timeout=DEFAULT_TIMEOUT * 2, headers=headers) as http,
    ):

        async def unstorable_result(**fields: Any) -> None:
            body = {"target": ["g1", "g2"], "command": "ping", "allow_unknown": True}
            created = (await http.post("/api/v1/commands", json=body)).json()
            cid = created["id"]
            bad = forged_bytes(cid, "g1", **fields).replace(b"SURROGATE", SURROGATE.encode())
            await probe.publish(probe.topics.result("g1"), bad)
            await probe.publish(probe.topics.result("g2"), forged_bytes(cid, "g2"))
            params = {"wait": 2, "after": created["version"]}
            r = await http.get(f"/api/v1/commands/{cid}", params=params)
            assert r.status_code == 200, r.text
            statuses = {x["agent"]: x["status"] for x in r.json()["results"]}
            assert statuses == {"g1": "pending", "g2": "failed"}, f"after a result with {fields}"

        await unstorable_result(exit_code=2**64)
        await unstorable_result(error="SURROGATE")
        bad = f'{{"v": 1, "agent": "b1", "state": "online", "version": "{SURROGATE}"}}'
        await probe.publish(probe.topics.status("b1"), bad.encode(), retain=True)
        good = {"v": 1, "agent": "b2", "state": "online", "version": "1"}
        await probe.publish(probe.topics.status("b2"), as_bytes(good), retain=True)
        r = await http.get("/api/v1/agents/b2", params={"wait": 2})
        assert r.status_code == 200, r.text
        assert (await http.get("/api/v1/agents/b1")).status_code == 404
        stats = (await http.get("/api/v1/stats")).json()
        assert stats["dropped"] == {"cmd": 0, "result": 2, "status": 1}, stats


async def test_command_expiring_in_year_9999_does_not_stop_expiry(
    amqtt_broker: BrokerEndpoint, tmp_path: Path
) -> None:
    """A command published with expires_at at the end of time leaves other commands expiring."""
    far = {"command": "ping", "id": "far-future", "expires_at": "9999-12-31T23:59:59.999999Z"}
    async with scene(
        amqtt_broker, tmp_path, watch_results=False, sweep_interval=0.05, sweep_grace=0.1
    ) as s:
        await s.probe.publish(s.probe.topics.cmd(GHOST), as_bytes(far))
        await s.probe.sync()
        await ping_through(s)
        r = await s.controller.send(target="g2", command="ping", allow_unknown=True, ttl=0.1)
        soon = await s.controller.command(r.json()["id"], wait=2)
    assert soon["results"][0]["status"] == "expired", soon


async def test_command_larger_than_agents_accept_is_refused_over_http(
    amqtt_broker: BrokerEndpoint, tmp_path: Path
) -> None:
    """POSTing a command whose encoding exceeds max_payload_bytes is a 4xx; nothing is sent."""
    async with scene(amqtt_broker, tmp_path, watch_results=False) as s:
        r = await s.controller.send(target=AGENT, command="run", args={"argv": ["x" * LIMIT]})
        assert r.status_code in (413, 422), r.text
        assert {"error", "message"} <= set(r.json()), r.text
        await ping_through(s)
        listed = (await s.http.get("/api/v1/commands")).json()["items"]
        assert [c["command"] for c in listed] == ["ping"]
        assert await dropped(s) == {"cmd": 0, "result": 0, "status": 0}
