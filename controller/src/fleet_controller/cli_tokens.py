"""`fleet token`: issue, list and revoke API tokens, through the API or straight in the
controller's database (the bootstrap, before any admin token exists)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fleet_agent.errors import FleetError
from fleet_controller import cli_support as support
from fleet_controller import render
from fleet_controller.models import Scope, TokenCreated
from fleet_controller.tokens import create_token_offline, default_creator

token_app = typer.Typer(
    name="token",
    help="API tokens: every /api/v1 request needs one (scopes: read < operate < admin).",
    no_args_is_help=True,
)


@token_app.command("create")
def create(
    scope: Annotated[
        Scope,
        typer.Option(
            help="read: look only; operate: also send and cancel; admin: also tokens and agents."
        ),
    ] = Scope.READ,
    name: Annotated[
        str | None,
        typer.Option(help="Who or what uses it. Default: the local user.", show_default=False),
    ] = None,
    db: Annotated[
        Path | None,
        typer.Option(
            "--db",
            help="Write the token straight into this controller database file instead of"
            " asking the API: how the first admin token is made. Whoever can write that file"
            " controls the controller anyway.",
            show_default=False,
        ),
    ] = None,
    url: support.UrlOption = None,
    token: support.TokenOption = None,
    as_json: support.JsonOption = False,
) -> None:
    """Issue a token and print it. It is shown only this once: store it now."""
    label = name or default_creator()
    if db is not None:
        try:
            created = create_token_offline(db, name=label, scope=scope)
        except (FleetError, OSError) as exc:
            raise support.fail(f"cannot write the token to {db}: {exc}") from None
    else:
        with support.api_errors():
            data = support.make_client(url, token).create_token(label, scope.value)
        created = TokenCreated.model_validate(data)
    if as_json:
        support.console.print_json(created.model_dump_json())
        return
    # The token alone on stdout, so that `export FLEET_TOKEN=$(fleet token create ...)` works.
    support.console.print(created.token, highlight=False, soft_wrap=True)
    support.errors.print(
        f"token {created.id} ({created.name}, scope {created.scope.value}); shown only once."
        f" Use it with --token or `export FLEET_TOKEN={created.token}`, or over HTTP as"
        f" `Authorization: Bearer {created.token}`",
        highlight=False,
        soft_wrap=True,
    )


@token_app.command("list")
def list_tokens(
    url: support.UrlOption = None,
    token: support.TokenOption = None,
    as_json: support.JsonOption = False,
) -> None:
    """Every token (never their secrets), revoked ones too. Needs an admin token."""
    with support.api_errors():
        data = support.make_client(url, token).tokens()
    support.print_data(data, as_json, render.tokens_table)


@token_app.command("revoke")
def revoke(
    token_id: Annotated[
        str, typer.Argument(metavar="ID", help="The token's id (`fleet token list`).")
    ],
    url: support.UrlOption = None,
    token: support.TokenOption = None,
) -> None:
    """Revoke a token: requests with it are refused from now on. Needs an admin token."""
    with support.api_errors():
        support.make_client(url, token).revoke_token(token_id)
    support.console.print(f"revoked token {token_id}", highlight=False)
