"""Benchmark: HTTP dispatch latency and broadcast collection, on amqtt and mosquitto.

    uv run python bench/dispatch.py [--samples 300] [--agents 100] [--broker amqtt|mosquitto|both]
                                    [--secure]

--secure turns on what `fleet up` runs with: MQTT logins and topic ACLs for every client, and
commands signed by the controller and checked by every agent (API tokens are always on).

Each process runs what it would in a deployment: the broker (mosquitto, or amqtt inside
`fleet broker`), `fleet controller`, one process holding the agents, and this client.
Baselines measured in the same run: an aiomqtt QoS 1 round trip through the same broker,
and GET /healthz on the same controller. Figures are medians; ratios are against baselines.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
import httpx

from fleet_agent.mqtt import NODELAY
from fleet_agent.signing import generate_key_pair
from fleet_controller.credentials import Credentials, Role, ensure_password_files
from fleet_controller.models import Scope
from fleet_controller.tokens import create_token_offline

ROOT = Path(__file__).resolve().parent.parent
AGENTS_SCRIPT = """
import asyncio, sys
from pathlib import Path
from fleet_agent.agent import Agent
from fleet_agent.settings import AgentSettings

async def main(port: int, count: int, state: str, secrets: str = "", key: str = "") -> None:
    async with __import__("contextlib").AsyncExitStack() as stack:
        for i in range(count):
            extra = {} if not secrets else {
                "password_file": Path(secrets) / f"b{i}.password", "command_public_key": Path(key)
            }
            s = AgentSettings(agent_id=f"b{i}", broker_port=port, state_dir=Path(state) / f"b{i}",
                              log_level="WARNING", **extra)
            agent = await stack.enter_async_context(Agent(s))
        print("ready", flush=True)
        await asyncio.Event().wait()

asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), *sys.argv[3:]))
"""
RTT_USER = "bench-rtt"  # a controller-role login: it may publish and read fleet/+/cmd


@dataclass
class Security:
    """Logins, ACLs and signing keys for --secure runs."""

    credentials: Path
    secrets: Path
    private_key: Path
    public_key: Path

    @classmethod
    def make(cls, workdir: Path, agents: int) -> Security:
        creds = Credentials(workdir / "mqtt")
        users = [("fleet-controller", Role.CONTROLLER), (RTT_USER, Role.CONTROLLER)]
        users += [(f"b{i}", Role.AGENT) for i in range(agents)]
        ensure_password_files(creds, users, workdir / "secrets")
        private, public = generate_key_pair(workdir / "keys")
        return cls(creds.directory, workdir / "secrets", private, public)

    def password(self, user: str) -> str:
        return (self.secrets / f"{user}.password").read_text().strip()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def process(
    *argv: str, ready: str | None = None
) -> AsyncIterator[asyncio.subprocess.Process]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=ROOT
    )
    assert proc.stdout is not None
    try:
        if ready is not None:
            async with asyncio.timeout(60):
                while True:
                    line = (await proc.stdout.readline()).decode()
                    if not line:
                        raise RuntimeError(f"{argv[0]} exited before it was ready")
                    if ready in line:
                        break
        yield proc
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
            try:
                async with asyncio.timeout(20):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()


@contextlib.asynccontextmanager
async def broker(
    kind: str, port: int, workdir: Path, security: Security | None
) -> AsyncIterator[None]:
    if kind == "mosquitto":
        conf = workdir / "mosquitto.conf"
        access = ["allow_anonymous true"]
        if security is not None:
            c = security.credentials
            access = [
                "allow_anonymous false", f"password_file {c / 'mosquitto.passwd'}",
                f"acl_file {c / 'mosquitto.acl'}", "use_username_as_clientid true", "user root",
            ]  # fmt: skip
        conf.write_text(
            "\n".join(
                [f"listener {port} 127.0.0.1", *access, "persistence false", "set_tcp_nodelay true",
                 "max_queued_messages 100000", "log_dest stderr"]
            ) + "\n"
        )  # fmt: skip
        async with process("/usr/sbin/mosquitto", "-c", str(conf), ready=" running"):
            yield
    else:
        fleet = [sys.executable, "-m", "fleet_controller"]
        async with process(
            *fleet,
            "broker",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            *(["--credentials", str(security.credentials)] if security else []),
            ready="embedded MQTT broker on",
        ):
            yield


async def mqtt_round_trips(port: int, samples: int, security: Security | None) -> list[float]:
    """Baseline: publish QoS 1 to a topic we subscribe to, time until it comes back."""
    times = []
    password = security.password(RTT_USER) if security else None
    topic = f"fleet/{RTT_USER}/cmd"
    async with aiomqtt.Client(
        "127.0.0.1", port, identifier=RTT_USER, username=RTT_USER, password=password,
        socket_options=NODELAY,
    ) as client:  # fmt: skip
        await client.subscribe(topic, qos=1)
        messages = client.messages
        for i in range(samples):
            t0 = time.perf_counter()
            await client.publish(topic, str(i).encode(), qos=1)
            async for _ in messages:
                break
            times.append(time.perf_counter() - t0)
    return times


async def http_times(
    http: httpx.AsyncClient, samples: int, method: str, path: str, **kw: object
) -> list[float]:
    times = []
    for _ in range(samples):
        t0 = time.perf_counter()
        r = await http.request(method, path, **kw)  # type: ignore[arg-type]
        times.append(time.perf_counter() - t0)
        r.raise_for_status()
        if method == "POST":
            assert r.json()["complete"], r.text
    return times


def ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:.2f} ms"


async def run(kind: str, samples: int, agents: int, secure: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        security = Security.make(workdir, agents) if secure else None
        controller_security = agent_security = []
        if security is not None:
            controller_security = [
                "--password-file", str(security.secrets / "fleet-controller.password"),
                "--signing-key", str(security.private_key),
            ]  # fmt: skip
            agent_security = [str(security.secrets), str(security.public_key)]
        mqtt, http_port = free_port(), free_port()
        env_db = str(workdir / "fleet.sqlite3")
        token = create_token_offline(Path(env_db), name="bench", scope=Scope.ADMIN).token
        auth = {"authorization": f"Bearer {token}"}
        async with broker(kind, mqtt, workdir, security), process(
            sys.executable, "-m", "fleet_controller", "controller",
            "--broker-port", str(mqtt), "--http-port", str(http_port), "--db-path", env_db,
            "--log-level", "INFO", *controller_security, ready="controller on",
        ), process(
            sys.executable, "-c", AGENTS_SCRIPT, str(mqtt), str(agents), str(workdir / "agents"),
            *agent_security, ready="ready",
        ):  # fmt: skip
            async with httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{http_port}", timeout=60, headers=auth
            ) as http:
                (await http.get("/readyz", params={"wait": 30})).raise_for_status()
                for i in range(agents):
                    (await http.get(f"/api/v1/agents/b{i}", params={"wait": 30})).raise_for_status()
                rtt = await mqtt_round_trips(mqtt, samples, security)
                health = await http_times(http, samples, "GET", "/healthz")
                body = {"target": "b0", "command": "ping"}
                await http_times(
                    http, 20, "POST", "/api/v1/commands", params={"wait": 5}, json=body
                )
                ping = await http_times(
                    http, samples, "POST", "/api/v1/commands", params={"wait": 5}, json=body
                )
                bcast = await http_times(
                    http, max(samples // 20, 5), "POST", "/api/v1/commands", params={"wait": 30},
                    json={"target": "all", "command": "ping"},
                )  # fmt: skip
        mode = "secure: logins, ACLs, signed commands" if secure else "no MQTT logins or signing"
        print(f"\n== {kind}: {samples} samples, {agents} agents, {mode} (medians)")
        print(f"baseline aiomqtt QoS 1 round trip       {ms(rtt)}")
        print(f"baseline GET /healthz                   {ms(health)}")
        print(
            f"POST /commands?wait=5 ping, one agent   {ms(ping)}"
            f"  = {statistics.median(ping) / statistics.median(rtt):.1f}x MQTT RTT,"
            f" {statistics.median(ping) / statistics.median(health):.1f}x GET"
        )
        print(
            f"broadcast ping, {agents} agents, all collected  {ms(bcast)}"
            f"  = {statistics.median(bcast) / statistics.median(rtt):.0f}x MQTT RTT"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--agents", type=int, default=100)
    parser.add_argument("--broker", choices=["amqtt", "mosquitto", "both"], default="both")
    parser.add_argument("--secure", action="store_true", help="MQTT logins, ACLs and signing.")
    args = parser.parse_args()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    for kind in ["amqtt", "mosquitto"] if args.broker == "both" else [args.broker]:
        asyncio.run(run(kind, args.samples, args.agents, args.secure))


if __name__ == "__main__":
    main()
