"""Real MQTT brokers for tests, each on a free port: the controller's embedded amqtt broker
in this event loop, or a mosquitto process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from fleet_agent.protocol import DEFAULT_PREFIX

if TYPE_CHECKING:
    from fleet_controller.broker import ServerTLS

DEFAULT_TIMEOUT = 10.0
"""How long any helper waits for something that should happen at once."""
BROKER_YAML = Path(__file__).resolve().parents[2] / "broker.yaml"
BROKER_KINDS = ["amqtt", pytest.param("mosquitto", marks=pytest.mark.mosquitto)]
"""Parametrize over these to run a test against each broker implementation."""
MOSQUITTO = Path("/usr/sbin/mosquitto")
_PORT_ATTEMPTS = 5


@dataclass(frozen=True)
class BrokerEndpoint:
    """Where a test broker listens, and which implementation it is."""

    host: str
    port: int
    kind: str
    log: list[str] = field(default_factory=list, compare=False, repr=False)
    """The broker's log lines so far (mosquitto only), for failure messages."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def run_amqtt(
    config_path: Path = BROKER_YAML,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    credentials: Path | None = None,
    tls: ServerTLS | None = None,
) -> AsyncIterator[BrokerEndpoint]:
    """The controller's embedded amqtt broker, in this event loop, on ``port`` or a free one;
    with ``credentials`` (a `fleet credentials` directory), logins and topics are checked;
    with ``tls``, it is a TLS listener."""
    from fleet_controller.broker import EmbeddedBroker, load_broker_config, with_credentials
    from fleet_controller.errors import PortInUse

    for _ in range(_PORT_ATTEMPTS if port is None else 1):
        chosen = port or free_port(host)
        config = load_broker_config(config_path, host=host, port=chosen, tls=tls)
        if credentials is not None:
            config = with_credentials(config, credentials, DEFAULT_PREFIX)
        broker = EmbeddedBroker(config)
        try:
            await broker.__aenter__()
        except PortInUse:  # another process took the port between the probe and the bind
            if port is not None:
                raise
            continue
        try:
            yield BrokerEndpoint(host, chosen, "amqtt")
        finally:
            await broker.__aexit__(None, None, None)
        return
    raise RuntimeError(f"no free port for amqtt after {_PORT_ATTEMPTS} attempts")


async def _read_until_running(stream: asyncio.StreamReader, log: list[str]) -> bool:
    while line := await stream.readline():
        log.append(line.decode(errors="replace").rstrip())
        if log[-1].endswith(" running"):
            return True
    return False


async def _drain(stream: asyncio.StreamReader, log: list[str]) -> None:
    while line := await stream.readline():
        log.append(line.decode(errors="replace").rstrip())


