"""The FastAPI application factory. The lifespan owns the store, the MQTT link and the
sweeper; nothing lives in module globals."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fleet_agent.errors import ConfigError, FleetError
from fleet_agent.signing import Signer
from fleet_controller.api import api, health
from fleet_controller.api_tokens import token_api
from fleet_controller.auth import identify
from fleet_controller.hub import Hub
from fleet_controller.link import Link
from fleet_controller.models import ErrorBody, ErrorDetail
from fleet_controller.service import Dispatcher, sweep_forever
from fleet_controller.settings import ControllerSettings
from fleet_controller.state import Services
from fleet_controller.store import SQLiteStore
from fleet_controller.tokens import TokenStore

log = logging.getLogger(__name__)


def create_app(settings: ControllerSettings) -> FastAPI:
    # Loaded here, not in the lifespan, so that a bad key file stops the start with a
    # ConfigError instead of a failed lifespan.
    signer = Signer.from_file(settings.signing_key) if settings.signing_key else None
    if signer is not None and settings.default_ttl > settings.signed_max_ttl:
        raise ConfigError(
            f"default_ttl ({settings.default_ttl:g}s) is longer than signed_max_ttl"
            f" ({settings.signed_max_ttl:g}s): agents would refuse every signed command"
        )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        hub = Hub()
        async with SQLiteStore(
            settings.db_path, batch_max=settings.batch_max, on_commit=hub.notify
        ) as store:
            link = Link(settings, store, signer=signer)
            dispatcher = Dispatcher(settings, store, link, hub)
            link.on_birth = dispatcher.on_birth
            tokens = TokenStore(store.db)
            _warn_about_auth(settings, tokens)
            services = Services(settings, store, link, hub, dispatcher, tokens)
            async with asyncio.TaskGroup() as tg:
                tasks = [
                    tg.create_task(link.run(), name="fleet-controller-mqtt"),
                    tg.create_task(sweep_forever(dispatcher), name="fleet-controller-sweeper"),
                ]
                yield {"services": services}
                for task in tasks:
                    task.cancel()
            await store.flush()

    app = FastAPI(
        title="fleet controller",
        version="0.1.0",
        summary="Send commands to fleet agents over MQTT and see what happened on each one.",
        lifespan=lifespan,
    )
    app.include_router(api)
    app.include_router(
        token_api, prefix=api.prefix, dependencies=api.dependencies, responses=api.responses
    )
    app.include_router(health)
    install_error_handlers(app)
    app.add_middleware(Authenticate)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    return app


def _warn_about_auth(settings: ControllerSettings, tokens: TokenStore) -> None:
    if settings.auth == "none":
        log.warning(
            "AUTHENTICATION IS OFF (auth = none): anyone who can reach http://%s:%d can"
            " command every agent. Use auth = tokens outside a development machine.",
            settings.http_host,
            settings.http_port,
        )
    elif tokens.active_count() == 0:
        log.warning(
            "no API tokens yet: every /api/v1 request gets 401. Create the first with"
            " `fleet token create --scope admin --db %s`",
            settings.db_path,
        )


class Authenticate:
    """Identifies the caller of every /api/v1 request before its body is read (see auth)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and (path == api.prefix or path.startswith(api.prefix + "/")):
            request = Request(scope)
            try:
                request.state.principal = identify(request, request.state.services)
            except FleetError as exc:
                await fleet_error_response(exc)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodyLimit:
    """413, in the error shape, for a request whose declared body is over the limit, before
    any of it is read."""

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for name, value in scope["headers"]:
                if name == b"content-length" and (
                    not value.isdigit() or int(value) > self.max_bytes
                ):
                    body = ErrorBody(
                        error="payload_too_large",
                        message=f"request body is over {self.max_bytes} bytes",
                    )
                    await _error(413, body)(scope, receive, send)
                    return
            await self.app(scope, self._counting(receive), send)
            return
        await self.app(scope, receive, send)

    def _counting(self, receive: Receive) -> Receive:
        """``receive`` that stops a body without a length (chunked) once it is over the limit."""
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise StarletteHTTPException(
                        413, f"request body is over {self.max_bytes} bytes"
                    )
            return message

        return counted


def _error(status_code: int, body: ErrorBody) -> JSONResponse:
    return JSONResponse(body.model_dump(exclude_none=True), status_code=status_code)


def install_error_handlers(app: FastAPI) -> None:
    """Every error response has the one ErrorBody shape."""

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        details = []
        for err in exc.errors():
            loc = [str(p) for p in err.get("loc", ())]
            if loc and loc[0] == "body":
                loc = loc[1:]
            field = ".".join(loc) or None
            details.append(ErrorDetail(field=field, message=str(err.get("msg", "invalid"))))
        summary = "; ".join(f"{d.field}: {d.message}" if d.field else d.message for d in details)
        return _error(422, ErrorBody(error="invalid_request", message=summary, details=details))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(
            exc.status_code, "http_error"
        )
        return _error(exc.status_code, ErrorBody(error=code, message=str(exc.detail)))

    @app.exception_handler(FleetError)
    async def fleet_error(request: Request, exc: FleetError) -> JSONResponse:
        return fleet_error_response(exc)


def fleet_error_response(exc: FleetError) -> JSONResponse:
    status_code = getattr(exc, "status_code", 400)
    code = getattr(exc, "code", "bad_request")
    response = _error(status_code, ErrorBody(error=code, message=str(exc)))
    response.headers.update(getattr(exc, "headers", {}))
    return response
