"""`fleet up` end to end: one process runs broker, controller and demo agents, and the
examples it prints work as printed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import signal
import socket
import stat
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from test_cli import fleet

from fleet_controller.tokens import open_tokens

from fleet_testing import DEFAULT_TIMEOUT, bearer, free_port

ROOT = Path(__file__).resolve().parent.parent


@contextlib.asynccontextmanager
async def fleet_up(
    tmp_path: Path, *args: str
) -> AsyncIterator[tuple[asyncio.subprocess.Process, list[str]]]:
    """`fleet up` as a subprocess, yielded with its banner lines once it says it is up."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fleet_controller", "up", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "COLUMNS": "300", "FLEET_STATE_DIR": str(tmp_path / "state")},
        cwd=ROOT,
    )  # fmt: skip
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        async with asyncio.timeout(DEFAULT_TIMEOUT * 3):
            while not lines or not lines[-1].startswith("Ctrl-C"):
                line = await proc.stdout.readline()
                assert line, "fleet up exited early:\n" + "\n".join(lines)
                lines.append(line.decode().rstrip())
        yield proc, lines
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
            async with asyncio.timeout(DEFAULT_TIMEOUT * 3):
                await proc.wait()


async def test_fleet_up_examples_work_as_printed(tmp_path: Path, mosquitto_pub: str) -> None:
    """`fleet up --agents 2`: `fleet send all ping --wait` and the printed mosquitto_pub work;
    MQTT logins without the printed password are refused."""
    mqtt, http = free_port(), free_port()
    state = {"FLEET_STATE_DIR": str(tmp_path / "state")}
    async with fleet_up(
        tmp_path, "--agents", "2", "--mqtt-port", str(mqtt), "--http-port", str(http)
    ) as (proc, banner):
        text = "\n".join(banner)
        assert "demo-1, demo-2" in text
        sent = await fleet("send", "all", "ping", "--wait", env=state)
        assert sent.code == 0, (sent.out, sent.err)
        assert "demo-1" in sent.out and "demo-2" in sent.out
        pub = next(line.strip() for line in banner if line.strip().startswith("mosquitto_pub"))
        # The example signs with `fleet sign` inside $(...): it needs a shell and the CLI.
        path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
        run = await asyncio.create_subprocess_exec(
            "sh", "-c", pub, cwd=ROOT, env={**os.environ, "PATH": path}
        )
        assert await run.wait() == 0
        command_id = shlex.split(pub)[-1].split("--id ")[1].split()[0]
        for login in ([], ["-i", "operator", "-u", "operator", "-P", "guess"]):
            refused = await asyncio.create_subprocess_exec(
                mosquitto_pub, "-h", "127.0.0.1", "-p", str(mqtt), *login, "-q", "1",
                "-t", "fleet/demo-1/cmd", "-m", '{"command":"ping"}',
                stderr=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
            assert await refused.wait() != 0, f"login {login} was not refused"
        token = banner_token(banner)
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{http}", headers=bearer(token)
        ) as client:
            r = await client.get(f"/api/v1/commands/{command_id}", params={"wait": 10})
        assert r.json()["status"] == "succeeded", r.text
        curl = next(line.strip() for line in banner if line.strip().startswith("curl"))
        assert f"127.0.0.1:{http}" in curl and f"Bearer {token}" in curl
    assert proc.returncode == 0
    rest = (await proc.stdout.read()).decode() if proc.stdout else ""
    assert "stopped cleanly" in rest
    assert not (tmp_path / "state" / "fleet.json").exists()


@pytest.mark.parametrize("flag", ["--mqtt-port", "--http-port"])
async def test_busy_port_is_one_line_naming_the_flag(tmp_path: Path, flag: str) -> None:
    """A taken port makes `fleet up` exit 2 with one line that names the flag to change."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        other = "--http-port" if flag == "--mqtt-port" else "--mqtt-port"
        r = await fleet(
            "up", "--agents", "0", flag, str(port), other, str(free_port()),
            env={"FLEET_STATE_DIR": str(tmp_path)},
        )  # fmt: skip
    assert r.code == 2, (r.out, r.err)
    lines = [line for line in r.err.splitlines() if line.strip()]
    assert len(lines) == 1, r.err
    assert f"port {port}" in lines[0] and flag in lines[0] and "already in use" in lines[0]


def banner_token(banner: list[str]) -> str:
    return next(line.split()[1] for line in banner if line.strip().startswith("token "))


async def test_fleet_up_token_is_private_works_as_printed_and_outlives_a_crash(
    tmp_path: Path,
) -> None:
    """The token is in a 0600 state file (nothing secret in the state dir is readable by others),
    works in the printed curl, and outlives a crash only."""
    ports = ("--mqtt-port", str(free_port()), "--http-port", str(free_port()))
    async with fleet_up(tmp_path, "--agents", "1", *ports) as (proc, banner):
        state = tmp_path / "state" / "fleet.json"
        assert stat.S_IMODE(state.stat().st_mode) == 0o600
        public = {"fleet-signing.pub", "mosquitto.acl"}
        for path in (tmp_path / "state").rglob("*"):  # databases hold command output too
            if path.name not in public:
                assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path
        token = banner_token(banner)
        assert json.loads(state.read_text())["token"] == token
        curl = shlex.split(next(line.strip() for line in banner if line.strip().startswith("curl")))
        headers = dict(
            tuple(curl[i + 1].split(": ", 1)) for i, arg in enumerate(curl) if arg == "-H"
        )
        url = next(arg for arg in curl if arg.startswith("http"))
        body = curl[curl.index("-d") + 1]
        async with httpx.AsyncClient(timeout=DEFAULT_TIMEOUT) as client:
            r = await client.request(curl[curl.index("-X") + 1], url, headers=headers, content=body)
        assert r.status_code == 202 and r.json()["complete"], r.text
        assert r.json()["sent_by"]["token_name"] == "fleet up"
        proc.kill()
        await proc.wait()
    ports = ("--mqtt-port", str(free_port()), "--http-port", str(free_port()))
    async with fleet_up(tmp_path, "--agents", "0", *ports) as (proc, banner):
        assert banner_token(banner) == token
    assert proc.returncode == 0
    with open_tokens(tmp_path / "state" / "fleet.sqlite3") as tokens:
        assert tokens.authenticate(token) is None, "the token is still valid after a clean stop"
