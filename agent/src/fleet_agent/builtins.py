"""The commands every agent ships with: ping, info, run and sleep."""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import shutil
import signal
import socket
import time

from pydantic import BaseModel, ConfigDict, Field

from fleet_agent import __version__
from fleet_agent.errors import CommandError
from fleet_agent.protocol import utcnow
from fleet_agent.registry import Context, NoArgs, Outcome, Registry

BUILTINS = Registry()

_STARTED_MONOTONIC = time.monotonic()
_KILL_GRACE_SECONDS = 2.0


@BUILTINS.command("ping", args=NoArgs)
async def ping(args: NoArgs, ctx: Context) -> Outcome:
    """Answer at once with the agent's clock; the controller derives latency from it."""
    return Outcome(output={"pong": True, "time": utcnow().isoformat().replace("+00:00", "Z")})


def host_facts() -> dict[str, str | int | float | None]:
    """Cheap, static facts about the host, sent in the birth message."""
    return {
        "hostname": socket.gethostname(),
        "os": platform.system(),
        "os_release": platform.release(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }


def _meminfo() -> dict[str, int]:
    facts: dict[str, int] = {}
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("MemTotal", "MemAvailable"):
                facts[key] = int(rest.split()[0]) * 1024
    return facts


def _system_uptime() -> float | None:
    with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/uptime") as f:
        return float(f.read().split()[0])
    return None


@BUILTINS.command("info", args=NoArgs)
async def info(args: NoArgs, ctx: Context) -> Outcome:
    """Host, OS, Python, agent version, uptime, load, memory and disk."""
    mem = _meminfo()
    disk = shutil.disk_usage(ctx.state_dir)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return Outcome(
        output={
            **host_facts(),
            "agent_version": __version__,
            "agent_uptime_s": round(time.monotonic() - _STARTED_MONOTONIC, 3),
            "system_uptime_s": _system_uptime(),
            "load": list(load) if load else None,
            "memory": {"total": mem.get("MemTotal"), "available": mem.get("MemAvailable")},
            "disk": {"path": str(ctx.state_dir), "total": disk.total, "free": disk.free},
        }
    )


class RunArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    argv: list[str] = Field(min_length=1, description="Program and arguments; never a shell.")
    cwd: str | None = Field(default=None, description="Working directory.")
    env: dict[str, str] = Field(
        default_factory=dict, description="Added to (and overriding) the agent's environment."
    )
    stdin: str | None = Field(default=None, description="Text fed to the program's stdin.")


async def _read_capped(stream: asyncio.StreamReader | None, cap: int) -> tuple[str, bool]:
    """Read a stream to its end, keeping at most ``cap`` bytes, so output never fills memory."""
    if stream is None:
        return "", False
    kept = bytearray()
    truncated = False
    while chunk := await stream.read(65536):
        room = cap - len(kept)
        if len(chunk) > room:
            truncated = True
        if room > 0:
            kept += chunk[:room]
    return kept.decode("utf-8", errors="replace"), truncated


def _kill_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


@BUILTINS.command("run", args=RunArgs)
async def run(args: RunArgs, ctx: Context) -> Outcome:
    """Execute a program (argv list, no shell) and return its exit code, stdout and stderr.

    The program's environment is the agent's, plus FLEET_AGENT_ID and FLEET_COMMAND_ID, plus
    ``env``.

    The program leads a process group of its own; when the command times out or is cancelled
    the whole group is terminated, then killed, so no grandchild outlives it.
    """
    try:
        proc = await asyncio.create_subprocess_exec(
            *args.argv,
            cwd=args.cwd,
            env={
                **os.environ,
                "FLEET_AGENT_ID": ctx.agent_id,
                "FLEET_COMMAND_ID": ctx.command_id,
                **args.env,
            },
            stdin=asyncio.subprocess.PIPE if args.stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
    except OSError as exc:
        if args.cwd is not None and exc.filename == args.cwd:
            raise CommandError(f"cwd {args.cwd!r}: {exc.strerror or exc}") from exc
        raise CommandError(f"cannot execute {args.argv[0]!r}: {exc.strerror or exc}") from exc
    pgid = proc.pid  # start_new_session makes the child the leader of its own group
    try:
        if args.stdin is not None and proc.stdin is not None:
            proc.stdin.write(args.stdin.encode())
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                await proc.stdin.drain()
            proc.stdin.close()
        (stdout, out_cut), (stderr, err_cut), code = await asyncio.gather(
            _read_capped(proc.stdout, ctx.max_output_bytes),
            _read_capped(proc.stderr, ctx.max_output_bytes),
            proc.wait(),
        )
    except BaseException:
        await asyncio.shield(_terminate(proc, pgid))
        raise
    # A grandchild may still hold the group alive after the leader exits; never leave it behind.
    _kill_group(pgid, signal.SIGKILL)
    return Outcome(
        exit_code=code,
        output={
            "stdout": stdout,
            "stderr": stderr,
            "stdout_truncated": out_cut,
            "stderr_truncated": err_cut,
        },
        error=f"exited with code {code}" if code != 0 else None,
    )


async def _terminate(proc: asyncio.subprocess.Process, pgid: int) -> None:
    _kill_group(pgid, signal.SIGTERM)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(proc.wait(), _KILL_GRACE_SECONDS)
    _kill_group(pgid, signal.SIGKILL)
    await proc.wait()


class SleepArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seconds: float = Field(ge=0, le=3600, description="How long to sleep.")


@BUILTINS.command("sleep", args=SleepArgs)
async def sleep(args: SleepArgs, ctx: Context) -> Outcome:
    """Sleep, then succeed: for demos and tests of timeouts and concurrency."""
    await asyncio.sleep(args.seconds)
    return Outcome(output={"slept": args.seconds})
