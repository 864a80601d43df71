"""What every `fleet` subcommand that talks to the API shares: options, the client, errors."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Annotated, Any

import typer
from rich.console import Console, RenderableType
from rich.markup import escape

from fleet_controller.client import ApiError, FleetClient
from fleet_controller.serve import read_state

console = Console()
# Errors stay on one line whatever the terminal width, so they read (and grep) as one.
errors = Console(stderr=True, soft_wrap=True)

DEFAULT_URL = "http://127.0.0.1:8000"

UrlOption = Annotated[
    str | None,
    typer.Option(
        "--url",
        envvar="FLEET_URL",
        help="Controller URL. Default: the one `fleet up` left in its state dir, else "
        + DEFAULT_URL,
        show_default=False,
    ),
]
TokenOption = Annotated[
    str | None,
    typer.Option(
        "--token",
        envvar="FLEET_TOKEN",
        help="API token (fleet_<id>_<secret>). Default: the one `fleet up` left in its state dir.",
        show_default=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the raw JSON instead.")]


def fail(message: str, code: int = 2) -> typer.Exit:
    # Messages quote user input and validation errors: brackets there are not markup.
    errors.print(f"[red]fleet:[/] {escape(message)}", highlight=False)
    return typer.Exit(code)


@contextlib.contextmanager
def api_errors() -> Iterator[None]:
    """An API error ends the command with its message and exit code 2."""
    try:
        yield
    except ApiError as exc:
        raise fail(str(exc)) from None


def print_data(data: Any, as_json: bool, view: Callable[[Any], RenderableType]) -> None:
    if as_json:
        console.print_json(data=data)
    else:
        console.print(view(data))


def make_client(url: str | None, token: str | None) -> FleetClient:
    """A client for the given URL and token, else those a running `fleet up` left behind."""
    state = read_state()
    return FleetClient(url or state.get("url") or DEFAULT_URL, token=token or state.get("token"))
