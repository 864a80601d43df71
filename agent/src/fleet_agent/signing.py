"""Signed commands: Ed25519 keys, signing on the sender's side, verification on the agent.

``cryptography`` is imported only when a key is loaded or made, so an agent that does not
require signatures never pays for the import.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fleet_agent.errors import ConfigError
from fleet_agent.protocol import Command, encode_signed, signed_content

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

    from fleet_agent.settings import AgentSettings

PRIVATE_KEY_NAME = "fleet-signing.key"
PUBLIC_KEY_NAME = "fleet-signing.pub"
_SIGNATURE_BYTES = 64

SIGNATURE_REQUIRED = "signature required"
BAD_SIGNATURE = "bad signature"
NEEDS_ID_AND_EXPIRY = "signed commands must carry an id and expires_at"


def _load_key(path: Path, what: str, parse: Callable[[bytes], object], hint: str) -> object:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    try:
        return parse(data)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{what} {path} is not {hint}") from exc


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """The Ed25519 private key in PEM file ``path``; :class:`ConfigError` says what is wrong."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    key = _load_key(
        path,
        "signing key",
        lambda data: load_pem_private_key(data, password=None),
        "an unencrypted PEM private key (make one with `fleet keys generate`)",
    )
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"signing key {path} is not an Ed25519 key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """The Ed25519 public key in PEM file ``path``; :class:`ConfigError` says what is wrong."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    key = _load_key(
        path,
        "command public key",
        load_pem_public_key,
        "a PEM public key (use the .pub file written by `fleet keys generate`)",
    )
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"command public key {path} is not an Ed25519 key")
    return key


def generate_key_pair(directory: Path) -> tuple[Path, Path]:
    """Write a new private key (mode 0600) and its public key into ``directory``; never
    overwrite either file. Returns (private, public)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        NoEncryption,
        PrivateFormat,
        PublicFormat,
    )

    private_path, public_path = directory / PRIVATE_KEY_NAME, directory / PUBLIC_KEY_NAME
    for path in (private_path, public_path):
        if path.exists():
            raise ConfigError(f"{path} already exists; refusing to overwrite it")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    public_pem = key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        _write_new(private_path, private_pem, 0o600)
        _write_new(public_path, public_pem, 0o644)
    except OSError as exc:
        raise ConfigError(f"cannot write the key pair to {directory}: {exc}") from exc
    return private_path, public_path


def ensure_key_pair(directory: Path) -> tuple[Path, Path]:
    """The key pair in ``directory``, made there first if it is not."""
    private_path, public_path = directory / PRIVATE_KEY_NAME, directory / PUBLIC_KEY_NAME
    if private_path.exists() and public_path.exists():
        return private_path, public_path
    if private_path.exists():  # the public half can always be derived again
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        public = load_private_key(private_path).public_key()
        pem = public.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
        try:
            _write_new(public_path, pem, 0o644)
        except OSError as exc:
            raise ConfigError(f"cannot write {public_path}: {exc}") from exc
        return private_path, public_path
    return generate_key_pair(directory)


def _write_new(path: Path, data: bytes, mode: int) -> None:
    # O_EXCL: a file that appeared since the check is never overwritten, and the private
    # key is never readable by others, not even for an instant.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


class Signer:
    """Signs commands for the topic they are published on."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key

    @classmethod
    def from_file(cls, path: Path) -> Signer:
        return cls(load_private_key(path))

    def encode(self, topic: str, command: Command) -> bytes:
        """The signed payload of ``command`` for ``topic``."""
        return encode_signed(command, topic, self._sign)

    def _sign(self, content: bytes) -> str:
        return base64.b64encode(self._key.sign(content)).decode("ascii")


@dataclass
class Verifier:
    """Decides whether a received command may be acted on; see :meth:`refusal`."""

    key: Ed25519PublicKey
    max_ahead: timedelta
    """The furthest in the future ``expires_at`` may be: how long the ledger remembers ids,
    so that a signed command can never be replayed after its id has been forgotten."""

    @classmethod
    def for_settings(cls, settings: AgentSettings) -> Verifier | None:
        """The agent's verifier, or None when it does not require signatures."""
        if settings.command_public_key is None:
            return None
        return cls(
            load_public_key(settings.command_public_key),
            max_ahead=timedelta(days=settings.ledger_retention_days),
        )

    def refusal(
        self, topic: str, command: Command, fields: Mapping[str, Any], now: datetime
    ) -> str | None:
        """Why the command must not be acted on, or None. An expired command passes: the
        agent answers it `expired`, as it does any other."""
        if command.sig is None:
            return SIGNATURE_REQUIRED
        from cryptography.exceptions import InvalidSignature

        try:
            signature = base64.b64decode(command.sig, validate=True)
        except (binascii.Error, ValueError):
            return BAD_SIGNATURE
        if len(signature) != _SIGNATURE_BYTES:
            return BAD_SIGNATURE
        try:
            self.key.verify(signature, signed_content(topic, fields))
        except InvalidSignature:
            return BAD_SIGNATURE
        if command.id is None or command.expires_at is None:
            return NEEDS_ID_AND_EXPIRY
        if command.expires_at > now + self.max_ahead:
            days = self.max_ahead.total_seconds() / 86400
            return (
                f"expires_at is too far ahead: at most {days:g} days from now"
                " (ledger_retention_days), or a replay could outlive the ledger"
            )
        return None


class WarningBudget:
    """At most ``limit`` warnings per ``period`` seconds, so that a flood of forged commands
    cannot flood the log; the rest are counted and reported with the next allowed one."""

    def __init__(self, log: logging.Logger, *, limit: int = 10, period: float = 60.0) -> None:
        self._log = log
        self._limit = limit
        self._period = period
        self._window_start = -period
        self._used = 0
        self._suppressed = 0

    def warn(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._window_start >= self._period:
            self._window_start, self._used = now, 0
        if self._used >= self._limit:
            self._suppressed += 1
            return
        self._used += 1
        if self._suppressed:
            self._log.warning("%d similar warnings were suppressed", self._suppressed)
            self._suppressed = 0
        self._log.warning(message, *args)
