"""Typed settings, loaded from (lowest to highest precedence) defaults, a TOML file,
environment variables and command-line flags, then validated once at the entry point."""

from __future__ import annotations

import argparse
import os
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from fleet_agent.errors import ConfigError
from fleet_agent.protocol import DEFAULT_PREFIX, AgentId, TopicPrefix, describe_validation_error

SettingsT = TypeVar("SettingsT", bound=BaseModel)
LogLevel = Annotated[
    Literal["DEBUG", "INFO", "WARNING", "ERROR"],
    BeforeValidator(lambda v: v.upper() if isinstance(v, str) else v),
]


class BrokerSettings(BaseModel):
    """How to reach the MQTT broker."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    broker_host: str = Field(default="127.0.0.1", description="MQTT broker host.")
    broker_port: int = Field(default=1883, ge=1, le=65535, description="MQTT broker port.")
    username: str | None = Field(default=None, description="MQTT username.")
    password: SecretStr | None = Field(default=None, description="MQTT password.")
    password_file: Path | None = Field(
        default=None,
        description="File holding the MQTT password (first line); keeps it out of argv and env.",
    )
    prefix: TopicPrefix = Field(default=DEFAULT_PREFIX, description="Topic prefix of the fleet.")
    keepalive: int = Field(default=30, ge=5, le=3600, description="MQTT keepalive, seconds.")
    reconnect_min: float = Field(default=0.5, gt=0, description="First reconnect delay, seconds.")
    reconnect_max: float = Field(default=30.0, gt=0, description="Longest reconnect delay.")
    max_payload_bytes: int = Field(
        default=256 * 1024, ge=1024, description="Larger payloads are rejected unread."
    )
    tls: bool = Field(
        default=False,
        description="Connect with TLS (usually port 8883); on whenever a tls_* file is given.",
    )
    tls_ca: Path | None = Field(
        default=None,
        description="PEM CA bundle (or the broker's own certificate) to verify the broker."
        " Default: the system trust store.",
    )
    tls_cert: Path | None = Field(
        default=None, description="PEM client certificate, for brokers that require one."
    )
    tls_key: Path | None = Field(
        default=None,
        validate_default=True,  # so that a tls_cert without a key is caught
        description="PEM private key of tls_cert (unencrypted).",
    )
    tls_insecure: bool = Field(
        default=False,
        description="Do not verify the broker's hostname (the certificate still is). Unsafe.",
    )

    @model_validator(mode="before")
    @classmethod
    def _tls_files_imply_tls(cls, data: Any) -> Any:
        files = ("tls_ca", "tls_cert", "tls_key")
        if isinstance(data, dict) and "tls" not in data and any(data.get(f) for f in files):
            return {**data, "tls": True}
        return data

    @field_validator("tls_ca", "tls_cert", "tls_key", "tls_insecure")
    @classmethod
    def _needs_tls(cls, value: Any, info: ValidationInfo) -> Any:
        if value and info.data.get("tls") is False:
            raise ValueError("given, but tls is false")
        return value

    @field_validator("tls_key")
    @classmethod
    def _key_with_cert(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if (value is None) != (info.data.get("tls_cert") is None):
            raise ValueError("tls_cert and tls_key go together: give both or neither")
        return value

    def mqtt_password(self) -> str | None:
        """The password from ``password`` or, failing that, the first line of ``password_file``."""
        if self.password is not None:
            return self.password.get_secret_value()
        if self.password_file is None:
            return None
        try:
            lines = self.password_file.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ConfigError(f"cannot read password_file {self.password_file}: {exc}") from exc
        if not lines or not lines[0].strip():
            raise ConfigError(f"password_file {self.password_file} is empty")
        return lines[0].strip()


class AgentSettings(BrokerSettings):
    """Everything an agent needs. Only ``agent_id`` is required."""

    agent_id: AgentId = Field(description="This agent's id; also its MQTT client id.")
    state_dir: Path | None = Field(
        default=None,
        description="Where the ledger lives. Default: $XDG_STATE_HOME/fleet-agent/<agent_id>.",
    )
    max_concurrent: int = Field(default=4, ge=1, le=1024, description="Commands run at once.")
    max_output_bytes: int = Field(
        default=64 * 1024, ge=0, description="stdout and stderr of `run` are cut at this size."
    )
    default_timeout: float = Field(
        default=3600.0, gt=0, description="Execution limit for commands that set no timeout."
    )
    shutdown_grace: float = Field(
        default=10.0, ge=0, description="On SIGINT/SIGTERM, how long running commands may finish."
    )
    ledger_retention_days: float = Field(
        default=7.0, gt=0, description="How long executed command ids are remembered."
    )
    command_modules: list[str] = Field(
        default_factory=list, description="Modules that register extra commands."
    )
    enabled_commands: list[str] | None = Field(
        default=None,
        description="Commands this agent accepts (default: every registered one; `run` also"
        " needs run_allow).",
    )
    run_env_allow: list[str] = Field(
        default_factory=list,
        description="Environment variables a `run` command may set in `env`; `*` allows any."
        " Ignored when run_allow is `*` (any program may run anyway).",
    )
    run_allow: list[str] = Field(
        default_factory=list,
        description="Executables `run` may start (names on PATH or paths); `*` allows any."
        " Empty: `run` is disabled.",
    )
    command_public_key: Path | None = Field(
        default=None,
        description="Ed25519 public key (PEM): when set, only commands signed with its private"
        " key are accepted (see docs/signing.md).",
    )
    log_level: LogLevel = Field(default="INFO", description="DEBUG, INFO, WARNING or ERROR.")

    @property
    def mqtt_username(self) -> str:
        """Offline queueing on amqtt needs a non-anonymous login, so default to the agent id."""
        return self.username or self.agent_id

    @property
    def resolved_state_dir(self) -> Path:
        if self.state_dir is not None:
            return self.state_dir
        base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
        return Path(base) / "fleet-agent" / self.agent_id


def _is_list(annotation: Any) -> bool:
    if typing.get_origin(annotation) is list:
        return True
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return any(_is_list(a) for a in typing.get_args(annotation))
    return False


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser, model: type[BaseModel]) -> None:
    """One ``--flag`` per settings field; unset flags stay out of the result."""
    for name, info in model.model_fields.items():
        kwargs: dict[str, Any] = {
            "dest": name,
            "default": argparse.SUPPRESS,
            "help": info.description,
        }
        if _is_list(info.annotation):
            kwargs["action"] = "append"
            kwargs["metavar"] = "VALUE"
        elif info.annotation is bool:
            # `--tls` alone means true; `--tls false` still works.
            kwargs["nargs"] = "?"
            kwargs["const"] = "true"
            kwargs["metavar"] = "BOOL"
        parser.add_argument(_flag(name), **kwargs)


def load_settings(
    model: type[SettingsT],
    *,
    flags: Mapping[str, Any],
    environ: Mapping[str, str],
    env_prefix: str,
    config_file: Path | None,
) -> SettingsT:
    """Merge file < environment < flags and validate; :class:`ConfigError` names bad fields."""
    merged: dict[str, Any] = {}
    if config_file is not None:
        try:
            with config_file.open("rb") as f:
                data = tomllib.load(f)
        except OSError as exc:
            raise ConfigError(f"cannot read config file {config_file}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {config_file} is not valid TOML: {exc}") from exc
        unknown = sorted(k for k in data if k.replace("-", "_") not in model.model_fields)
        if unknown:
            raise ConfigError(f"config file {config_file}: unknown settings {', '.join(unknown)}")
        merged.update({k.replace("-", "_"): v for k, v in data.items()})
    for name, info in model.model_fields.items():
        raw = environ.get(env_prefix + name.upper())
        if raw is not None:
            merged[name] = [p for p in raw.split(",") if p] if _is_list(info.annotation) else raw
    merged.update(flags)
    try:
        return model.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(
            f"invalid settings: {describe_validation_error(exc)}"
            f" (set with --flags, {env_prefix}* environment variables or the config file)"
        ) from exc


def parse_settings(
    model: type[SettingsT],
    *,
    prog: str,
    description: str,
    env_prefix: str,
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> SettingsT:
    """Flags from the model's fields, plus --config for a TOML file; see load_settings."""
    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=f"Every flag can also be set as {env_prefix}<NAME> in the environment "
        "or as <name> in the TOML file given by --config (precedence: flag, env, file).",
    )
    parser.add_argument(
        "--config", type=Path, default=environ.get(env_prefix + "CONFIG"), help="TOML file."
    )
    add_arguments(parser, model)
    ns = vars(parser.parse_args(argv))
    config = ns.pop("config", None)
    return load_settings(
        model,
        flags=ns,
        environ=environ,
        env_prefix=env_prefix,
        config_file=Path(config) if config else None,
    )


def parse_agent_settings(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> AgentSettings:
    return parse_settings(
        AgentSettings,
        prog="fleet-agent",
        description="Run a fleet agent: execute commands received over MQTT and report results.",
        env_prefix="FLEET_AGENT_",
        argv=argv,
        environ=environ,
    )
