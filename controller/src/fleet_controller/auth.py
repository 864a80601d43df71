"""Who is calling: API token authentication and scope checks, as FastAPI dependencies.

Every route under /api/v1 needs at least the `read` scope (a router-wide dependency); routes
that change things ask for more with :data:`OperateDep` or :data:`AdminDep`. With
``auth = "none"`` every request passes, recorded as unauthenticated.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from fleet_agent.protocol import utcnow
from fleet_controller.errors import Forbidden, Unauthorized
from fleet_controller.models import Caller, CallerKind, Scope
from fleet_controller.state import ServicesDep

bearer = HTTPBearer(
    auto_error=False,
    scheme_name="APIToken",
    description="An API token from `fleet token create` (or POST /api/v1/tokens), sent as"
    " `Authorization: Bearer fleet_<id>_<secret>`. Scopes: read < operate < admin.",
)


@dataclass(frozen=True, slots=True)
class Principal:
    caller: Caller
    scope: Scope


async def authenticate(
    request: Request,
    services: ServicesDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
) -> Principal:
    address = request.client.host if request.client else None
    if services.settings.auth == "none":
        caller = Caller(kind=CallerKind.UNAUTHENTICATED, address=address, at=utcnow())
        return Principal(caller, Scope.ADMIN)
    if credentials is None:
        if "authorization" in request.headers:
            raise Unauthorized("the Authorization header must read `Bearer <token>`")
        raise Unauthorized(
            "missing API token: send `Authorization: Bearer <token>`"
            " (create one with `fleet token create`)"
        )
    token = services.tokens.authenticate(credentials.credentials)
    if token is None:
        raise Unauthorized("invalid or revoked API token")
    caller = Caller(
        kind=CallerKind.TOKEN,
        token_id=token.id,
        token_name=token.name,
        address=address,
        at=utcnow(),
    )
    return Principal(caller, token.scope)


def require(needed: Scope) -> Callable[[Principal], Awaitable[Caller]]:
    """A dependency that lets a request through only with ``needed`` (or a higher scope)."""

    async def check(principal: Annotated[Principal, Depends(authenticate)]) -> Caller:
        if not principal.scope.allows(needed):
            raise Forbidden(
                f"this token lacks scope {needed.value} (it has {principal.scope.value})"
            )
        return principal.caller

    return check


require_read = require(Scope.READ)
ReadDep = Annotated[Caller, Depends(require_read)]
OperateDep = Annotated[Caller, Depends(require(Scope.OPERATE))]
AdminDep = Annotated[Caller, Depends(require(Scope.ADMIN))]
