"""The embedded amqtt broker, configured by ``broker.yaml``."""

from __future__ import annotations

import copy
import errno
import logging
import ssl
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import yaml

from fleet_agent.tls import MINIMUM_VERSION, load_ca, load_chain
from fleet_controller.errors import BrokerStartError, ConfigError, PortInUse

log = logging.getLogger(__name__)

DEFAULT_CONFIG_PATH = Path("broker.yaml")
# The same as the repository's broker.yaml (a test holds them equal), for installs that run
# from elsewhere than a checkout.
BUILTIN_CONFIG: dict[str, Any] = {
    "listeners": {"default": {"type": "tcp", "bind": "0.0.0.0:1883", "max_connections": 0}},
    "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": False}},
}


def load_broker_config(
    path: Path | None,
    *,
    host: str | None = None,
    port: int | None = None,
    tls: ServerTLS | None = None,
) -> dict[str, Any]:
    """Read an amqtt config file (None: the built-in default), overriding the default
    listener's address or port, and making it a TLS listener when ``tls`` is given."""
    if tls is not None:
        return with_tls(load_broker_config(path, host=host, port=port), tls)
    if path is None:
        return with_listener(BUILTIN_CONFIG, host=host, port=port)
    try:
        config = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read broker config {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"broker config {path} is not valid YAML: {exc}") from exc
    if not isinstance(config, dict):
        raise ConfigError(f"broker config {path} must be a mapping")
    return with_listener(config, host=host, port=port)


def with_listener(
    config: dict[str, Any], *, host: str | None = None, port: int | None = None
) -> dict[str, Any]:
    config = copy.deepcopy(config)
    listener = config.setdefault("listeners", {}).setdefault("default", {"type": "tcp"})
    old_host, _, old_port = str(listener.get("bind", "0.0.0.0:1883")).rpartition(":")
    listener["bind"] = f"{host or old_host or '0.0.0.0'}:{port if port is not None else old_port}"
    return config


@dataclass(frozen=True)
class ServerTLS:
    """The embedded broker's TLS: its certificate and key and, for mutual TLS, the CA that
    must have signed every client's certificate."""

    certfile: Path
    keyfile: Path
    cafile: Path | None = None

    @classmethod
    def from_flags(cls, cert: Path | None, key: Path | None, ca: Path | None) -> ServerTLS | None:
        """From --tls-cert, --tls-key and --tls-ca; None when none is given."""
        if cert is None and key is None:
            if ca is not None:
                raise ConfigError("--tls-ca needs --tls-cert and --tls-key")
            return None
        if cert is None or key is None:
            raise ConfigError("--tls-cert and --tls-key go together: give both")
        return cls(cert, key, ca)


def with_tls(config: dict[str, Any], tls: ServerTLS) -> dict[str, Any]:
    """The config with its default listener turned into a TLS listener; :class:`ConfigError`
    if the files cannot serve."""
    config = copy.deepcopy(config)
    listener = config.setdefault("listeners", {}).setdefault("default", {"type": "tcp"})
    listener.update(ssl=True, certfile=str(tls.certfile), keyfile=str(tls.keyfile))
    listener.pop("cafile", None)
    if tls.cafile is not None:
        listener["cafile"] = str(tls.cafile)
    server_context(listener)  # unusable files: the error comes now, not at startup
    return config


def server_context(listener: Any) -> ssl.SSLContext:
    """The context of a TLS listener (an amqtt listener config): TLS >= 1.2 and, when it
    names a ``cafile``, client certificates signed by it are required."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MINIMUM_VERSION
    if not listener.get("certfile") or not listener.get("keyfile"):
        raise ConfigError(
            "a TLS listener needs a certificate and its key (certfile and keyfile in the"
            " broker config, or --tls-cert and --tls-key)"
        )
    names = ("TLS certificate (--tls-cert, certfile)", "TLS key (--tls-key, keyfile)")
    load_chain(context, Path(listener["certfile"]), Path(listener["keyfile"]), names)
    if listener.get("cafile"):
        load_ca(context, Path(listener["cafile"]), "client CA (--tls-ca, cafile)")
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _tls_listeners(config: dict[str, Any]) -> list[dict[str, Any]]:
    listeners = config.get("listeners") or {}
    return [v for v in listeners.values() if isinstance(v, dict) and v.get("ssl")]


def with_credentials(config: dict[str, Any], directory: Path, prefix: str) -> dict[str, Any]:
    """``config`` with logins checked against the credentials in ``directory`` (see
    ``fleet credentials``) and topics limited by role, instead of any other auth plugin."""
    from fleet_controller.credentials import Credentials

    creds = Credentials(directory, prefix=prefix)  # checks the prefix
    if not creds.users_file.exists():
        raise ConfigError(
            f"no MQTT credentials in {directory}: create them with `fleet credentials add`"
        )
    config = copy.deepcopy(config)
    plugins = {
        name: options
        for name, options in (config.get("plugins") or {}).items()
        if not name.startswith("amqtt.plugins.authentication.")
        and not name.startswith("amqtt.plugins.topic_checking.")
    }
    plugins["fleet_controller.mqtt_auth.FleetAuthPlugin"] = {
        "password_file": str(creds.amqtt_passwords)
    }
    plugins["fleet_controller.mqtt_auth.FleetTopicPlugin"] = {
        "users_file": str(creds.users_file),
        "prefix": prefix,
    }
    config["plugins"] = plugins
    return config


def bind_address(config: dict[str, Any]) -> tuple[str, int]:
    host, _, port = str(config["listeners"]["default"]["bind"]).rpartition(":")
    return host, int(port)


class _HideStartupTraceback(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "Broker startup failed"


class EmbeddedBroker:
    """amqtt in this process's event loop, as an async context manager."""

    def __init__(self, config: dict[str, Any], *, port_flag: str = "--port") -> None:
        self.config = config
        self.host, self.port = bind_address(config)
        self._port_flag = port_flag
        self._broker: Any = None

    async def __aenter__(self) -> Self:
        # The agent never needs amqtt: import it only here.
        from amqtt.errors import BrokerError

        from fleet_controller.mqtt_auth import AuthenticatingBroker

        class TLSBroker(AuthenticatingBroker):
            # amqtt's own context only ever asks for client certificates (CERT_OPTIONAL),
            # so a client CA would not keep anyone out; ours requires them.
            @staticmethod
            def _create_ssl_context(listener: Any) -> ssl.SSLContext:
                return server_context(listener)

        for listener in _tls_listeners(self.config):
            server_context(listener)  # bad files: a one-line error before amqtt sees them
        try:
            self._broker = TLSBroker(self.config)
        except (ValueError, TypeError, KeyError) as exc:
            raise ConfigError(f"invalid broker config: {exc}") from exc
        quiet = _HideStartupTraceback()
        amqtt_log = logging.getLogger("amqtt.broker")
        amqtt_log.addFilter(quiet)
        try:
            await self._broker.start()
        except BrokerError as exc:
            cause = exc.__cause__
            if isinstance(cause, OSError) and cause.errno == errno.EADDRINUSE:
                raise PortInUse("MQTT", self.host, self.port, self._port_flag) from None
            raise BrokerStartError(f"embedded MQTT broker failed to start: {exc}") from exc
        finally:
            amqtt_log.removeFilter(quiet)
        log.info(
            "embedded MQTT broker listening on %s:%d%s",
            self.host,
            self.port,
            " (TLS)" if _tls_listeners(self.config) else "",
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._broker is not None:
            await self._broker.shutdown()
