"""Running the pieces as long-lived processes: HTTP sockets, uvicorn, signals, the state file."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import uvicorn

from fleet_controller.errors import PortInUse

STATE_FILE = "fleet.json"


def default_state_dir() -> Path:
    """Where `fleet up` keeps its database, agents' ledgers and what other commands need."""
    explicit = os.environ.get("FLEET_STATE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "fleet"


def read_state(state_dir: Path | None = None) -> dict[str, Any]:
    """What a running `fleet up` left for the other subcommands; empty if none."""
    path = (state_dir or default_state_dir()) / STATE_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_state(state_dir: Path, data: dict[str, Any]) -> Path:
    """Written owner-only (0600) from the first byte: it holds an admin API token."""
    path = state_dir / STATE_FILE
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
    return path


def bind_tcp(host: str, port: int, *, what: str, flag: str) -> socket.socket:
    """A listening socket, created with IPPROTO_TCP so that asyncio turns TCP_NODELAY on for
    accepted connections (a plain socket() makes every HTTP response stall ~40 ms)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise PortInUse(what, host, port, flag) from None
        raise
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class Server(uvicorn.Server):
    """uvicorn without its own signal handling: the caller decides when to stop."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def http_server(app: Any, *, log_level: str = "warning") -> Server:
    return Server(uvicorn.Config(app, log_level=log_level, lifespan="on", access_log=False))


def stop_on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
