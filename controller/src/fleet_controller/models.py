"""HTTP API models: one family per resource (Create / Public)."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    PlainValidator,
    WithJsonSchema,
    field_validator,
)

from fleet_agent.errors import PayloadError
from fleet_agent.protocol import (
    BROADCAST,
    CommandName,
    CommandStatus,
    check_agent_id,
    check_sendable,
)

MAX_TARGETS = 10_000


def parse_target(value: object) -> str | list[str]:
    """One clear error for a bad target, instead of one per member of a union."""
    if value == BROADCAST:
        return BROADCAST
    if isinstance(value, str):
        return check_agent_id(value)
    if isinstance(value, list):
        if not 1 <= len(value) <= MAX_TARGETS:
            raise ValueError(f"a target list holds 1 to {MAX_TARGETS} agent ids")
        ids = [check_agent_id(v) if isinstance(v, str) else _not_an_id(v) for v in value]
        if len(set(ids)) != len(ids):
            raise ValueError("agent ids in a target list must be unique")
        return ids
    raise ValueError('target must be an agent id, a list of agent ids, or "all"')


def _not_an_id(value: object) -> str:
    raise ValueError(f"agent ids are strings, not {type(value).__name__}")


_AGENT_ID_SCHEMA = {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,64}$"}
Target = Annotated[
    str | list[str],
    PlainValidator(parse_target),
    WithJsonSchema(
        {
            "anyOf": [
                {"const": "all"},
                _AGENT_ID_SCHEMA,
                {
                    "type": "array",
                    "items": _AGENT_ID_SCHEMA,
                    "minItems": 1,
                    "maxItems": MAX_TARGETS,
                },
            ]
        }
    ),
]


class Source(StrEnum):
    HTTP = "http"
    MQTT = "mqtt"
    """Published by someone else straight to the broker (e.g. mosquitto_pub)."""


class Scope(StrEnum):
    """What a token may do. Each scope includes the ones below it: admin > operate > read."""

    READ = "read"
    """Every GET: commands, agents, events, stats."""
    OPERATE = "operate"
    """Send and cancel commands (and read)."""
    ADMIN = "admin"
    """Manage tokens and forget agents (and operate)."""

    @property
    def level(self) -> int:
        return list(Scope).index(self)

    def allows(self, needed: Scope) -> bool:
        return self.level >= needed.level

    @property
    def implied(self) -> list[Scope]:
        """This scope and every scope it includes."""
        return [s for s in Scope if self.allows(s)]


class CallerKind(StrEnum):
    TOKEN = "token"
    """An HTTP request with an API token."""
    UNAUTHENTICATED = "unauthenticated"
    """An HTTP request to a controller running with auth = none."""
    MQTT = "mqtt"
    """Published straight to the broker, not through the HTTP API."""
    UNRECORDED = "unrecorded"
    """Sent before this controller recorded who sent what."""


class Caller(BaseModel):
    """Who made a request: the audit trail of a dispatch or a cancel."""

    kind: CallerKind
    token_id: str | None = None
    token_name: str | None = None
    address: str | None = Field(default=None, description="The HTTP client's address.")
    at: datetime | None = Field(default=None, description="When the request was made.")

    def describe(self) -> str:
        """One line for logs."""
        who = (
            f"token {self.token_id} ({self.token_name})"
            if self.kind is CallerKind.TOKEN
            else self.kind.value
        )
        return f"{who} from {self.address}" if self.address else who


TokenName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[^\x00-\x1f\x7f]+$")]


class TokenCreate(BaseModel):
    """A new API token."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"name": "deploy pipeline", "scope": "operate"}]},
    )

    name: TokenName = Field(description="Who or what uses it, for people and the audit trail.")
    scope: Scope = Field(
        default=Scope.READ,
        description="read, operate (send and cancel) or admin (tokens, agents); each includes"
        " the ones before it.",
    )


class TokenPublic(BaseModel):
    """An API token without its secret."""

    id: str
    name: str
    scope: Scope
    scopes: list[Scope] = Field(description="The scope and every scope it includes.")
    created_at: datetime
    created_by: str
    last_used_at: datetime | None = Field(
        default=None, description="Last accepted request (updated at most once a minute)."
    )
    revoked_at: datetime | None = None


class TokenCreated(TokenPublic):
    token: str = Field(
        description="The token, for `Authorization: Bearer <token>`. Shown only this once."
    )


