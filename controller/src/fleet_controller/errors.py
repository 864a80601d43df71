"""Controller errors; all derive from the one fleet root, FleetError."""

from __future__ import annotations

from fleet_agent.errors import ConfigError, FleetError

__all__ = ["BrokerStartError", "ConfigError", "FleetError", "PortInUse"]


class BrokerStartError(FleetError):
    """The embedded broker could not start."""


class PortInUse(BrokerStartError):
    """A listening port is taken; the message names the flag that picks another."""

    def __init__(self, what: str, host: str, port: int, flag: str) -> None:
        super().__init__(
            f"{what} port {port} on {host} is already in use; choose another with {flag}"
        )
        self.host = host
        self.port = port
        self.flag = flag


class NotFound(FleetError):
    """A command or agent the controller does not know."""

    status_code = 404
    code = "not_found"


class UnknownAgents(NotFound):
    def __init__(self, agent_ids: list[str]) -> None:
        super().__init__(
            f"unknown agent(s): {', '.join(agent_ids)}; no status was ever received from them."
            ' Send "allow_unknown": true to dispatch to provisioned agents not seen yet'
        )
        self.agent_ids = agent_ids


class BrokerUnavailable(FleetError):
    """The controller is not connected to the MQTT broker right now."""

    status_code = 503
    code = "broker_unavailable"


class InvalidCommand(FleetError):
    """A request that validates field by field but cannot be sent as a whole."""

    status_code = 422
    code = "invalid_request"


class Unauthorized(FleetError):
    """No API token, or one the controller does not accept."""

    status_code = 401
    code = "unauthorized"
    headers = {"WWW-Authenticate": "Bearer"}


class Forbidden(FleetError):
    """A valid API token without the scope the request needs."""

    status_code = 403
    code = "forbidden"
