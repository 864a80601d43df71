"""API tokens: issued, looked up, revoked, in the controller's SQLite database.

A token reads ``fleet_<id>_<secret>``. The id is public and names the row; the secret is 256
random bits and only its SHA-256 digest is stored. A plain fast hash is the right tool here:
slow password hashes (argon2, bcrypt) exist to make guessing low-entropy passwords expensive,
and nobody guesses 256 random bits, so hashing only has to stop a leaked database from
yielding working tokens. Digests are compared with :func:`hmac.compare_digest`.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import hmac
import logging
import secrets
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from fleet_agent.protocol import utcnow
from fleet_controller.models import Scope, TokenCreated, TokenPublic
from fleet_controller.schema import migrate

log = logging.getLogger("fleet_controller.audit")

PREFIX = "fleet_"
SECRET_BYTES = 32
# Writing last_used_at on every request would turn every read into a write; a minute is
# precise enough to tell a token in use from an abandoned one.
LAST_USED_RESOLUTION = timedelta(minutes=1)
_COLUMNS = "id, name, scope, created_at, created_by, last_used_at, revoked_at"


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def split_token(token: str) -> tuple[str, str] | None:
    """(id, secret) of a well-formed token string, else None."""
    if not token.startswith(PREFIX):
        return None
    token_id, sep, secret = token[len(PREFIX) :].partition("_")
    if not (sep and token_id.isalnum() and token_id.isascii() and secret):
        return None
    return token_id, secret


def default_creator() -> str:
    """Who issued a token from this machine's shell, for the audit trail."""
    try:
        return f"local user {getpass.getuser()}"
    except (KeyError, OSError):
        return "local user"


@dataclass(frozen=True, slots=True)
class TokenStore:
    """Token rows on an open connection (autocommit; each statement takes microseconds)."""

    db: sqlite3.Connection

    def create(self, *, name: str, scope: Scope, created_by: str) -> TokenCreated:
        token_id = secrets.token_hex(8)
        secret = secrets.token_urlsafe(SECRET_BYTES)
        now = utcnow()
        self.db.execute(
            "INSERT INTO tokens (id, name, scope, secret_sha256, created_at, created_by)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (token_id, name, scope.value, digest(secret), now.isoformat(), created_by),
        )
        log.info(
            "audit: token %s (%s) created with scope %s by %s", token_id, name, scope, created_by
        )
        return TokenCreated(
            **_public(
                (token_id, name, scope.value, now.isoformat(), created_by, None, None)
            ).model_dump(),
            token=f"{PREFIX}{token_id}_{secret}",
        )

    def list_all(self) -> list[TokenPublic]:
        rows = self.db.execute(f"SELECT {_COLUMNS} FROM tokens ORDER BY created_at, id")
        return [_public(row) for row in rows]

    def revoke(self, token_id: str, *, by: str) -> TokenPublic | None:
        """Revoke (idempotent); None if there is no such token."""
        now = utcnow().isoformat()
        self.db.execute(
            "UPDATE tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL", (now, token_id)
        )
        row = self.db.execute(f"SELECT {_COLUMNS} FROM tokens WHERE id = ?", (token_id,)).fetchone()
        if row is None:
            return None
        log.info("audit: token %s (%s) revoked by %s", token_id, row[1], by)
        return _public(row)

    def active_count(self) -> int:
        row = self.db.execute("SELECT COUNT(*) FROM tokens WHERE revoked_at IS NULL").fetchone()
        return int(row[0])

    def authenticate(self, token: str) -> TokenPublic | None:
        """The token's row if the token is well formed, known, matching and not revoked."""
        parts = split_token(token)
        if parts is None:
            return None
        token_id, secret = parts
        row = self.db.execute(
            f"SELECT {_COLUMNS}, secret_sha256 FROM tokens WHERE id = ?", (token_id,)
        ).fetchone()
        if row is None or not hmac.compare_digest(row[7], digest(secret)) or row[6] is not None:
            return None
        found = _public(row[:7])
        now = utcnow()
        if found.last_used_at is None or now - found.last_used_at >= LAST_USED_RESOLUTION:
            self.db.execute(
                "UPDATE tokens SET last_used_at = ? WHERE id = ?", (now.isoformat(), token_id)
            )
        return found


def _public(row: tuple[object, ...]) -> TokenPublic:
    scope = Scope(str(row[2]))
    return TokenPublic(
        id=str(row[0]),
        name=str(row[1]),
        scope=scope,
        scopes=scope.implied,
        created_at=datetime.fromisoformat(str(row[3])),
        created_by=str(row[4]),
        last_used_at=datetime.fromisoformat(str(row[5])) if row[5] else None,
        revoked_at=datetime.fromisoformat(str(row[6])) if row[6] else None,
    )


@contextlib.contextmanager
def open_tokens(db_path: Path) -> Iterator[TokenStore]:
    """Tokens in the database file at ``db_path`` (created and migrated if need be), for use
    without a running controller."""
    db_path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(db_path, isolation_level=None, timeout=10)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        migrate(db)
        yield TokenStore(db)
    finally:
        db.close()


def create_token_offline(
    db_path: Path, *, name: str, scope: Scope, created_by: str | None = None
) -> TokenCreated:
    """Issue a token by writing the controller's database directly: the bootstrap path when no
    admin token exists yet. Whoever can write that file controls the controller anyway."""
    with open_tokens(db_path) as tokens:
        return tokens.create(name=name, scope=scope, created_by=created_by or default_creator())


def valid_or_new_token(db_path: Path, token: str | None, *, name: str, scope: Scope) -> str:
    """``token`` if the database at ``db_path`` still accepts it with ``scope``, else a new
    token issued offline."""
    with open_tokens(db_path) as tokens:
        found = tokens.authenticate(token) if token else None
        if token and found is not None and found.scope.allows(scope):
            return token
        return tokens.create(name=name, scope=scope, created_by=default_creator()).token


def revoke_offline(db_path: Path, token: str, *, by: str) -> None:
    """Revoke ``token`` by writing the database at ``db_path`` directly."""
    parts = split_token(token)
    if parts is not None:
        with open_tokens(db_path) as tokens:
            tokens.revoke(parts[0], by=by)
