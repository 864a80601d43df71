"""HTTP routes for API tokens: issue, list, revoke (all need the admin scope)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Response, status

from fleet_controller.auth import AdminDep
from fleet_controller.errors import NotFound
from fleet_controller.models import TokenCreate, TokenCreated, TokenPublic
from fleet_controller.state import ServicesDep

# Mounted under /api/v1 with that router's dependencies and error responses (see app.py).
token_api = APIRouter(prefix="/tokens")
TokenIdPath = Annotated[str, Path(pattern=r"^[A-Za-z0-9]{1,64}$", description="A token id.")]


@token_api.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=TokenCreated,
    summary="Issue a token; the response is the only time its secret is shown",
)
async def create_token(body: TokenCreate, services: ServicesDep, caller: AdminDep) -> TokenCreated:
    return services.tokens.create(name=body.name, scope=body.scope, created_by=caller.describe())


@token_api.get("", response_model=list[TokenPublic], summary="Every token, revoked ones too")
async def list_tokens(services: ServicesDep, _: AdminDep) -> list[TokenPublic]:
    return services.tokens.list_all()


@token_api.delete(
    "/{token_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Revoke a token: requests with it get 401 from now on",
)
async def revoke_token(token_id: TokenIdPath, services: ServicesDep, caller: AdminDep) -> Response:
    if services.tokens.revoke(token_id, by=caller.describe()) is None:
        raise NotFound(f"no token with id {token_id!r}")
    return Response(status_code=status.HTTP_204_NO_CONTENT)
