"""TLS contexts for MQTT: the client side every fleet process uses, and the loading helpers
the embedded broker shares. Bad files become one-line ConfigErrors, never ssl tracebacks."""

from __future__ import annotations

import logging
import ssl
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from fleet_agent.errors import ConfigError

if TYPE_CHECKING:
    from fleet_agent.settings import BrokerSettings

log = logging.getLogger(__name__)

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2


class _ClosingSSLSocket(ssl.SSLSocket):
    """Closes itself when its handshake fails: paho drops such a socket without closing it,
    leaving the descriptor to the garbage collector on every refused attempt."""

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except BaseException:
            self.close()
            raise


def _readable(path: Path, what: str) -> None:
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc


def _reason(exc: ssl.SSLError) -> str:
    """OpenSSL's reason, e.g. " (key values mismatch)"; empty for its uninformative ones."""
    reason = exc.reason
    if not reason or reason == "PEM_LIB":
        return ""
    return f" ({reason.lower().replace('_', ' ')})"


def _encrypted_key(*_: object) -> NoReturn:
    # Without a callback OpenSSL would prompt on the terminal and block a daemon forever.
    raise ConfigError("is encrypted; give an unencrypted key (protect it with file permissions)")


def load_ca(context: ssl.SSLContext, cafile: Path, what: str) -> None:
    """Trust the PEM certificates in ``cafile``."""
    _readable(cafile, what)
    try:
        context.load_verify_locations(cafile=cafile)
    except ssl.SSLError as exc:
        reason = _reason(exc)
        raise ConfigError(f"{what} {cafile} holds no valid PEM certificate{reason}") from exc


def load_chain(
    context: ssl.SSLContext, certfile: Path, keyfile: Path, names: tuple[str, str]
) -> None:
    """Present the certificate in ``certfile`` with its private key ``keyfile``; ``names``
    are what the user calls the two (setting or flag names), for error messages."""
    cert_name, key_name = names
    _readable(certfile, cert_name)
    _readable(keyfile, key_name)
    try:
        context.load_cert_chain(certfile, keyfile, password=_encrypted_key)
    except ConfigError as exc:
        raise ConfigError(f"{key_name} {keyfile} {exc}") from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            message = f"{key_name} {keyfile} is not the private key of {cert_name} {certfile}"
        else:
            message = (
                f"{cert_name} {certfile} and {key_name} {keyfile} are not a PEM certificate"
                f" and its private key{_reason(exc)}"
            )
        raise ConfigError(message) from exc


def client_context(settings: BrokerSettings) -> ssl.SSLContext | None:
    """The context for connecting to the broker, or None for plain TCP.

    The broker's certificate is verified (against ``tls_ca`` or the system trust store) and
    so is its hostname, unless ``tls_insecure``. Building it also checks the files, so an
    entry point can call it early to fail fast.
    """
    if not settings.tls:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname
    context.minimum_version = MINIMUM_VERSION
    context.sslsocket_class = _ClosingSSLSocket
    if settings.tls_ca is not None:
        load_ca(context, settings.tls_ca, "tls_ca")
        # Lets tls_ca be the broker's own certificate (pinning) even when a CA signed it,
        # as Python 3.13's default context does.
        context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if settings.tls_cert is not None and settings.tls_key is not None:
        load_chain(context, settings.tls_cert, settings.tls_key, ("tls_cert", "tls_key"))
    if settings.tls_insecure:
        context.check_hostname = False
    return context


def warn_if_insecure(settings: BrokerSettings) -> None:
    if settings.tls and settings.tls_insecure:
        log.warning(
            "tls_insecure: the hostname of broker %s is not verified; anyone holding a"
            " certificate from a trusted CA can impersonate it",
            settings.broker_host,
        )
