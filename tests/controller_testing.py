"""Helpers for end-to-end tests of the controller: a real uvicorn server in this event loop,
on a socket bound before it starts (so requests queue instead of being refused), talking to a
real broker."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from fleet_controller.app import create_app
from fleet_controller.settings import ControllerSettings

from fleet_testing import DEFAULT_TIMEOUT, BrokerEndpoint, admin_token, bearer


def listening_socket(host: str = "127.0.0.1") -> socket.socket:
    """A listening TCP socket on a free port, made with IPPROTO_TCP so asyncio sets
    TCP_NODELAY on accepted connections (a plain socket() makes responses stall ~40 ms)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen(512)
    return sock


def controller_settings(
    endpoint: BrokerEndpoint, db_path: Path, **overrides: Any
) -> ControllerSettings:
    return ControllerSettings(
        broker_host=endpoint.host,
        broker_port=endpoint.port,
        db_path=db_path,
        **overrides,
    )


class Controller:
    """A running controller and an HTTP client for it (sending :attr:`token`, if any)."""

    def __init__(
        self, settings: ControllerSettings, http: httpx.AsyncClient, url: str, token: str | None
    ) -> None:
        self.settings = settings
        self.http = http
        self.url = url
        self.token = token

    async def send(self, **body: Any) -> httpx.Response:
        params = {}
        if "wait" in body:
            params["wait"] = body.pop("wait")
        return await self.http.post("/api/v1/commands", json=body, params=params)

    async def wait_agent(
        self, agent_id: str, *, until: str = "online", seconds: float = DEFAULT_TIMEOUT
    ) -> dict[str, Any]:
        """Block until the controller sees ``agent_id`` in state ``until`` (a long poll)."""
        r = await self.http.get(
            f"/api/v1/agents/{agent_id}", params={"wait": seconds, "until": until}
        )
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        assert body["state"] == until, body
        return body

    async def command(
        self, command_id: str, *, wait: float | None = None, after: str | None = None
    ) -> dict[str, Any]:
        params: dict[str, Any] = {"wait": wait} if wait is not None else {}
        if after is not None:
            params["after"] = after
        r = await self.http.get(f"/api/v1/commands/{command_id}", params=params)
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body


@contextlib.asynccontextmanager
async def run_controller(
    settings: ControllerSettings, *, token: bool = True
) -> AsyncIterator[Controller]:
    """Serve the controller until the block ends; yielded once its broker link is up. With
    ``token`` (the default) an admin token is created first and the client sends it."""
    secret = admin_token(settings.db_path) if token else None
    sock = listening_socket(settings.http_host)
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), log_level="warning", lifespan="on")
    )
    task = asyncio.create_task(server.serve(sockets=[sock]), name="test-controller")
    url = f"http://{settings.http_host}:{port}"
    try:
        async with httpx.AsyncClient(
            base_url=url, timeout=DEFAULT_TIMEOUT + 20, headers=bearer(secret)
        ) as http:
            r = await http.get("/readyz", params={"wait": DEFAULT_TIMEOUT})
            assert r.status_code == 200, r.text
            yield Controller(settings, http, url, secret)
    finally:
        server.should_exit = True
        await task
        sock.close()
