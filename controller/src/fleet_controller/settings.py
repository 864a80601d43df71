"""Controller settings: typed, built once at the entry point and passed down."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from fleet_agent.settings import BrokerSettings, LogLevel


class ControllerSettings(BrokerSettings):
    """Everything the controller needs; every field has a working default."""

    client_id: str = Field(
        default="fleet-controller",
        description="MQTT client id (and default username); its persistent session keeps"
        " results that arrive while the controller is down.",
    )
    auth: Literal["tokens", "none"] = Field(
        default="tokens",
        description="tokens: every /api/v1 request needs an API token (see `fleet token`);"
        " none: no authentication at all, anyone who reaches the HTTP address commands"
        " every agent (development only).",
    )
    db_path: Path = Field(default=Path("fleet.sqlite3"), description="SQLite database file.")
    http_host: str = Field(default="127.0.0.1", description="HTTP listen address.")
    http_port: int = Field(default=8000, ge=0, le=65535, description="HTTP listen port.")
    default_ttl: float = Field(
        default=3600.0, gt=0, le=30 * 86400, description="Seconds a command may wait for an agent."
    )
    agent_timeout: float = Field(
        default=3600.0,
        gt=0,
        description="Execution limit assumed for commands without a timeout (the agent default).",
    )
    sweep_interval: float = Field(
        default=1.0, gt=0, le=60, description="How often unanswered commands are expired."
    )
    sweep_grace: float = Field(
        default=2.0, ge=0, description="Extra seconds before the controller gives up on an agent."
    )
    redeliver_interval: float = Field(
        default=10.0,
        gt=0,
        description="An online agent that has not acknowledged a command this long after it"
        " was sent gets it again (doubling each time, up to 5 minutes), until its ttl.",
    )
    max_wait: float = Field(default=300.0, gt=0, description="Upper bound of ?wait=SECONDS.")
    result_payload_bytes: int = Field(
        default=1024 * 1024, ge=1024, description="Larger result/status payloads are dropped."
    )
    max_body_bytes: int = Field(
        default=2 * 1024 * 1024, ge=1024, description="Larger HTTP request bodies get 413."
    )
    batch_max: int = Field(default=1000, ge=1, description="Most writes in one transaction.")
    signing_key: Path | None = Field(
        default=None,
        description="Ed25519 private key (PEM) that signs every command the controller sends,"
        " for agents that require signatures (see docs/signing.md).",
    )
    signed_max_ttl: float = Field(
        default=7 * 86400,
        gt=0,
        description="With signing_key, the longest ttl a command may have: agents refuse signed"
        " commands that expire further ahead than their ledger_retention_days (7 days by"
        " default). Raise both together.",
    )
    log_level: LogLevel = Field(default="INFO", description="DEBUG, INFO, WARNING or ERROR.")

    @property
    def mqtt_username(self) -> str:
        return self.username or self.client_id
