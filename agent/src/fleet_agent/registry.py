"""The command registry: each command is a name, a pydantic model for its args and a handler.

New commands plug in without touching the agent's core, either through the entry point group
``fleet_agent.commands`` or through a module path in the agent's settings
(``command_modules``). Such a module exposes a ``Registry`` or a list of ``CommandSpec``s as
``COMMANDS``, or a ``register(registry)`` function.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, JsonValue

from fleet_agent.errors import ConfigError
from fleet_agent.protocol import CANCEL

if TYPE_CHECKING:
    from pathlib import Path

ENTRY_POINT_GROUP = "fleet_agent.commands"

log = logging.getLogger(__name__)


class NoArgs(BaseModel):
    """For commands that take no arguments."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True, slots=True)
class Context:
    """What a handler may know about where it runs."""

    agent_id: str
    command_id: str
    state_dir: Path
    max_output_bytes: int
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Outcome:
    """A handler's answer. ``exit_code`` other than None or 0 makes the result `failed`."""

    output: JsonValue = None
    exit_code: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.exit_code in (None, 0)


ArgsT = TypeVar("ArgsT", bound=BaseModel)
Handler = Callable[[ArgsT, Context], Awaitable[Outcome]]


@dataclass(frozen=True, slots=True)
class CommandSpec(Generic[ArgsT]):
    name: str
    args_model: type[ArgsT]
    handler: Handler[ArgsT]
    description: str = ""


class Registry:
    """Command name to spec. Registering a name twice is an error, never a silent override."""

    def __init__(self, specs: Iterable[CommandSpec[Any]] = ()) -> None:
        self._specs: dict[str, CommandSpec[Any]] = {}
        for spec in specs:
            self.add(spec)

    def add(self, spec: CommandSpec[Any]) -> None:
        if spec.name == CANCEL:
            raise ConfigError(f"{CANCEL!r} is built into the agent and cannot be registered")
        if spec.name in self._specs:
            raise ConfigError(f"command {spec.name!r} is registered twice")
        self._specs[spec.name] = spec

    def command(
        self, name: str, *, args: type[ArgsT], description: str = ""
    ) -> Callable[[Handler[ArgsT]], Handler[ArgsT]]:
        """Decorator registering an async handler under ``name``."""

        def decorate(handler: Handler[ArgsT]) -> Handler[ArgsT]:
            self.add(CommandSpec(name, args, handler, description or (handler.__doc__ or "")))
            return handler

        return decorate

    def get(self, name: str) -> CommandSpec[Any] | None:
        return self._specs.get(name)

    def names(self) -> list[str]:
        return sorted(self._specs)

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def extend(self, other: Registry | Iterable[CommandSpec[Any]]) -> None:
        for spec in other._specs.values() if isinstance(other, Registry) else other:
            self.add(spec)

    def load_module(self, path: str) -> None:
        """Import ``path`` and register what it exposes (see the module docstring)."""
        try:
            module = importlib.import_module(path)
        except ImportError as exc:
            raise ConfigError(f"cannot import command module {path!r}: {exc}") from exc
        self._load_object(
            getattr(module, "COMMANDS", None) or getattr(module, "register", None), path
        )

    def load_entry_points(self) -> None:
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            try:
                obj = ep.load()
            except Exception as exc:
                raise ConfigError(f"cannot load command entry point {ep.name!r}: {exc}") from exc
            self._load_object(obj, ep.value)

    def _load_object(self, obj: object, origin: str) -> None:
        if isinstance(obj, Registry | list | tuple):
            self.extend(obj)
        elif isinstance(obj, CommandSpec):
            self.add(obj)
        elif callable(obj):
            obj(self)
        else:
            raise ConfigError(
                f"{origin!r} exposes no commands: define COMMANDS (a Registry or a list of"
                " CommandSpec) or register(registry)"
            )
        log.debug("loaded commands from %s", origin)
