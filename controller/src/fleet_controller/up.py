"""`fleet up`: embedded broker, controller and demo agents in one process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from rich.console import Console

from fleet_agent.agent import Agent
from fleet_agent.protocol import DEFAULT_PREFIX
from fleet_agent.settings import AgentSettings
from fleet_agent.signing import ensure_key_pair
from fleet_controller.app import create_app
from fleet_controller.broker import EmbeddedBroker, ServerTLS, load_broker_config, with_credentials
from fleet_controller.credentials import Credentials, Role, ensure_password_files
from fleet_controller.models import Scope
from fleet_controller.serve import (
    STATE_FILE,
    bind_tcp,
    http_server,
    read_state,
    stop_on_signals,
    write_state,
)
from fleet_controller.settings import ControllerSettings
from fleet_controller.tokens import revoke_offline, valid_or_new_token

CONTROLLER = "fleet-controller"
OPERATOR = "operator"
WATCHER = "operator-sub"  # a second operator login, so a subscriber can run beside a publisher
# What `run` may start on the demo agents: harmless, read-only programs.
DEMO_RUN_ALLOW = [
    "uname", "uptime", "df", "free", "date", "hostname", "echo", "true", "false", "sleep",
    "whoami", "id",
]  # fmt: skip


@dataclass(frozen=True)
class UpOptions:
    mqtt_host: str
    mqtt_port: int
    http_host: str
    http_port: int
    agents: int
    state_dir: Path
    broker_config: Path | None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None


def client_tls(tls: ServerTLS | None) -> dict[str, Path]:
    """TLS settings for `fleet up`'s own clients: they trust the server certificate itself
    (no CA needed) and, under mutual TLS, present it as their client certificate."""
    if tls is None:
        return {}
    mutual = {"tls_cert": tls.certfile, "tls_key": tls.keyfile} if tls.cafile else {}
    return {"tls_ca": tls.certfile, **mutual}


def _mosquitto_tls_args(tls: ServerTLS | None) -> str:
    """mosquitto_pub/sub cannot pin a CA-signed certificate as our clients do: they trust
    the client CA (usually the one that signed the server too), else the certificate itself."""
    if tls is None:
        return ""
    args = ["--cafile", str(tls.cafile or tls.certfile)]
    if tls.cafile:
        args += ["--cert", str(tls.certfile), "--key", str(tls.keyfile)]
    return " " + shlex.join(args)


def _cli() -> str:
    return "uv run fleet" if "UV" in os.environ else "fleet"


def signing_keys(state_dir: Path) -> tuple[Path, Path]:
    """The local fleet's key pair (private, public): its agents require signed commands."""
    return ensure_key_pair(state_dir / "keys")


def examples(
    url: str,
    mqtt_host: str,
    mqtt_port: int,
    agent: str | None,
    passwords: dict[str, Path],
    signing_key: Path,
    tls: ServerTLS | None = None,
    token: str = "TOKEN",
) -> list[str]:
    target = agent or "a1"
    tls_args = _mosquitto_tls_args(tls)
    body = '{"target":"all","command":"ping"}'
    sign = f"{_cli()} sign --key {shlex.quote(str(signing_key))} --to {target} --id hello-1 ping"

    def login(user: str) -> str:
        # Read from its file when run: the password stays out of the terminal's scrollback.
        return f'-i {user} -u {user} -P "$(cat {shlex.quote(str(passwords[user]))})"'

    return [
        f"curl -s -X POST '{url}/api/v1/commands?wait=5' -H 'content-type: application/json'"
        f" -H 'authorization: Bearer {token}' -d '{body}'",
        f"{_cli()} send all ping --wait",
        f"{_cli()} send {target} run -- uname -a",
        f"mosquitto_pub -h {mqtt_host} -p {mqtt_port}{tls_args} {login(OPERATOR)} -q 1"
        f' -t fleet/{target}/cmd -m "$({sign})"',
        f"mosquitto_sub -h {mqtt_host} -p {mqtt_port}{tls_args} {login(WATCHER)} -v"
        " -t 'fleet/+/result'",
    ]


