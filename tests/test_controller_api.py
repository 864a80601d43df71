"""The HTTP API's contract: validation, error shape, lookups, pagination, health."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from controller_testing import Controller, controller_settings, run_controller
from fleet_testing import AgentRunner, BrokerEndpoint


@pytest.fixture
async def controller(amqtt_broker: BrokerEndpoint, tmp_path: Path) -> AsyncIterator[Controller]:
    """A controller on the embedded broker."""
    async with run_controller(controller_settings(amqtt_broker, tmp_path / "f.sqlite3")) as c:
        yield c


@pytest.fixture
def fleet(amqtt_broker: BrokerEndpoint, tmp_path: Path) -> AgentRunner:
    """Agents on the embedded broker."""
    return AgentRunner(amqtt_broker, tmp_path)


def assert_error(body: dict[str, Any], code: str, *fields: str) -> None:
    assert set(body) >= {"error", "message"}, body
    assert body["error"] == code, body
    for field in fields:
        assert field in body["message"], body
        assert any(d.get("field") == field for d in body.get("details", [])), body


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"command": "ping"}, "target"),
        ({"target": "a1"}, "command"),
        ({"target": "a/1", "command": "ping"}, "target"),
        ({"target": ["a1", "a1"], "command": "ping"}, "target"),
        ({"target": [], "command": "ping"}, "target"),
        ({"target": "a1", "command": "Bad Name"}, "command"),
        ({"target": "a1", "command": "ping", "timeout": -1}, "timeout"),
        ({"target": "a1", "command": "ping", "ttl": "soon"}, "ttl"),
        ({"target": "a1", "command": "ping", "args": [1]}, "args"),
        ({"target": "a1", "command": "ping", "colour": "red"}, "colour"),
    ],
)
async def test_invalid_body_is_422_naming_the_field(
    controller: Controller, body: dict[str, Any], field: str
) -> None:
    """Every invalid body gets 422 in the one error shape, naming the offending field."""
    r = await controller.http.post("/api/v1/commands", json=body)
    assert r.status_code == 422, r.text
    assert_error(r.json(), "invalid_request", field)


async def test_malformed_json_is_422(controller: Controller) -> None:
    """A body that is not JSON gets 422, not 500."""
    r = await controller.http.post(
        "/api/v1/commands", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 422, r.text
    assert r.json()["error"] == "invalid_request"


async def test_wait_over_300_is_422(controller: Controller) -> None:
    """?wait is bounded at 300 seconds."""
    r = await controller.http.post(
        "/api/v1/commands", params={"wait": 301}, json={"target": "a1", "command": "ping"}
    )
    assert r.status_code == 422
    assert_error(r.json(), "invalid_request", "query.wait")


async def test_unknown_agents_are_404_naming_them(
    controller: Controller, fleet: AgentRunner
) -> None:
    """Dispatch to agents never seen gives 404 naming each unknown one, and sends nothing."""
    async with fleet.run("a1"):
        await controller.wait_agent("a1")
        r = await controller.send(target=["a1", "ghost", "phantom"], command="ping")
    assert r.status_code == 404
    body = r.json()
    assert_error(body, "not_found")
    assert "ghost" in body["message"] and "phantom" in body["message"]
    assert "a1," not in body["message"]
    listed = (await controller.http.get("/api/v1/commands")).json()
    assert listed["items"] == []


async def test_allow_unknown_dispatches_to_unseen_agent(controller: Controller) -> None:
    """With allow_unknown a provisioned, never-seen agent is targeted and stays pending."""
    r = await controller.send(target="new-device", command="ping", allow_unknown=True)
    assert r.status_code == 202, r.text
    assert r.json()["results"][0]["status"] == "pending"


async def test_unknown_command_and_agent_lookups_are_404(controller: Controller) -> None:
    """GET of an unknown command or agent is 404 in the error shape; a bad id is 422."""
    r = await controller.http.get("/api/v1/commands/nope")
    assert r.status_code == 404
    assert_error(r.json(), "not_found")
    r = await controller.http.get("/api/v1/agents/nobody")
    assert r.status_code == 404
    r = await controller.http.get("/api/v1/agents/all")
    assert r.status_code == 422
    r = await controller.http.get("/api/v1/no-such-route")
    assert r.status_code == 404
    assert_error(r.json(), "not_found")


async def test_delete_agent_forgets_it(controller: Controller, fleet: AgentRunner) -> None:
    """DELETE /agents/{id} forgets an offline agent; a second DELETE is 404."""
    async with fleet.run("a1"):
        await controller.wait_agent("a1")
    await controller.wait_agent("a1", until="offline")
    r = await controller.http.delete("/api/v1/agents/a1")
    assert r.status_code == 204
    assert (await controller.http.get("/api/v1/agents")).json() == []
    r = await controller.http.delete("/api/v1/agents/a1")
    assert r.status_code == 404


async def test_list_commands_filters_and_pages(controller: Controller, fleet: AgentRunner) -> None:
    """GET /commands pages newest first with a cursor and filters by agent and status."""
    async with fleet.run("a1"), fleet.run("a2"):
        await controller.wait_agent("a1")
        await controller.wait_agent("a2")
        ids = []
        for i in range(5):
            r = await controller.send(
                target="a1" if i % 2 else "a2",
                command="run",
                args={"argv": ["sh", "-c", f"exit {i % 2}"]},
                wait=10,
            )
            ids.append(r.json()["id"])
    pages, cursor = [], None
    while True:
        params: dict[str, Any] = {"limit": 2}
        if cursor:
            params["cursor"] = cursor
        page = (await controller.http.get("/api/v1/commands", params=params)).json()
        pages.append([c["id"] for c in page["items"]])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == [ids[4:2:-1], ids[2:0:-1], ids[0:1]]
    a1 = (await controller.http.get("/api/v1/commands", params={"agent": "a1"})).json()
    assert [c["id"] for c in a1["items"]] == [ids[3], ids[1]]
    failed = (await controller.http.get("/api/v1/commands", params={"status": "failed"})).json()
    assert [c["id"] for c in failed["items"]] == [ids[3], ids[1]]
    r = await controller.http.get("/api/v1/commands", params={"status": "bogus"})
    assert r.status_code == 422


async def test_health_and_ready(controller: Controller) -> None:
    """/healthz says the process is up; /readyz checks the broker link and the store."""
    assert (await controller.http.get("/healthz")).json() == {"status": "ok"}
    ready = (await controller.http.get("/readyz")).json()
    assert ready == {"status": "ok", "broker_connected": True, "store_writable": True}


async def test_openapi_documents_every_route(controller: Controller) -> None:
    """/docs is served and the OpenAPI schema describes the command model's fields."""
    assert (await controller.http.get("/docs")).status_code == 200
    spec = (await controller.http.get("/openapi.json")).json()
    assert {"/api/v1/commands", "/api/v1/agents", "/readyz"} <= set(spec["paths"])
    fields = spec["components"]["schemas"]["CommandCreate"]["properties"]
    assert all(f.get("description") for f in fields.values())


async def test_oversize_body_is_413_before_it_is_read(controller: Controller) -> None:
    """A body declared larger than max_body_bytes is refused with 413 in the error shape."""
    r = await controller.http.post(
        "/api/v1/commands",
        content=b"{" + b" " * (3 * 1024 * 1024) + b"}",
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 413
    assert r.json()["error"] == "payload_too_large"


async def test_chunked_oversize_body_is_413_once_over_the_limit(controller: Controller) -> None:
    """A body without a length (chunked) is cut off with 413 once it passes max_body_bytes."""

    async def endless() -> AsyncIterator[bytes]:
        yield b'{"target":"a1","command":"ping","args":{"pad":"'
        for _ in range(64):
            yield b"x" * (64 * 1024)

    r = await controller.http.post(
        "/api/v1/commands", content=endless(), headers={"content-type": "application/json"}
    )
    assert r.status_code == 413, r.text
    assert r.json()["error"] == "payload_too_large"
