"""HTTP routes under /api/v1, plus /healthz and /readyz."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request, Response, status
from fastapi.responses import JSONResponse, StreamingResponse

from fleet_agent.errors import FleetError
from fleet_agent.protocol import AgentId, AgentState, CommandStatus
from fleet_controller.auth import AdminDep, OperateDep, identify, require_read
from fleet_controller.errors import NotFound
from fleet_controller.models import (
    AgentPublic,
    CommandCreate,
    CommandDetail,
    CommandPage,
    ErrorBody,
    Health,
    Stats,
)
from fleet_controller.service import Dispatcher
from fleet_controller.state import ServicesDep

audit = logging.getLogger("fleet_controller.audit")


def get_dispatcher(services: ServicesDep) -> Dispatcher:
    return services.dispatcher


DispatcherDep = Annotated[Dispatcher, Depends(get_dispatcher)]
AgentIdPath = Annotated[AgentId, Path(description="An agent id.")]


def wait_query(description: str) -> Any:
    """A long-poll duration: 0 to 300 seconds."""
    return Query(ge=0, le=300, description=description)


_ERRORS: dict[int | str, dict[str, object]] = {
    401: {"model": ErrorBody, "description": "No API token, or an invalid or revoked one."},
    403: {"model": ErrorBody, "description": "The token lacks the scope this route needs."},
    404: {"model": ErrorBody, "description": "Unknown command or agent."},
    422: {"model": ErrorBody, "description": "Invalid request; `details` names each field."},
}

# Every route needs at least `read`; routes that change things ask for more themselves.
api = APIRouter(prefix="/api/v1", responses=_ERRORS, dependencies=[Depends(require_read)])


@api.post(
    "/commands",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=CommandDetail,
    responses={503: {"model": ErrorBody, "description": "The broker is unreachable."}},
    summary="Send a command to one agent, a list of agents, or all of them",
)
async def create_command(
    body: CommandCreate,
    dispatcher: DispatcherDep,
    caller: OperateDep,
    wait: Annotated[
        float | None,
        wait_query(
            "Answer when every targeted agent has reached a terminal status, or after this"
            " many seconds, whichever comes first (at most 300)."
        ),
    ] = None,
) -> CommandDetail:
    detail = await dispatcher.dispatch(body, caller)
    if wait:
        detail = await dispatcher.wait(detail.id, min(wait, dispatcher.settings.max_wait))
    return detail


@api.get("/commands/{command_id}", response_model=CommandDetail, summary="One command, per agent")
async def get_command(
    command_id: str,
    dispatcher: DispatcherDep,
    wait: Annotated[
        float | None,
        wait_query(
            "Wait up to this many seconds for every agent to reach a terminal status (and"
            " for the command to be recorded at all, if it was sent over MQTT)."
        ),
    ] = None,
    after: Annotated[
        str | None,
        Query(
            max_length=64,
            description="With `wait`: also answer as soon as the command's `version` differs"
            " from this one (for live progress).",
        ),
    ] = None,
) -> CommandDetail:
    if wait:
        return await dispatcher.wait(
            command_id, min(wait, dispatcher.settings.max_wait), after=after
        )
    return await dispatcher.get(command_id)


@api.post(
    "/commands/{command_id}/cancel",
    response_model=CommandDetail,
    responses={503: {"model": ErrorBody, "description": "The broker is unreachable."}},
    summary="Cancel a command on every agent that has not finished it",
)
async def cancel_command(
    command_id: str,
    dispatcher: DispatcherDep,
    caller: OperateDep,
    wait: Annotated[
        float | None,
        wait_query("Answer when every agent has reached a terminal status, or after this long."),
    ] = None,
) -> CommandDetail:
    detail = await dispatcher.cancel(command_id, caller)
    if wait:
        detail = await dispatcher.wait(command_id, min(wait, dispatcher.settings.max_wait))
    return detail


@api.get(
    "/events",
    summary="Server-sent events: one `change` event whenever commands or agents change",
    response_class=StreamingResponse,
)
async def events(services: ServicesDep, request: Request) -> StreamingResponse:
    def allowed() -> bool:
        """Whether the request's token is still valid (checked before every event)."""
        try:
            identify(request, services)
        except FleetError:
            return False
        return True

    return StreamingResponse(
        services.dispatcher.changes(request.is_disconnected, allowed),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store"},
    )


