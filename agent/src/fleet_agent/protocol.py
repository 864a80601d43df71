"""The fleet wire protocol: topics, identifiers and payloads.

This is the only module that builds or parses topics and encodes or decodes payloads; the
agent and the controller both import it. See ``docs/protocol.md`` for the prose version.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    ValidationError,
    WithJsonSchema,
)

from fleet_agent.errors import InvalidAgentId, PayloadError

PROTOCOL_VERSION = 1
DEFAULT_PREFIX = "fleet"
BROADCAST = "all"

_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
_COMMAND_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_COMMAND_NAME_PATTERN = re.compile(r"[a-z][a-z0-9_.-]{0,63}")
_PREFIX_PATTERN = re.compile(r"[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*")
_MAX_SIGNATURE_CHARS = 256
SIGNATURE_FIELD = "sig"


def check_agent_id(value: str) -> str:
    """Return ``value`` if it is a valid agent id, else raise :class:`InvalidAgentId`."""
    if not isinstance(value, str) or not _ID_PATTERN.fullmatch(value):
        raise InvalidAgentId(
            value,
            "agent ids are 1 to 64 characters: letters, digits, '-', '_' and '.'",
        )
    if value == BROADCAST:
        raise InvalidAgentId(value, f"'{BROADCAST}' is reserved for broadcasts")
    return value


def _check_command_id(value: str) -> str:
    if not _COMMAND_ID_PATTERN.fullmatch(value):
        raise ValueError("command ids are 1 to 128 characters: letters, digits, '-', '_', '.', ':'")
    return value


def _check_command_name(value: str) -> str:
    if not _COMMAND_NAME_PATTERN.fullmatch(value):
        raise ValueError(
            "command names start with a lowercase letter, then up to 63 of a-z, 0-9, '_', '-', '.'"
        )
    return value


def check_prefix(value: str) -> str:
    """``value`` if it is a valid topic prefix (no wildcards), else ValueError."""
    return _check_prefix(value)


def _check_prefix(value: str) -> str:
    if not _PREFIX_PATTERN.fullmatch(value):
        raise ValueError("a topic prefix is one or more levels of letters, digits, '-', '_', '.'")
    return value


def _pattern(regex: re.Pattern[str]) -> WithJsonSchema:
    """The pattern in the JSON schema too (the validator gives the friendlier message)."""
    return WithJsonSchema({"type": "string", "pattern": f"^{regex.pattern}$"})


AgentId = Annotated[str, AfterValidator(check_agent_id), _pattern(_ID_PATTERN)]
CommandId = Annotated[str, AfterValidator(_check_command_id), _pattern(_COMMAND_ID_PATTERN)]
CommandName = Annotated[str, AfterValidator(_check_command_name), _pattern(_COMMAND_NAME_PATTERN)]
TopicPrefix = Annotated[str, AfterValidator(_check_prefix), _pattern(_PREFIX_PATTERN)]


def new_command_id() -> str:
    """A fresh, globally unique command id."""
    return uuid.uuid4().hex


def utcnow() -> datetime:
    return datetime.now(UTC)


class TopicKind(StrEnum):
    CMD = "cmd"
    RESULT = "result"
    STATUS = "status"


@dataclass(frozen=True, slots=True)
class ParsedTopic:
    kind: TopicKind
    agent_id: str
    """The agent the topic belongs to, or ``BROADCAST`` for ``<prefix>/all/cmd``."""

    @property
    def is_broadcast(self) -> bool:
        return self.agent_id == BROADCAST


@dataclass(frozen=True, slots=True)
class Topics:
    """Builds and parses the topics of one fleet (one prefix)."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        _check_prefix(self.prefix)

    def cmd(self, agent_id: str) -> str:
        return f"{self.prefix}/{check_agent_id(agent_id)}/cmd"

    @property
    def broadcast_cmd(self) -> str:
        return f"{self.prefix}/{BROADCAST}/cmd"

    def result(self, agent_id: str) -> str:
        return f"{self.prefix}/{check_agent_id(agent_id)}/result"

    def status(self, agent_id: str) -> str:
        return f"{self.prefix}/{check_agent_id(agent_id)}/status"

    def any_agent(self, kind: TopicKind) -> str:
        """The wildcard filter matching ``kind`` topics of every agent (and broadcasts)."""
        return f"{self.prefix}/+/{kind.value}"

    def parse(self, topic: str) -> ParsedTopic | None:
        """Parse one of this fleet's topics; ``None`` for anything else."""
        head, sep, rest = topic.partition(self.prefix + "/")
        if head or not sep:
            return None
        agent_id, sep, kind = rest.partition("/")
        if not sep:
            return None
        try:
            topic_kind = TopicKind(kind)
        except ValueError:
            return None
        if agent_id == BROADCAST:
            return ParsedTopic(topic_kind, agent_id) if topic_kind is TopicKind.CMD else None
        if not _ID_PATTERN.fullmatch(agent_id):
            return None
        return ParsedTopic(topic_kind, agent_id)


