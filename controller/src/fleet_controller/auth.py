"""Who is calling: API token authentication and scope checks.

:func:`identify` runs in a middleware for every request under /api/v1, before anything reads
the request's body: a client without a valid token gets 401 and nothing else, not even a
validation error. Every route there needs at least the `read` scope (a router-wide
dependency); routes that change things ask for more with :data:`OperateDep` or
:data:`AdminDep`. With ``auth = "none"`` every request passes, recorded as unauthenticated.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param

from fleet_agent.protocol import utcnow
from fleet_controller.errors import Forbidden, Unauthorized
from fleet_controller.models import Caller, CallerKind, Scope
from fleet_controller.state import Services

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


def identify(request: Request, services: Services) -> Principal:
    """The caller of ``request``; :class:`Unauthorized` without a valid token."""
    address = request.client.host if request.client else None
    if services.settings.auth == "none":
        caller = Caller(kind=CallerKind.UNAUTHENTICATED, address=address, at=utcnow())
        return Principal(caller, Scope.ADMIN)
    header = request.headers.get("authorization")
    scheme, credentials = get_authorization_scheme_param(header)
    if header is None:
        raise Unauthorized(
            "missing API token: send `Authorization: Bearer <token>`"
            " (create one with `fleet token create`)"
        )
    if scheme.lower() != "bearer" or not credentials:
        raise Unauthorized("the Authorization header must read `Bearer <token>`")
    token = services.tokens.authenticate(credentials)
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


async def authenticated(
    request: Request,
    _: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
) -> Principal:
    """The caller the middleware identified (the bearer parameter puts the scheme into the
    OpenAPI schema)."""
    principal: Principal = request.state.principal
    return principal


def require(needed: Scope) -> Callable[[Principal], Awaitable[Caller]]:
    """A dependency that lets a request through only with ``needed`` (or a higher scope)."""

    async def check(principal: Annotated[Principal, Depends(authenticated)]) -> Caller:
        if not principal.scope.allows(needed):
            raise Forbidden(
                f"this token lacks scope {needed.value} (it has {principal.scope.value})"
            )
        return principal.caller

    return check


require_read = require(Scope.READ)
OperateDep = Annotated[Caller, Depends(require(Scope.OPERATE))]
AdminDep = Annotated[Caller, Depends(require(Scope.ADMIN))]
