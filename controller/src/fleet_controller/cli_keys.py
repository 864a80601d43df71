"""`fleet keys generate` and `fleet sign`: the key pair for signed commands, and signed
payloads for operators who publish commands themselves (e.g. with mosquitto_pub)."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError

from fleet_agent.errors import FleetError, InvalidAgentId, PayloadError
from fleet_agent.protocol import (
    BROADCAST,
    DEFAULT_PREFIX,
    Command,
    Topics,
    check_sendable,
    describe_validation_error,
    new_command_id,
    utcnow,
)
from fleet_agent.signing import Signer, generate_key_pair
from fleet_controller.cli_support import fail

keys_app = typer.Typer(name="keys", help="Keys for signed commands.", no_args_is_help=True)


@keys_app.command()
def generate(
    directory: Annotated[Path, typer.Option("--dir", help="Where to write the key pair.")] = Path(),
) -> None:
    """Write a new Ed25519 key pair for signed commands; never overwrites."""
    try:
        private, public = generate_key_pair(directory)
    except FleetError as exc:
        raise fail(str(exc)) from None
    typer.echo(f"private key: {private}  (mode 0600: the controller and operators only)")
    typer.echo(f"public key:  {public}  (copy to every agent)")
    typer.echo("configure:")
    typer.echo(f"  controller  --signing-key {private}   (FLEET_CONTROLLER_SIGNING_KEY)")
    typer.echo(f"  agents      --command-public-key {public}   (FLEET_AGENT_COMMAND_PUBLIC_KEY)")
    typer.echo(f"  by hand     fleet sign --key {private} --to AGENT COMMAND")


def sign(
    command: Annotated[str, typer.Argument(help="The command name: ping, run, sleep, ...")],
    key: Annotated[
        Path,
        typer.Option(
            "--key", envvar="FLEET_SIGNING_KEY", help="The private key (PEM).", show_default=False
        ),
    ],
    to: Annotated[
        str,
        typer.Option("--to", help="The agent id, or `all` for a broadcast.", show_default=False),
    ],
    args: Annotated[
        str, typer.Option("--args", help="Arguments as a JSON object, e.g. '{\"seconds\": 5}'.")
    ] = "{}",
    ttl: Annotated[float, typer.Option(min=1, help="Seconds until the command expires.")] = 300.0,
    command_id: Annotated[
        str | None, typer.Option("--id", help="Command id. Default: a fresh one.")
    ] = None,
    timeout: Annotated[
        float | None, typer.Option(help="Execution limit on the agent, seconds.")
    ] = None,
    prefix: Annotated[str, typer.Option(help="Topic prefix of the fleet.")] = DEFAULT_PREFIX,
) -> None:
    """Print one signed command payload, for `mosquitto_pub -t <prefix>/<agent>/cmd -m`.
    The signature covers the topic: --to a1 is for fleet/a1/cmd, --to all for fleet/all/cmd."""
    try:
        parsed = json.loads(args)
    except ValueError as exc:
        raise fail(f"--args is not JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise fail(f"--args must be a JSON object, not {type(parsed).__name__}")
    try:
        check_sendable(parsed)
    except PayloadError as exc:
        raise fail(f"--args: {exc}") from None
    try:
        topics = Topics(prefix)
        topic = topics.broadcast_cmd if to == BROADCAST else topics.cmd(to)
    except InvalidAgentId as exc:
        raise fail(f"--to: {exc}") from None
    except ValueError as exc:
        raise fail(f"--prefix: {exc}") from None
    try:
        wire = Command(
            command=command,
            id=command_id or new_command_id(),
            args=parsed,
            timeout=timeout,
            expires_at=utcnow() + timedelta(seconds=ttl),
        )
    except ValidationError as exc:
        raise fail(f"invalid command: {describe_validation_error(exc)}") from None
    try:
        payload = Signer.from_file(key).encode(topic, wire)
    except FleetError as exc:
        raise fail(str(exc)) from None
    typer.echo(payload.decode())