class CommandStatus(StrEnum):
    """Where a command stands on one agent."""

    PENDING = "pending"
    """Published and acknowledged by the broker; no word from the agent yet (controller only)."""
    RECEIVED = "received"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    REJECTED = "rejected"
    EXPIRED = "expired"
    TIMED_OUT = "timed_out"
    CANCELED = "canceled"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset(
    {
        CommandStatus.SUCCEEDED,
        CommandStatus.FAILED,
        CommandStatus.REJECTED,
        CommandStatus.EXPIRED,
        CommandStatus.TIMED_OUT,
        CommandStatus.CANCELED,
    }
)


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    v: Literal[1] = Field(default=1, description="Protocol version.")


class Command(_Message):
    """A command for one agent, a list of agents (one message each) or all of them."""

    command: CommandName = Field(description="Name of the command, e.g. `ping` or `run`.")
    id: CommandId | None = Field(
        default=None,
        description="Unique id. Needed for duplicate safety; the agent assigns one if absent.",
    )
    args: dict[str, JsonValue] = Field(default_factory=dict, description="Command arguments.")
    timeout: float | None = Field(
        default=None, gt=0, le=86_400, description="Execution time limit in seconds."
    )
    expires_at: AwareDatetime | None = Field(
        default=None, description="The agent refuses the command after this instant (ISO 8601)."
    )
    sig: str | None = Field(
        default=None,
        max_length=_MAX_SIGNATURE_CHARS,
        description="Base64 Ed25519 signature of the topic and the rest of the command"
        " (see docs/signing.md). Required by agents configured with a public key.",
    )

    def is_expired(self, now: datetime | None = None) -> bool:
        return self.expires_at is not None and self.expires_at <= (now or utcnow())


class Result(_Message):
    """What an agent reports about one command: `received`, `running`, then a final status."""

    id: CommandId
    agent: AgentId
    status: CommandStatus
    command: str | None = Field(default=None, description="The command's name, when known.")
    exit_code: int | None = Field(default=None, ge=-(2**31), lt=2**31)
    output: JsonValue = None
    error: str | None = None
    received_at: AwareDatetime | None = None
    started_at: AwareDatetime | None = None
    finished_at: AwareDatetime | None = None


CANCEL = "cancel"
"""The control command that cancels another: ``{"command": "cancel",
"args": {"command_id": "..."}}``."""


class CancelArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    command_id: CommandId = Field(description="The command to cancel.")


class AgentState(StrEnum):
    ONLINE = "online"
    OFFLINE = "offline"


class Status(_Message):
    """Presence, retained on ``<prefix>/<id>/status``: birth, Last Will or clean goodbye."""

    agent: AgentId
    state: AgentState
    version: str | None = None
    commands: list[str] = Field(default_factory=list)
    started_at: AwareDatetime | None = None
    host: dict[str, JsonValue] = Field(default_factory=dict)
    reason: str | None = Field(default=None, description="Why the agent went offline.")
    session_present: bool | None = Field(
        default=None,
        description="In a birth: whether the broker still had this agent's session (and so"
        " its queued commands). False means commands sent meanwhile may be lost and should"
        " be sent again.",
    )
    at: AwareDatetime | None = Field(default=None, description="When the agent said this.")


def encode(message: _Message) -> bytes:
    """Serialise a protocol message to its JSON wire form."""
    return message.model_dump_json(exclude_none=True).encode()


