"""The `fleet` command: run the pieces, and drive the fleet from a terminal."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fleet_agent.cli import main as agent_main
from fleet_agent.errors import FleetError
from fleet_controller import render
from fleet_controller.cli_credentials import app as credentials_app
from fleet_controller.cli_keys import keys_app, sign
from fleet_controller.cli_support import (
    JsonOption,
    TokenOption,
    UrlOption,
    api_errors,
    console,
    errors,
    fail,
    make_client,
    print_data,
)
from fleet_controller.cli_tokens import token_app
from fleet_controller.client import ApiError, FleetClient
from fleet_controller.serve import default_state_dir

app = typer.Typer(
    name="fleet",
    help="Send commands to a fleet of MQTT agents and see what happened on each one.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(credentials_app, name="credentials")
app.add_typer(keys_app)
app.command()(sign)
app.add_typer(token_app)
OPEN_STATUSES = ("pending", "received", "running")
PASSTHROUGH = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}

TlsCertOption = Annotated[
    Path | None,
    typer.Option(
        "--tls-cert",
        help="PEM server certificate (with --tls-key): serve MQTT over TLS, by convention on"
        " port 8883.",
    ),
]
TlsKeyOption = Annotated[
    Path | None, typer.Option("--tls-key", help="PEM private key of --tls-cert (unencrypted).")
]
TlsCaOption = Annotated[
    Path | None,
    typer.Option("--tls-ca", help="PEM CA: require client certificates signed by it."),
]


def _configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("amqtt", "transitions", "uvicorn.error"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# -- running the pieces ------------------------------------------------------------------


@app.command()
def up(
    mqtt_port: Annotated[int, typer.Option(help="MQTT port of the embedded broker.")] = 1883,
    http_port: Annotated[int, typer.Option(help="HTTP port of the controller.")] = 8000,
    agents: Annotated[int, typer.Option(min=0, max=1000, help="Demo agents to start.")] = 3,
    state_dir: Annotated[
        Path | None,
        typer.Option(
            help="Database, ledgers and fleet.json. Default: $FLEET_STATE_DIR or"
            " ~/.local/state/fleet.",
            show_default=False,
        ),
    ] = None,
    mqtt_host: Annotated[str, typer.Option(help="MQTT listen address.")] = "127.0.0.1",
    http_host: Annotated[str, typer.Option(help="HTTP listen address.")] = "127.0.0.1",
    broker_config: Annotated[Path, typer.Option(help="amqtt config file.")] = Path("broker.yaml"),
    tls_cert: TlsCertOption = None,
    tls_key: TlsKeyOption = None,
    tls_ca: TlsCaOption = None,
) -> None:
    """Embedded broker + controller + N demo agents in one process. Ctrl-C stops it all."""
    from fleet_controller.up import UpOptions, run_up

    _configure_logging("WARNING")
    options = UpOptions(
        mqtt_host=mqtt_host,
        mqtt_port=mqtt_port,
        http_host=http_host,
        http_port=http_port,
        agents=agents,
        state_dir=state_dir or default_state_dir(),
        broker_config=_broker_config(broker_config),
        tls_cert=tls_cert,
        tls_key=tls_key,
        tls_ca=tls_ca,
    )
    try:
        asyncio.run(run_up(options, console))
    except FleetError as exc:
        raise fail(str(exc)) from None


def _broker_config(path: Path) -> Path | None:
    """The given file; the built-in default when the default file is not in this folder."""
    if path.exists() or path != Path("broker.yaml"):
        return path
    return None


@app.command()
def broker(
    port: Annotated[int, typer.Option(help="MQTT port.")] = 1883,
    host: Annotated[str, typer.Option(help="Listen address.")] = "0.0.0.0",
    config: Annotated[Path, typer.Option(help="amqtt config file.")] = Path("broker.yaml"),
    credentials: Annotated[
        Path | None,
        typer.Option(
            help="A `fleet credentials` directory: logins need its passwords, client id ="
            " username, topics limited by role. Without it any username is accepted.",
            show_default=False,
        ),
    ] = None,
    prefix: Annotated[str, typer.Option(help="Topic prefix the ACLs apply to.")] = "fleet",
    tls_cert: TlsCertOption = None,
    tls_key: TlsKeyOption = None,
    tls_ca: TlsCaOption = None,
) -> None:
    """The embedded amqtt broker alone (mosquitto is the production choice)."""
    from fleet_controller.broker import (
        EmbeddedBroker,
        ServerTLS,
        load_broker_config,
        with_credentials,
    )
    from fleet_controller.serve import stop_on_signals

    _configure_logging()

    async def run() -> None:
        stop = asyncio.Event()
        stop_on_signals(stop)
        tls = ServerTLS.from_flags(tls_cert, tls_key, tls_ca)
        cfg = load_broker_config(_broker_config(config), host=host, port=port, tls=tls)
        if credentials is not None:
            cfg = with_credentials(cfg, credentials, prefix)
        else:
            logging.getLogger("fleet.broker").warning(
                "no --credentials: any client that sends a username can command every agent"
            )
        async with EmbeddedBroker(cfg, port_flag="--port"):
            over = " over TLS" if tls else ""
            console.print(f"embedded MQTT broker on {host}:{port}{over}; Ctrl-C stops it")
            await stop.wait()

    try:
        asyncio.run(run())
    except FleetError as exc:
        raise fail(str(exc)) from None


@app.command(context_settings=PASSTHROUGH, add_help_option=False)
def controller(ctx: typer.Context) -> None:
    """The controller alone (HTTP API + MQTT link). `fleet controller --help` lists settings."""
    from fleet_controller.main import main as controller_main

    raise typer.Exit(controller_main(ctx.args))


@app.command(context_settings=PASSTHROUGH, add_help_option=False)
def agent(ctx: typer.Context) -> None:
    """An agent (the same as `fleet-agent`). `fleet agent --help` lists settings."""
    raise typer.Exit(agent_main(ctx.args))


# -- driving the fleet -------------------------------------------------------------------


def _parse_args(command: str, args: list[str], extra: list[str]) -> dict[str, Any]:
    """`run` takes argv words; other commands take key=value pairs (values parsed as JSON
    when they parse, else kept as strings). --arg key=value works for both."""
    parsed: dict[str, Any] = {}
    pairs = list(extra)
    if command == "run":
        if args:
            parsed["argv"] = list(args)
    else:
        pairs += args
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise fail(f"argument {pair!r} is not key=value")
        try:
            parsed[key] = json.loads(value)
        except ValueError:
            parsed[key] = value
    return parsed


@app.command(context_settings={"ignore_unknown_options": False})
def send(
    target: Annotated[str, typer.Argument(help="An agent id, a comma-separated list, or all.")],
    command: Annotated[str, typer.Argument(help="ping, info, run, sleep, ...")],
    args: Annotated[
        list[str] | None,
        typer.Argument(help="run: the program and its arguments (after --); others: key=value."),
    ] = None,
    arg: Annotated[
        list[str] | None, typer.Option("--arg", help="An extra key=value argument.")
    ] = None,
    wait: Annotated[bool, typer.Option(help="Show progress and wait for the results.")] = False,
    max_wait: Annotated[
        float, typer.Option(min=0.1, help="With --wait: give up after this many seconds.")
    ] = 60.0,
    timeout: Annotated[
        float | None, typer.Option(help="Execution limit on the agent, seconds.")
    ] = None,
    ttl: Annotated[float | None, typer.Option(help="Seconds agents have to pick it up.")] = None,
    allow_unknown: Annotated[bool, typer.Option(help="Allow agent ids never seen.")] = False,
    url: UrlOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Send a command. With --wait: live progress, a results table, and exit code 1 when
    any agent failed or did not answer."""
    targets: str | list[str] = (
        target if target == "all" or "," not in target else [t for t in target.split(",") if t]
    )
    body: dict[str, Any] = {
        "target": targets,
        "command": command,
        "args": _parse_args(command, args or [], arg or []),
        "allow_unknown": allow_unknown,
    }
    if timeout is not None:
        body["timeout"] = timeout
    if ttl is not None:
        body["ttl"] = ttl
    client = make_client(url, token)
    with api_errors():
        detail = client.send(body)
        if wait:
            detail = _follow(client, detail, max_wait, quiet=as_json)
    if as_json:
        console.print_json(data=detail)
    elif wait:
        console.print(render.results_table(detail))
    else:
        console.print(
            f"sent {detail['command']} [bold]{detail['id']}[/] to {detail['expected']} agent(s):"
            f" {', '.join(detail['agents']) or '-'}",
            highlight=False,
        )
    if wait and not (detail["complete"] and detail["status"] in ("succeeded", "no_targets")):
        if not detail["complete"]:
            errors.print(f"not every agent answered within {max_wait:g}s", highlight=False)
        raise typer.Exit(1)


