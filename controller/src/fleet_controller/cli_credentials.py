"""`fleet credentials`: MQTT users for agents, the controller and operators."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from fleet_agent.errors import ConfigError, FleetError
from fleet_controller.cli_support import console, fail
from fleet_controller.credentials import Credentials, Role
from fleet_controller.serve import default_state_dir

app = typer.Typer(
    help="MQTT users: one per agent, the controller and each operator, with topic ACLs by role.",
    no_args_is_help=True,
)

DirOption = Annotated[
    Path | None,
    typer.Option(
        "--dir",
        envvar="FLEET_CREDENTIALS_DIR",
        help="Credentials directory. Default: mqtt/ in the fleet state dir (where `fleet up`"
        " keeps its own).",
        show_default=False,
    ),
]
PrefixOption = Annotated[
    str | None,
    typer.Option(
        help="Topic prefix of the fleet. Default: the stored one, else fleet.", show_default=False
    ),
]


def default_credentials_dir() -> Path:
    return default_state_dir() / "mqtt"


def _open(directory: Path | None, prefix: str | None = None) -> Credentials:
    try:
        return Credentials(directory or default_credentials_dir(), prefix=prefix)
    except FleetError as exc:
        raise _fail(exc) from None


def _fail(exc: FleetError) -> typer.Exit:
    return fail(str(exc))


@app.command()
def add(
    name: Annotated[str, typer.Argument(help="Username; for an agent, its agent id.")],
    role: Annotated[Role, typer.Option(help="What the user may do on which topics.")],
    directory: DirOption = None,
    prefix: PrefixOption = None,
    replace: Annotated[
        bool, typer.Option(help="Give an existing user a new password (the old one stops).")
    ] = False,
    password_file: Annotated[
        Path | None,
        typer.Option(help="Also write the password to this file (mode 0600), for the agent."),
    ] = None,
) -> None:
    """Create a user with a generated password, printed once, and update the broker files."""
    creds = _open(directory, prefix)
    # Open the file first: a password that cannot be stored must not replace a working one.
    secret = _open_secret(password_file) if password_file is not None else None
    try:
        password = creds.add(name, role, replace=replace)
    except FleetError as exc:
        if secret is not None:
            secret.abandon()
        raise _fail(exc) from None
    if secret is not None:
        secret.write(password)
    console.print(f"MQTT user [bold]{name}[/] ({role}) in {creds.directory}")
    console.print(f"password: {password}", highlight=False, soft_wrap=True)
    console.print(
        "It is shown only now. The embedded broker picks the change up at the next login;"
        f" for mosquitto point password_file at {creds.mosquitto_passwords} and acl_file at"
        f" {creds.mosquitto_acl}, then reload it (systemctl reload mosquitto).",
        highlight=False,
    )
    if role is Role.OPERATOR:
        console.print(
            "On the embedded broker the client id must be the username: mosquitto_pub -i"
            f" {name} -u {name} -P ...",
            highlight=False,
        )


class _Secret:
    def __init__(self, path: Path, fd: int, created: bool) -> None:
        self.path, self.fd, self.created = path, fd, created

    def write(self, password: str) -> None:
        os.fchmod(self.fd, 0o600)  # an existing file keeps its mode otherwise
        os.ftruncate(self.fd, 0)
        with os.fdopen(self.fd, "w") as f:
            f.write(password + "\n")

    def abandon(self) -> None:
        os.close(self.fd)
        if self.created:
            self.path.unlink(missing_ok=True)


def _open_secret(path: Path) -> _Secret:
    created = not path.exists()
    try:
        # O_NOFOLLOW: a symlink planted there must not redirect the secret elsewhere.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise _fail(ConfigError(f"cannot write --password-file {path}: {exc.strerror}")) from None
    return _Secret(path, fd, created)


@app.command("list")
def list_users(directory: DirOption = None) -> None:
    """Users and their roles (passwords are stored only as hashes)."""
    creds = _open(directory)
    try:
        users = creds.users()
    except FleetError as exc:
        raise _fail(exc) from None
    table = Table("user", "role", "created", box=None)
    for user in sorted(users.values(), key=lambda u: u.name):
        table.add_row(user.name, user.role.value, user.created_at)
    console.print(table if users else f"no MQTT users in {creds.directory}")


@app.command()
def remove(
    name: Annotated[str, typer.Argument(help="Username.")],
    directory: DirOption = None,
) -> None:
    """Delete a user: its next login fails (connected clients stay until they reconnect)."""
    creds = _open(directory)
    try:
        creds.remove(name)
    except FleetError as exc:
        raise _fail(exc) from None
    console.print(f"removed MQTT user {name} from {creds.directory}")