def _load_object(payload: bytes, max_bytes: int, *, unicode: bool = True) -> dict[str, Any]:
    if len(payload) > max_bytes:
        raise PayloadError(f"payload of {len(payload)} bytes exceeds the limit of {max_bytes}")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PayloadError(f"payload is not UTF-8 text: {exc.reason} at byte {exc.start}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PayloadError(f"payload is not JSON: {exc.msg} at position {exc.pos}") from exc
    except RecursionError as exc:
        raise PayloadError("payload is not usable JSON: nested too deeply") from exc
    except ValueError as exc:  # e.g. an integer with more digits than Python converts
        raise PayloadError(f"payload is not usable JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise PayloadError(f"payload must be a JSON object, not {type(data).__name__}")
    if unicode:
        check_sendable(data)
    return data


def check_sendable(value: object) -> None:
    """Refuse what cannot be sent on as strict JSON in UTF-8: JSON's lone ``\\ud800``
    escapes, and the NaN/Infinity numbers Python's parser accepts."""
    try:
        json.dumps(value, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PayloadError("payload contains an unpaired UTF-16 surrogate escape") from exc
    except RecursionError as exc:
        raise PayloadError("payload is not usable JSON: nested too deeply") from exc
    except ValueError as exc:
        raise PayloadError("numbers must be finite (NaN and Infinity are not JSON)") from exc


_MAX_REPORTED_ERRORS = 10
_MAX_LOCATION = 80


def describe_validation_error(exc: ValidationError) -> str:
    """One line naming each offending field and what is wrong with it."""
    parts = []
    for error in exc.errors(include_url=False)[:_MAX_REPORTED_ERRORS]:
        where = ".".join(str(p) for p in error["loc"]) or "payload"
        if len(where) > _MAX_LOCATION:
            where = where[: _MAX_LOCATION // 2] + "..." + where[-_MAX_LOCATION // 2 :]
        parts.append(f"{where}: {error['msg']}")
    hidden = exc.error_count() - len(parts)
    return "; ".join(parts) + (f"; and {hidden} more" if hidden > 0 else "")


def decode_command(payload: bytes, *, max_bytes: int) -> Command:
    """Decode a command payload or raise :class:`PayloadError` with the reason.

    The error carries the command id and name when the payload yields them, so the
    rejection can be reported against the right command.
    """
    return decode_command_fields(payload, max_bytes=max_bytes)[0]


def decode_command_fields(payload: bytes, *, max_bytes: int) -> tuple[Command, dict[str, Any]]:
    """:func:`decode_command`, plus the JSON object as sent, which a signature covers."""
    data = _load_object(payload, max_bytes, unicode=False)
    raw_id, raw_name = data.get("id"), data.get("command")
    command_id = (
        raw_id if isinstance(raw_id, str) and _COMMAND_ID_PATTERN.fullmatch(raw_id) else None
    )
    # Only a well-formed name is echoed back: anything else may not even be valid UTF-8.
    name = (
        raw_name
        if isinstance(raw_name, str) and _COMMAND_NAME_PATTERN.fullmatch(raw_name)
        else None
    )
    try:
        check_sendable(data)
    except PayloadError as exc:
        raise PayloadError(exc.reason, command_id=command_id, command=name) from exc
    try:
        return Command.model_validate(data), data
    except ValidationError as exc:
        raise PayloadError(
            f"invalid command: {describe_validation_error(exc)}",
            command_id=command_id,
            command=name,
        ) from exc


def signed_content(topic: str, fields: Mapping[str, Any]) -> bytes:
    """What a command signature covers: the topic, a newline, then the command's JSON
    object without ``sig`` in canonical form (sorted keys, no spaces, ASCII only).

    Both sides compute it from the decoded object, so the sender's whitespace and key
    order do not matter; ``fields`` must have passed :func:`check_sendable`.
    """
    body = {k: v for k, v in fields.items() if k != SIGNATURE_FIELD}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return topic.encode() + b"\n" + canonical.encode()


def encode_signed(command: Command, topic: str, sign: Callable[[bytes], str]) -> bytes:
    """The wire form of ``command`` for ``topic``, with ``sig`` set to ``sign`` applied to
    :func:`signed_content` of exactly the object that is sent."""
    fields = json.loads(encode(command.model_copy(update={SIGNATURE_FIELD: None})))
    fields[SIGNATURE_FIELD] = sign(signed_content(topic, fields))
    return json.dumps(fields, separators=(",", ":"), ensure_ascii=False).encode()


MessageT = TypeVar("MessageT", bound=_Message)


def _decode(model: type[MessageT], what: str, payload: bytes, max_bytes: int) -> MessageT:
    data = _load_object(payload, max_bytes)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise PayloadError(f"invalid {what}: {describe_validation_error(exc)}") from exc


def decode_result(payload: bytes, *, max_bytes: int) -> Result:
    return _decode(Result, "result", payload, max_bytes)


def decode_status(payload: bytes, *, max_bytes: int) -> Status:
    return _decode(Status, "status", payload, max_bytes)