def _follow(
    client: FleetClient, detail: dict[str, Any], max_wait: float, *, quiet: bool
) -> dict[str, Any]:
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("answered"),
        TimeElapsedColumn(),
        console=errors,
        disable=quiet,
        transient=True,
    )
    with progress:
        task = progress.add_task(
            f"{detail['command']} {detail['id'][:8]}", total=detail["expected"]
        )

        def update(d: dict[str, Any]) -> None:
            done = sum(
                n for s, n in d["counts"].items() if s not in ("pending", "received", "running")
            )
            progress.update(task, completed=done, total=d["expected"])

        return client.follow(detail["id"], seconds=max_wait, on_change=update)


@app.command()
def cancel(
    command_id: Annotated[str, typer.Argument(help="The command's id.")],
    wait: Annotated[bool, typer.Option(help="Wait until every agent has answered.")] = False,
    max_wait: Annotated[
        float, typer.Option(min=0.1, help="With --wait: at most this long.")
    ] = 30.0,
    url: UrlOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Cancel a command: queued copies are skipped, running ones killed."""
    client = make_client(url, token)
    with api_errors():
        detail = client.cancel(command_id)
        if wait:
            detail = _follow(client, detail, max_wait, quiet=as_json)
    print_data(detail, as_json, render.results_table)


@app.command()
def agents(url: UrlOption = None, token: TokenOption = None, as_json: JsonOption = False) -> None:
    """Every known agent: online or not, last seen, uptime, version, latency."""
    with api_errors():
        data = make_client(url, token).agents()
    print_data(data, as_json, render.agents_table)


@app.command()
def commands(
    agent: Annotated[str | None, typer.Option(help="Only commands sent to this agent.")] = None,
    status: Annotated[str | None, typer.Option(help="Only where some agent has it.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=500)] = 20,
    url: UrlOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Recent commands, newest first."""
    with api_errors():
        page = make_client(url, token).commands(agent=agent, status=status, limit=limit)
    print_data(page, as_json, lambda p: render.commands_table(p["items"]))


@app.command()
def show(
    command_id: Annotated[str, typer.Argument(help="The command's id.")],
    url: UrlOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """One command with every agent's result."""
    with api_errors():
        detail = make_client(url, token).command(command_id)
    print_data(detail, as_json, render.command_detail)


@app.command()
def watch(
    url: UrlOption = None,
    token: TokenOption = None,
    limit: Annotated[int, typer.Option(min=1, max=100, help="Recent commands shown.")] = 10,
) -> None:
    """A live view of agents and recent commands, redrawn as events arrive. Ctrl-C quits."""
    client = make_client(url, token)
    changed = threading.Event()
    failure: list[str] = []

    def listen() -> None:
        try:
            for _ in client.events():
                changed.set()
        except ApiError as exc:
            failure.append(str(exc))
            changed.set()

    def view() -> Any:
        from rich.console import Group

        return Group(
            render.agents_table(client.agents()),
            render.commands_table(client.commands(limit=limit)["items"], title="recent commands"),
        )

    with api_errors():
        first = view()
    threading.Thread(target=listen, name="fleet-watch-events", daemon=True).start()
    try:
        with Live(first, console=console, auto_refresh=False, screen=False) as live:
            while not failure:
                # Redraw on events, and every second so that ages and uptimes move.
                changed.wait(timeout=1.0)
                changed.clear()
                live.update(view(), refresh=True)
                time.sleep(0.05)  # coalesce bursts of events into one redraw
    except KeyboardInterrupt:
        return
    except ApiError as exc:
        raise fail(str(exc)) from None
    raise fail(failure[0])


def main() -> None:
    if os.environ.get("FLEET_DEBUG"):
        app(prog_name="fleet")
        return
    try:
        app(prog_name="fleet")
    except KeyboardInterrupt:
        sys.exit(130)
