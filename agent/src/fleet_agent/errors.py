"""The fleet error tree. Every error the project raises on purpose derives from FleetError."""

from __future__ import annotations


class FleetError(Exception):
    """Root of every error raised by fleet."""


class ConfigError(FleetError):
    """Settings are missing or invalid; the message says which and why."""


class InvalidAgentId(FleetError, ValueError):
    """A string that is not a valid agent id."""

    def __init__(self, value: object, reason: str) -> None:
        super().__init__(f"invalid agent id {value!r}: {reason}")
        self.value = value
        self.reason = reason


class PayloadError(FleetError):
    """An MQTT payload that cannot be accepted (not UTF-8, not JSON, invalid, too large)."""

    def __init__(
        self, reason: str, *, command_id: str | None = None, command: str | None = None
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.command_id = command_id
        self.command = command


class CommandError(FleetError):
    """A command handler's failure, reported as a `failed` result with this message."""

    def __init__(self, message: str, *, exit_code: int | None = None) -> None:
        super().__init__(message)
        self.exit_code = exit_code