@api.get("/commands", response_model=CommandPage, summary="Commands, newest first")
async def list_commands(
    services: ServicesDep,
    agent: Annotated[AgentId | None, Query(description="Only commands sent to this agent.")] = None,
    status: Annotated[
        CommandStatus | None,
        Query(description="Only commands where some agent (or `agent`) has this status."),
    ] = None,
    since: Annotated[datetime | None, Query(description="Created at or after (ISO 8601).")] = None,
    cursor: Annotated[
        str | None, Query(pattern=r"^\d{1,18}$", description="`next_cursor` of the last page.")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> CommandPage:
    return await services.store.list_commands(
        agent=agent,
        status=status,
        since=since,
        cursor=int(cursor) if cursor else None,
        limit=limit,
    )


@api.get("/agents", response_model=list[AgentPublic], summary="Every known agent")
async def list_agents(services: ServicesDep) -> list[AgentPublic]:
    return await services.store.list_agents(broker_up=services.link.connected.is_set())


@api.get("/agents/{agent_id}", response_model=AgentPublic, summary="One agent")
async def get_agent(
    agent_id: AgentIdPath,
    services: ServicesDep,
    wait: Annotated[
        float | None,
        wait_query(
            "Wait up to this many seconds for the agent to be known and in the state given"
            " by `until`."
        ),
    ] = None,
    until: Annotated[
        AgentState, Query(description="With `wait`: the state to wait for.")
    ] = AgentState.ONLINE,
) -> AgentPublic:
    limit = min(wait or 0, services.settings.max_wait)
    agent = await services.dispatcher.agent(agent_id, wait=limit, until=until)
    if agent is None:
        raise NotFound(f"no agent with id {agent_id!r}")
    return agent


@api.delete(
    "/agents/{agent_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Forget an agent (it reappears if it connects again)",
)
async def delete_agent(agent_id: AgentIdPath, services: ServicesDep, caller: AdminDep) -> Response:
    if not await services.store.delete_agent(agent_id):
        raise NotFound(f"no agent with id {agent_id!r}")
    audit.info("audit: agent %s forgotten by %s", agent_id, caller.describe())
    await services.link.clear_retained(services.link.topics.status(agent_id))
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@api.get("/stats", response_model=Stats, summary="Counters: dropped messages and the like")
async def stats(services: ServicesDep) -> Stats:
    return Stats(
        broker_connected=services.link.connected.is_set(),
        dropped={
            "cmd": services.link.rejected["cmd"],
            "result": services.link.rejected["result"] + services.store.dropped_results,
            "status": services.link.rejected["status"],
        },
    )


health = APIRouter()


@health.get(
    "/healthz", response_model=Health, response_model_exclude_none=True, summary="The process is up"
)
async def healthz() -> Health:
    return Health(status="ok")


@health.get(
    "/readyz",
    response_model=Health,
    responses={503: {"model": Health}},
    summary="Broker connected and store writable",
)
async def readyz(
    services: ServicesDep,
    wait: Annotated[
        float | None,
        wait_query("Wait up to this many seconds for the broker link."),
    ] = None,
) -> JSONResponse:
    if wait:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(min(wait, services.settings.max_wait)):
                await services.link.connected.wait()
    broker = services.link.connected.is_set()
    store = await services.store.check_writable()
    body = Health(
        status="ok" if broker and store else "unavailable",
        broker_connected=broker,
        store_writable=store,
    )
    return JSONResponse(body.model_dump(), status_code=200 if body.status == "ok" else 503)