@contextlib.asynccontextmanager
async def run_mosquitto(
    workdir: Path,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    binary: Path = MOSQUITTO,
    extra_config: Sequence[str] = (),
    defaults: bool = True,
) -> AsyncIterator[BrokerEndpoint]:
    """A real mosquitto process on ``port`` or a free one, ready once it logs "running".
    ``defaults=False`` leaves out everything but the listener and the log destination."""
    fixed_port = port
    for _ in range(_PORT_ATTEMPTS if fixed_port is None else 1):
        port = fixed_port or free_port(host)
        config = workdir / f"mosquitto-{port}.conf"
        base = [
            "allow_anonymous true",
            "persistence false",
            "set_tcp_nodelay true",
            "max_queued_messages 10000",
        ]
        lines = [
            f"listener {port} {host}",
            "log_dest stderr",
            *(base if defaults else []),
            *extra_config,
        ]
        config.write_text("\n".join(lines) + "\n")
        proc = await asyncio.create_subprocess_exec(
            str(binary),
            "-c",
            str(config),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        assert proc.stderr is not None
        log: list[str] = []
        try:
            async with asyncio.timeout(DEFAULT_TIMEOUT):
                running = await _read_until_running(proc.stderr, log)
        except BaseException:
            await stop_process(proc, signal.SIGKILL)
            raise
        if running:
            break
        await proc.wait()
        if fixed_port is not None or not any("Address already in use" in x for x in log):
            raise RuntimeError("mosquitto did not start:\n" + "\n".join(log))
    else:
        raise RuntimeError(f"no free port for mosquitto after {_PORT_ATTEMPTS} attempts")
    assert port is not None
    # Keep reading so a chatty broker never blocks on a full pipe.
    drain = asyncio.create_task(_drain(proc.stderr, log), name=f"mosquitto-{port}-log")
    try:
        yield BrokerEndpoint(host, port, "mosquitto", log)
    finally:
        await stop_process(proc, signal.SIGTERM)
        await drain


def secure_mosquitto_config(credentials: Path) -> list[str]:
    """mosquitto settings for a fleet with MQTT identities, as in deploy/mosquitto/fleet.conf."""
    return [
        "allow_anonymous false",
        f"password_file {credentials / 'mosquitto.passwd'}",
        f"acl_file {credentials / 'mosquitto.acl'}",
        "use_username_as_clientid true",
        # As root mosquitto would switch to its own user, who cannot read the 0600 files
        # the test wrote; as anyone else this line does nothing.
        "user root",
        "persistence false",
        "set_tcp_nodelay true",
        "max_queued_messages 10000",
    ]


def run_secure_broker(
    kind: str, workdir: Path, credentials: Path
) -> contextlib.AbstractAsyncContextManager[BrokerEndpoint]:
    """A broker of ``kind`` that checks logins and topics against ``credentials``."""
    if kind == "amqtt":
        return run_amqtt(credentials=credentials)
    if kind == "mosquitto":
        require(MOSQUITTO, "mosquitto")
        return run_mosquitto(
            workdir, defaults=False, extra_config=secure_mosquitto_config(credentials)
        )
    raise ValueError(f"unknown broker kind {kind!r}")


def run_broker(
    kind: str, workdir: Path, *, port: int | None = None
) -> contextlib.AbstractAsyncContextManager[BrokerEndpoint]:
    """Start a broker of ``kind`` ("amqtt" or "mosquitto") on ``port`` or a free one."""
    if kind == "amqtt":
        return run_amqtt(port=port)
    if kind == "mosquitto":
        return run_mosquitto(workdir, port=port)
    raise ValueError(f"unknown broker kind {kind!r}")


async def stop_process(
    proc: asyncio.subprocess.Process,
    sig: signal.Signals,
    *,
    timeout: float = DEFAULT_TIMEOUT,  # noqa: ASYNC109 - a grace period, then SIGKILL
) -> int:
    """Send ``sig`` and reap the process; SIGKILL it if it outlives ``timeout``."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            async with asyncio.timeout(timeout):
                return await proc.wait()
        except TimeoutError:
            proc.kill()
    return await proc.wait()


async def mosquitto_pub(
    binary: str, endpoint: BrokerEndpoint, topic: str, payload: str, *, username: str = "operator"
) -> None:
    """Publish one QoS 1 message with the real mosquitto_pub client, as an operator would."""
    proc = await asyncio.create_subprocess_exec(
        binary,
        *("-h", endpoint.host, "-p", str(endpoint.port), "-u", username, "-q", "1"),
        *("-t", topic, "-m", payload),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    async with asyncio.timeout(DEFAULT_TIMEOUT):
        output, _ = await proc.communicate()
    assert proc.returncode == 0, output.decode(errors="replace")


def require(binary: Path, package: str) -> str:
    """The binary's path. A missing one skips the test on a developer's machine, with the
    reason, and fails it in CI (CI=true), where nothing may be skipped."""
    if binary.exists():
        return str(binary)
    message = f"{binary} not found: apt-get install {package}"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message + " (required in CI)")
    pytest.skip(message)
