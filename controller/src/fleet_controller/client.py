"""A small synchronous client of the controller's HTTP API, for the CLI."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx

from fleet_agent.errors import FleetError


class ApiError(FleetError):
    """The controller answered with an error, or could not be reached."""

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class FleetClient:
    """``token`` (an API token) goes out as ``Authorization: Bearer``; None sends none."""

    def __init__(self, url: str, *, token: str | None = None, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.token = token
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.url, timeout=timeout, headers=headers)

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            r = self._http.request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            raise ApiError(f"the controller at {self.url} did not answer in time") from exc
        except httpx.TransportError as exc:
            raise ApiError(
                f"cannot reach the controller at {self.url} ({exc}); is it running?"
                " Set --url or FLEET_URL, or start one with `fleet up`"
            ) from exc
        if r.status_code >= 400:
            raise self._error(r)
        return r.json() if r.content else None

    def _error(self, r: httpx.Response) -> ApiError:
        try:
            body = r.json()
        except ValueError:
            body = None
        message = body.get("message") if isinstance(body, dict) else None
        return ApiError(self._explain(r.status_code, message or r.text), status_code=r.status_code)

    def _explain(self, status_code: int, message: str) -> str:
        if status_code == 401 and not self.token:
            return "no API token: pass --token or set FLEET_TOKEN"
        if status_code == 401:
            return f"the API token was refused ({message}); pass another with --token"
        if status_code == 403:
            return message
        return f"{status_code}: {message}"

    def send(self, body: dict[str, Any], *, wait: float | None = None) -> dict[str, Any]:
        params = {"wait": wait} if wait else {}
        result: dict[str, Any] = self._request(
            "POST", "/api/v1/commands", json=body, params=params, timeout=(wait or 0) + 30
        )
        return result

    def command(
        self, command_id: str, *, wait: float | None = None, after: str | None = None
    ) -> dict[str, Any]:
        params: dict[str, Any] = {}
        if wait:
            params["wait"] = wait
        if after is not None:
            params["after"] = after
        result: dict[str, Any] = self._request(
            "GET", f"/api/v1/commands/{command_id}", params=params, timeout=(wait or 0) + 30
        )
        return result

    def follow(
        self,
        command_id: str,
        *,
        seconds: float,
        on_change: Callable[[dict[str, Any]], None],
    ) -> dict[str, Any]:
        """Long-poll the command until it completes or ``seconds`` pass, reporting changes."""
        deadline = time.monotonic() + seconds
        detail = self.command(command_id)
        on_change(detail)
        while not detail["complete"]:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            detail = self.command(command_id, wait=min(remaining, 300), after=detail["version"])
            on_change(detail)
        return detail

    def cancel(self, command_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._request("POST", f"/api/v1/commands/{command_id}/cancel")
        return result

    def commands(self, **filters: Any) -> dict[str, Any]:
        params = {k: v for k, v in filters.items() if v is not None}
        result: dict[str, Any] = self._request("GET", "/api/v1/commands", params=params)
        return result

    def agents(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._request("GET", "/api/v1/agents")
        return result

    def create_token(self, name: str, scope: str) -> dict[str, Any]:
        result: dict[str, Any] = self._request(
            "POST", "/api/v1/tokens", json={"name": name, "scope": scope}
        )
        return result

    def tokens(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._request("GET", "/api/v1/tokens")
        return result

    def revoke_token(self, token_id: str) -> None:
        self._request("DELETE", f"/api/v1/tokens/{token_id}")

    def events(self) -> Iterator[str]:
        """Server-sent event names, as they arrive (blocks between events)."""
        try:
            with self._http.stream("GET", "/api/v1/events", timeout=None) as r:
                if r.status_code >= 400:
                    r.read()
                    raise self._error(r)
                for line in r.iter_lines():
                    if line.startswith("event: "):
                        yield line[len("event: ") :]
        except httpx.TransportError as exc:
            raise ApiError(f"lost the event stream from {self.url}: {exc}") from exc
