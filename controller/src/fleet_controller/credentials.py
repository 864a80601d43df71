"""MQTT identities: one username and password per agent, controller and operator, the files
both brokers read (argon2 for amqtt, ``mosquitto_passwd`` PBKDF2 for mosquitto) and the topic
ACLs each role gets.

``users.json`` in the credentials directory is the source of truth (hashes only; passwords
are shown once, when made). Every change rewrites the broker files from it atomically."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import secrets
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from argon2 import PasswordHasher

from fleet_agent.errors import ConfigError
from fleet_agent.protocol import BROADCAST, DEFAULT_PREFIX, check_agent_id, check_prefix

USERS_FILE = "users.json"
AMQTT_PASSWORDS = "passwd"
MOSQUITTO_PASSWORDS = "mosquitto.passwd"
MOSQUITTO_ACL = "mosquitto.acl"

# Passwords are always generated (192 random bits), so hash cost buys nothing against
# guessing; cheap parameters keep a reconnecting fleet from stalling the broker's event loop.
_ARGON2 = PasswordHasher(time_cost=1, memory_cost=8 * 1024, parallelism=1)
_PBKDF2_ITERATIONS = 10_000


class Role(StrEnum):
    AGENT = "agent"
    CONTROLLER = "controller"
    OPERATOR = "operator"


class Access(StrEnum):
    READ = "read"  # subscribe and receive
    WRITE = "write"  # publish


def topic_rules(
    username: str, role: Role, prefix: str = DEFAULT_PREFIX
) -> list[tuple[Access, str]]:
    """What ``username`` may do on which topic filters: the one ACL both brokers enforce."""
    p = prefix
    if role is Role.AGENT:
        return [
            (Access.READ, f"{p}/{username}/cmd"),
            (Access.READ, f"{p}/{BROADCAST}/cmd"),
            (Access.WRITE, f"{p}/{username}/result"),
            (Access.WRITE, f"{p}/{username}/status"),
        ]
    if role is Role.CONTROLLER:
        # It records commands others publish, and clears a removed agent's retained status.
        return [
            (Access.READ, f"{p}/+/result"),
            (Access.READ, f"{p}/+/status"),
            (Access.READ, f"{p}/+/cmd"),
            (Access.WRITE, f"{p}/+/cmd"),
            (Access.WRITE, f"{p}/+/status"),
        ]
    return [
        (Access.WRITE, f"{p}/+/cmd"),
        (Access.READ, f"{p}/+/result"),
        (Access.READ, f"{p}/+/status"),
    ]


def filter_covers(allowed: str, requested: str) -> bool:
    """Whether every topic matching filter ``requested`` also matches filter ``allowed``
    (a plain topic is a filter matching only itself)."""
    want = requested.split("/")
    have = allowed.split("/")
    for i, level in enumerate(have):
        if level == "#" and i == len(have) - 1:
            return True
        if i >= len(want):
            return False
        if level == "+":
            if want[i] == "#":
                return False
        elif want[i] != level:
            return False
    return len(want) == len(have)


def mosquitto_hash(password: str, *, salt: bytes | None = None) -> str:
    """A ``$7$`` PBKDF2-SHA512 hash, the format ``mosquitto_passwd`` writes."""
    salt = salt if salt is not None else secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, _PBKDF2_ITERATIONS)
    b64 = base64.b64encode
    return f"$7${_PBKDF2_ITERATIONS}${b64(salt).decode()}${b64(digest).decode()}"


@dataclass(frozen=True)
class User:
    name: str
    role: Role
    argon2: str
    pbkdf2: str
    created_at: str


def _write_atomic(path: Path, text: str, mode: int) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, mode)
        with contextlib.suppress(FileNotFoundError, PermissionError):
            # Keep the owner an admin gave the file (e.g. chown mosquitto), or the broker
            # could no longer read it after the next change.
            st = path.stat()
            os.chown(tmp, st.st_uid, st.st_gid)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class Credentials:
    """The credentials directory: add, remove and list users; keep broker files in step."""

    def __init__(self, directory: Path, *, prefix: str | None = None) -> None:
        """``prefix`` None: the one stored with the users, else the default."""
        if prefix is not None:
            valid_prefix(prefix)
        self.directory = directory
        self.amqtt_passwords = directory / AMQTT_PASSWORDS
        self.mosquitto_passwords = directory / MOSQUITTO_PASSWORDS
        self.mosquitto_acl = directory / MOSQUITTO_ACL
        self.users_file = directory / USERS_FILE
        self._prefix = prefix

    @property
    def prefix(self) -> str:
        if self._prefix is None:
            self._prefix = load_prefix(self.users_file)
        return self._prefix

    def users(self) -> dict[str, User]:
        return load_users(self.users_file)

    def add(self, name: str, role: Role, *, replace: bool = False) -> str:
        """Create (or with ``replace``, reset) ``name``; returns its new password, once."""
        return self.add_many([(name, role)], replace=replace)[name]

    def add_many(
        self, wanted: Iterable[tuple[str, Role]], *, replace: bool = False
    ) -> dict[str, str]:
        """:meth:`add` for several users, with one rewrite of the files."""
        users = self.users()
        passwords: dict[str, str] = {}
        for name, role in wanted:
            check_agent_id(name)
            if name in users and not replace:
                raise ConfigError(
                    f"MQTT user {name!r} exists (role {users[name].role}); use --replace for a"
                    " new password"
                )
            password = passwords[name] = secrets.token_urlsafe(24)
            users[name] = User(
                name=name,
                role=role,
                argon2=_ARGON2.hash(password),
                pbkdf2=mosquitto_hash(password),
                created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            )
        self._save(users)
        return passwords

    def remove(self, name: str) -> None:
        users = self.users()
        if name not in users:
            raise ConfigError(f"no MQTT user {name!r} in {self.users_file}")
        del users[name]
        self._save(users)

    def _save(self, users: dict[str, User]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        ordered = sorted(users.values(), key=lambda u: u.name)
        doc = {
            "version": 1,
            "prefix": self.prefix,
            "users": {
                u.name: {
                    "role": u.role.value,
                    "argon2": u.argon2,
                    "pbkdf2": u.pbkdf2,
                    "created_at": u.created_at,
                }
                for u in ordered
            },
        }
        # Broker files first: users.json changes last, so a crash leaves them a superset.
        _write_atomic(self.amqtt_passwords, _lines(f"{u.name}:{u.argon2}" for u in ordered), 0o600)
        _write_atomic(
            self.mosquitto_passwords, _lines(f"{u.name}:{u.pbkdf2}" for u in ordered), 0o600
        )
        _write_atomic(self.mosquitto_acl, mosquitto_acl(ordered, self.prefix), 0o644)
        _write_atomic(self.users_file, json.dumps(doc, indent=2) + "\n", 0o600)


def _lines(lines: Iterable[str]) -> str:
    return "".join(f"{line}\n" for line in lines)


def mosquitto_acl(users: Iterable[User], prefix: str = DEFAULT_PREFIX) -> str:
    out = ["# Written by `fleet credentials`; edits are overwritten.", ""]
    for user in users:
        out.append(f"user {user.name}")
        out += [
            f"topic {access} {topic}" for access, topic in topic_rules(user.name, user.role, prefix)
        ]
        out.append("")
    return _lines(out)


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {"users": {}}
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read MQTT users from {path}: {exc}") from exc


def load_prefix(path: Path) -> str:
    prefix = _load(path).get("prefix", DEFAULT_PREFIX)
    if not isinstance(prefix, str):
        raise ConfigError(f"malformed MQTT users file {path}: prefix is not a string")
    return valid_prefix(prefix)


def valid_prefix(prefix: str) -> str:
    """A prefix with wildcards or line breaks would turn every ACL rule into something else."""
    try:
        return check_prefix(prefix)
    except ValueError as exc:
        raise ConfigError(f"invalid topic prefix {prefix!r}: {exc}") from None


def load_users(path: Path) -> dict[str, User]:
    """The users in ``path`` (none if it does not exist yet)."""
    raw = _load(path)
    try:
        return {
            name: User(
                name=name,
                role=Role(entry["role"]),
                argon2=entry["argon2"],
                pbkdf2=entry["pbkdf2"],
                created_at=entry.get("created_at", ""),
            )
            for name, entry in raw["users"].items()
        }
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ConfigError(f"malformed MQTT users file {path}: {exc!r}") from exc


def ensure_password_files(
    creds: Credentials, users: Iterable[tuple[str, Role]], secrets_dir: Path
) -> dict[str, Path]:
    """A password file (mode 0600) per user in ``secrets_dir``, for processes started on this
    machine; users without one get a new password. Returns the files by user."""
    secrets_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    known = creds.users()
    files = {name: secrets_dir / f"{name}.password" for name, _ in users}
    missing = [
        (name, role)
        for name, role in users
        if name not in known or known[name].role is not role or not files[name].exists()
    ]
    if missing:
        for name, password in creds.add_many(missing, replace=True).items():
            _write_atomic(files[name], password + "\n", 0o600)
    return files