async def run_up(options: UpOptions, console: Console) -> None:
    """Run everything until SIGINT/SIGTERM, then stop it all cleanly."""
    t0 = time.monotonic()
    state_dir = options.state_dir
    server_tls = ServerTLS.from_flags(options.tls_cert, options.tls_key, options.tls_ca)
    tls = client_tls(server_tls)
    # The state dir holds command arguments and output, passwords and keys: this user only.
    os.umask(0o077)
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    signing_key, public_key = signing_keys(state_dir)
    http_sock = bind_tcp(options.http_host, options.http_port, what="HTTP", flag="--http-port")
    mqtt_port = options.mqtt_port
    ids = [f"demo-{i}" for i in range(1, options.agents + 1)]
    # Secure by default: every process logs in with its own generated password.
    users = [(CONTROLLER, Role.CONTROLLER), (OPERATOR, Role.OPERATOR), (WATCHER, Role.OPERATOR)]
    users += [(agent_id, Role.AGENT) for agent_id in ids]
    creds = Credentials(state_dir / "mqtt", prefix=DEFAULT_PREFIX)
    passwords = ensure_password_files(creds, users, state_dir / "secrets")
    config = with_credentials(
        load_broker_config(
            options.broker_config, host=options.mqtt_host, port=mqtt_port, tls=server_tls
        ),
        creds.directory,
        DEFAULT_PREFIX,
    )
    stop = asyncio.Event()
    stop_on_signals(stop)
    client_host = "127.0.0.1" if options.mqtt_host in ("0.0.0.0", "::", "") else options.mqtt_host
    http_port = http_sock.getsockname()[1]
    url_host = "127.0.0.1" if options.http_host in ("0.0.0.0", "::") else options.http_host
    url = f"http://{url_host}:{http_port}"
    # An admin token for the local user, valid while this runs: the one a crashed run left,
    # else a new one; revoked at a clean stop so that none piles up still valid.
    db_path = state_dir / "fleet.sqlite3"
    token = valid_or_new_token(
        db_path, read_state(state_dir).get("token"), name="fleet up", scope=Scope.ADMIN
    )
    async with contextlib.AsyncExitStack() as stack:
        stack.callback(revoke_offline, db_path, token, by="fleet up (stopped)")
        stack.callback(http_sock.close)
        await stack.enter_async_context(EmbeddedBroker(config, port_flag="--mqtt-port"))
        settings = ControllerSettings(
            broker_host=client_host,
            broker_port=mqtt_port,
            db_path=db_path,
            http_host=options.http_host,
            http_port=http_port,
            client_id=CONTROLLER,
            password_file=passwords[CONTROLLER],
            signing_key=signing_key,
            **tls,
        )
        server = http_server(create_app(settings))
        server_task = asyncio.create_task(server.serve(sockets=[http_sock]), name="fleet-up-http")

        async def stop_server() -> None:
            server.should_exit = True
            await server_task

        stack.push_async_callback(stop_server)
        for agent_id in ids:
            agent_settings = AgentSettings(
                agent_id=agent_id,
                broker_host=client_host,
                broker_port=mqtt_port,
                state_dir=state_dir / "agents" / agent_id,
                run_allow=DEMO_RUN_ALLOW,
                password_file=passwords[agent_id],
                command_public_key=public_key,
                **tls,
            )
            await stack.enter_async_context(Agent(agent_settings))
        auth = {"authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(base_url=url, timeout=60, headers=auth) as http:
            ready = await http.get("/readyz", params={"wait": 30})
            ready.raise_for_status()
            for agent_id in ids:
                r = await http.get(f"/api/v1/agents/{agent_id}", params={"wait": 30})
                r.raise_for_status()
        elapsed = time.monotonic() - t0
        state_path = write_state(
            state_dir,
            {
                "url": url,
                "mqtt_host": client_host,
                "mqtt_port": mqtt_port,
                "mqtt_username": OPERATOR,
                "mqtt_password_file": str(passwords[OPERATOR]),
                "pid": os.getpid(),
                "agents": ids,
                "token": token,
            },
        )
        stack.callback(lambda: state_path.unlink(missing_ok=True))
        _banner(
            console, url, client_host, mqtt_port, ids, elapsed, state_dir, passwords, server_tls,
            token=token, signing_key=signing_key,
        )  # fmt: skip
        await stop.wait()
        console.print("\n[bold]stopping[/]: agents, controller, broker ...")
    console.print("[green]stopped cleanly[/]")


def _banner(
    console: Console,
    url: str,
    mqtt_host: str,
    mqtt_port: int,
    ids: list[str],
    elapsed: float,
    state_dir: Path,
    passwords: dict[str, Path],
    tls: ServerTLS | None = None,
    *,
    token: str,
    signing_key: Path,
) -> None:
    console.print(f"[bold green]fleet is up[/] in {elapsed:.2f}s")
    console.print(f"  API        {url}/api/v1   (docs: {url}/docs)")
    console.print(
        f"  MQTT       {mqtt_host}:{mqtt_port}  (embedded amqtt{', TLS' if tls else ''};"
        f" logins required, client id = username; operator password in {passwords[OPERATOR]})"
    )
    console.print(f"  agents     {', '.join(ids) if ids else 'none (use --agents N)'}")
    console.print(f"  state      {state_dir} ({STATE_FILE} lets other fleet commands find this)")
    console.print(
        f"  token      {token}  (admin; `fleet` commands here use it by default)",
        highlight=False,
        soft_wrap=True,
    )
    console.print("\n[bold]try[/]:")
    target = ids[0] if ids else None
    lines = examples(url, mqtt_host, mqtt_port, target, passwords, signing_key, tls, token)
    for line in lines:
        console.print(f"  {line}", highlight=False, markup=False, soft_wrap=True)
    console.print("\nCtrl-C stops everything.")