class Aggregate(StrEnum):
    """A command's status across all its agents."""

    PENDING = "pending"
    """No agent has answered yet."""
    IN_PROGRESS = "in_progress"
    """Some agents answered; not all have reached a terminal status."""
    SUCCEEDED = "succeeded"
    """Every agent succeeded."""
    FAILED = "failed"
    """Every agent reached a terminal status and at least one did not succeed."""
    CANCELED = "canceled"
    """Canceled: every agent either canceled it or had already succeeded."""
    NO_TARGETS = "no_targets"
    """Sent to `all` while no agent was known."""


class CommandCreate(BaseModel):
    """A command to send to one agent, a list of agents, or all of them."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"target": "a1", "command": "ping"}]},
    )

    target: Target = Field(
        description='An agent id, a list of agent ids, or "all" (every agent known now).'
    )
    command: CommandName = Field(description="Command name, e.g. `ping`, `info`, `run`, `sleep`.")
    args: dict[str, JsonValue] = Field(default_factory=dict, description="Command arguments.")
    timeout: float | None = Field(
        default=None, gt=0, le=86_400, description="Execution time limit on the agent, seconds."
    )
    ttl: float | None = Field(
        default=None,
        gt=0,
        le=30 * 86_400,
        description="Seconds an agent has to pick the command up; then it expires."
        " Defaults to the controller's default_ttl.",
    )
    allow_unknown: bool = Field(
        default=False, description="Accept agent ids never seen yet (provisioned devices)."
    )

    @field_validator("args")
    @classmethod
    def _sendable(cls, args: dict[str, JsonValue]) -> dict[str, JsonValue]:
        try:
            check_sendable(args)
        except PayloadError as exc:
            raise ValueError(exc.reason) from None
        return args

    @property
    def is_broadcast(self) -> bool:
        return self.target == BROADCAST


class AgentResult(BaseModel):
    """Where the command stands on one agent."""

    agent: str
    status: CommandStatus
    exit_code: int | None = None
    output: JsonValue = None
    error: str | None = None
    published_at: datetime | None = Field(
        default=None, description="When the broker acknowledged the command."
    )
    received_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    duration_s: float | None = Field(default=None, description="finished_at - started_at.")
    updated_at: datetime


class CommandSummary(BaseModel):
    id: str
    command: str
    source: Source
    target: str | list[str]
    created_at: datetime
    expires_at: datetime
    status: Aggregate
    complete: bool = Field(description="True when every expected agent reached a terminal status.")
    expected: int = Field(description="How many agents are expected to answer.")
    counts: dict[str, int] = Field(description="Agents per status.")
    version: str = Field(
        description="Changes whenever any agent's status advances; pass as ?after= to wait"
        " for the next change."
    )


class CommandDetail(CommandSummary):
    """A command with its per-agent results."""

    args: dict[str, Any]
    timeout: float | None
    ttl: float
    agents: list[str] = Field(description="The agents expected to answer.")
    results: list[AgentResult]
    sent_by: Caller = Field(description="Who sent the command.")
    canceled_by: Caller | None = Field(default=None, description="Who canceled it, if anyone.")


class CommandPage(BaseModel):
    items: list[CommandSummary]
    next_cursor: str | None = Field(
        description="Pass as ?cursor= for the next page; null at the end."
    )


class AgentPublic(BaseModel):
    """An agent as the controller knows it."""

    id: str
    online: bool = Field(
        description="The agent says it is online AND the controller's broker link is up."
    )
    state: Literal["online", "offline"] = Field(description="What the agent last said.")
    offline_reason: str | None = None
    last_seen: datetime
    connected_since: datetime | None
    started_at: datetime | None
    version: str | None
    commands: list[str]
    host: dict[str, Any]
    latency_ms: float | None = Field(
        description="Last measured ping round trip: publish acknowledged to result received."
    )
    first_seen: datetime


class ErrorDetail(BaseModel):
    field: str | None = None
    message: str


class ErrorBody(BaseModel):
    """The one shape of every error response."""

    error: str = Field(description="Machine-readable code, e.g. `not_found`, `invalid_request`.")
    message: str = Field(description="What went wrong, for people.")
    details: list[ErrorDetail] = Field(default_factory=list)


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    broker_connected: bool | None = None
    store_writable: bool | None = None


class Stats(BaseModel):
    """Counters since the controller started."""

    broker_connected: bool
    dropped: dict[str, int] = Field(
        description="Inbound MQTT messages dropped as invalid, by topic kind (cmd, result,"
        " status); each is logged with its reason."
    )
