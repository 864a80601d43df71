"""API tokens: every /api/v1 route needs one, scopes are enforced (read < operate < admin),
tokens are issued, listed and revoked through the API and the CLI, and every command records
who sent and who canceled it."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_cli import fleet

from fleet_agent.errors import ConfigError
from fleet_agent.protocol import TopicKind
from fleet_agent.settings import load_settings
from fleet_controller.app import create_app
from fleet_controller.models import Scope
from fleet_controller.settings import ControllerSettings
from fleet_controller.tokens import create_token_offline

from controller_testing import Controller, controller_settings, run_controller
from fleet_testing import AgentRunner, BrokerEndpoint, Probe, bearer

AGENT = "a1"
PREFIX = "FLEET_CONTROLLER_"


@pytest.fixture
async def controller(amqtt_broker: BrokerEndpoint, tmp_path: Path) -> AsyncIterator[Controller]:
    """A controller (with an admin token) on the embedded broker, agent a1 online."""
    settings = controller_settings(amqtt_broker, tmp_path / "f.sqlite3")
    async with run_controller(settings) as c, AgentRunner(amqtt_broker, tmp_path).run(AGENT):
        await c.wait_agent(AGENT)
        yield c


async def issue(controller: Controller, scope: Scope, name: str | None = None) -> dict[str, Any]:
    """A new token, created through the API with the controller's admin token."""
    r = await controller.http.post(
        "/api/v1/tokens", json={"name": name or f"{scope.value} user", "scope": scope.value}
    )
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


async def as_token(
    controller: Controller, token: str | None, method: str, path: str, **kwargs: Any
) -> httpx.Response:
    """A request with ``token`` (None: without any Authorization header)."""
    async with httpx.AsyncClient(base_url=controller.url, headers=bearer(token)) as http:
        return await http.request(method, path, **kwargs)


def assert_refused(r: httpx.Response, status: int) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"] == ("unauthorized" if status == 401 else "forbidden"), body
    assert body["message"], body
    if status == 401:
        assert r.headers["www-authenticate"] == "Bearer"


def protected_routes(settings: Any) -> list[tuple[str, str]]:
    """(method, path) of every /api/v1 operation the app serves, path parameters filled in."""
    routes = []
    for template, operations in create_app(settings).openapi()["paths"].items():
        if template.startswith("/api/v1"):
            path = template.replace("{agent_id}", AGENT).replace("{command_id}", "c1")
            path = path.replace("{token_id}", "0123456789abcdef")
            assert "{" not in path, f"fill in the parameters of {template}"
            routes.extend((method.upper(), path) for method in operations)
    return routes


class TestAuthentication:
    async def test_every_api_route_refuses_requests_without_a_token(
        self, controller: Controller
    ) -> None:
        """Every /api/v1 route (taken from the app) and unknown path answers 401 without a token."""
        routes = protected_routes(controller.settings)
        assert ("POST", "/api/v1/tokens") in routes and len(routes) >= 10, routes
        garbage = {"content": b"{not json", "headers": {"content-type": "application/json"}}
        for method, path in [*routes, ("GET", "/api/v1/no-such-route")]:
            assert_refused(await as_token(controller, None, method, path), 401)
            assert_refused(await as_token(controller, None, method, path, **garbage), 401)

    async def test_openapi_declares_the_bearer_scheme_on_every_api_route(
        self, controller: Controller
    ) -> None:
        """/openapi.json declares the bearer scheme and every /api/v1 operation uses it."""
        spec = (await as_token(controller, None, "GET", "/openapi.json")).json()
        scheme = spec["components"]["securitySchemes"]["APIToken"]
        assert scheme == {**scheme, "type": "http", "scheme": "bearer"}, scheme
        for path, operations in spec["paths"].items():
            for method, operation in operations.items():
                secured = {"APIToken": []} in operation.get("security", [])
                assert secured == path.startswith("/api/v1"), (method, path)

    async def test_health_docs_and_schema_stay_open(self, controller: Controller) -> None:
        """/healthz, /readyz, /docs and /openapi.json answer 200 without a token."""
        for path in ("/healthz", "/readyz", "/docs", "/openapi.json"):
            assert (await as_token(controller, None, "GET", path)).status_code == 200, path

    @pytest.mark.parametrize(
        "header",
        [
            "Basic YWRtaW46YWRtaW4=",
            "Bearer",
            "Bearer not-a-fleet-token",
            "Bearer fleet_0123456789abcdef_wrongsecret",
            "Bearer fleet__secret",
            "Bearer fleet_ä_secret".encode(),
        ],
    )
    async def test_malformed_and_unknown_tokens_are_refused(
        self, controller: Controller, header: str | bytes
    ) -> None:
        """A malformed Authorization header or an unknown token gets 401."""
        async with httpx.AsyncClient(base_url=controller.url) as http:
            r = await http.get("/api/v1/agents", headers={"authorization": header})
        assert_refused(r, 401)

    async def test_wrong_secret_for_a_real_token_id_is_refused(
        self, controller: Controller
    ) -> None:
        """A real token id with another secret gets 401."""
        token_id = (await issue(controller, Scope.ADMIN))["id"]
        forged = f"fleet_{token_id}_" + "A" * 43
        assert_refused(await as_token(controller, forged, "GET", "/api/v1/agents"), 401)

    async def test_revoked_token_is_refused(self, controller: Controller) -> None:
        """A token works until it is revoked, then gets 401."""
        created = await issue(controller, Scope.READ)
        assert (await as_token(controller, created["token"], "GET", "/api/v1/agents")).is_success
        r = await controller.http.delete(f"/api/v1/tokens/{created['id']}")
        assert r.status_code == 204, r.text
        assert_refused(await as_token(controller, created["token"], "GET", "/api/v1/agents"), 401)

    async def test_revoking_a_token_ends_its_open_event_stream(
        self, controller: Controller
    ) -> None:
        """An /events stream opened with a token ends with `revoked` once the token is."""
        created = await issue(controller, Scope.READ)
        headers = bearer(created["token"])
        async with (
            httpx.AsyncClient(base_url=controller.url, headers=headers) as http,
            http.stream("GET", "/api/v1/events") as stream,
        ):
            events = stream.aiter_lines()
            assert await anext(events) == "event: ready"
            r = await controller.http.delete(f"/api/v1/tokens/{created['id']}")
            assert r.status_code == 204, r.text
            await controller.send(target=AGENT, command="ping")  # any change wakes the stream
            seen = [line async for line in events if line.startswith("event:")]
        assert seen[-1] == "event: revoked", seen


class TestScopes:
    async def test_read_token_cannot_dispatch_and_nothing_reaches_the_agent(
        self, controller: Controller, amqtt_broker: BrokerEndpoint
    ) -> None:
        """A read token gets 403 naming `operate` on dispatch; no command is published."""
        read = (await issue(controller, Scope.READ))["token"]
        body = {"target": AGENT, "command": "ping"}
        async with Probe(amqtt_broker, kinds=(TopicKind.CMD,)) as probe:
            r = await as_token(controller, read, "POST", "/api/v1/commands", json=body)
            assert_refused(r, 403)
            assert "operate" in r.json()["message"]
            # The controller publishes in order: once this one arrives, the refused one
            # would have arrived before it.
            sent = (await controller.send(**body)).json()["id"]
            await probe.wait_for(lambda s: sent.encode() in s.payload, what="the admin's ping")
            commands = [s for s in probe.seen if s.kind is TopicKind.CMD]
        assert len(commands) == 1, commands
        listed = (await as_token(controller, read, "GET", "/api/v1/commands")).json()
        assert [c["id"] for c in listed["items"]] == [sent]

    async def test_read_token_reads_everything(self, controller: Controller) -> None:
        """A read token gets 200 on the GET routes."""
        read = (await issue(controller, Scope.READ))["token"]
        for path in ("/api/v1/agents", f"/api/v1/agents/{AGENT}", "/api/v1/commands"):
            assert (await as_token(controller, read, "GET", path)).status_code == 200, path

    async def test_operate_token_dispatches_and_cancels_but_is_no_admin(
        self, controller: Controller
    ) -> None:
        """An operate token sends and cancels; tokens and DELETE agent need admin (403)."""
        operate = (await issue(controller, Scope.OPERATE))["token"]
        body = {"target": AGENT, "command": "sleep", "args": {"seconds": 30}}
        r = await as_token(controller, operate, "POST", "/api/v1/commands", json=body)
        assert r.status_code == 202, r.text
        cancel = f"/api/v1/commands/{r.json()['id']}/cancel"
        canceled = await as_token(controller, operate, "POST", cancel, params={"wait": 10})
        assert canceled.status_code == 200 and canceled.json()["status"] == "canceled"
        for method, path, kwargs in [
            ("POST", "/api/v1/tokens", {"json": {"name": "mine", "scope": "admin"}}),
            ("GET", "/api/v1/tokens", {}),
            ("DELETE", f"/api/v1/agents/{AGENT}", {}),
        ]:
            refused = await as_token(controller, operate, method, path, **kwargs)
            assert_refused(refused, 403)
            assert "admin" in refused.json()["message"], (method, path)


class TestTokenManagement:
    async def test_admin_creates_lists_and_revokes_tokens(self, controller: Controller) -> None:
        """POST shows the secret once, GET lists tokens without secrets, DELETE revokes."""
        created = await issue(controller, Scope.OPERATE, name="deploy pipeline")
        token_id, secret = created["id"], created["token"]
        assert secret.startswith(f"fleet_{token_id}_") and len(secret) >= 6 + 16 + 1 + 43
        assert created["scopes"] == ["read", "operate"]
        listed = await controller.http.get("/api/v1/tokens")
        assert secret.split("_", 2)[2] not in listed.text and "token" not in listed.json()[0]
        mine = next(t for t in listed.json() if t["id"] == token_id)
        assert (mine["name"], mine["scope"], mine["revoked_at"]) == (
            "deploy pipeline",
            "operate",
            None,
        )
        assert "test admin" in mine["created_by"]
        assert (await controller.http.delete(f"/api/v1/tokens/{token_id}")).status_code == 204
        mine = next(
            t for t in (await controller.http.get("/api/v1/tokens")).json() if t["id"] == token_id
        )
        assert mine["revoked_at"] is not None
        missing = await controller.http.delete("/api/v1/tokens/0123456789abcdef")
        assert missing.status_code == 404 and missing.json()["error"] == "not_found"

    async def test_bad_token_requests_are_clear_errors(self, controller: Controller) -> None:
        """An unknown scope, an empty or control-character name get 422 naming the field."""
        for body, field in [
            ({"name": "x", "scope": "root"}, "scope"),
            ({"name": "", "scope": "read"}, "name"),
            ({"name": "a\nb", "scope": "read"}, "name"),
            ({"scope": "read"}, "name"),
        ]:
            r = await controller.http.post("/api/v1/tokens", json=body)
            assert r.status_code == 422, r.text
            assert [d["field"] for d in r.json()["details"]] == [field], r.text

    async def test_secret_is_stored_only_as_a_digest(self, tmp_path: Path) -> None:
        """The database holds the token's SHA-256 digest, never the secret."""
        db_path = tmp_path / "f.sqlite3"
        created = create_token_offline(db_path, name="t", scope=Scope.READ)
        secret = created.token.split("_", 2)[2]
        with sqlite3.connect(db_path) as db:
            rows = db.execute("SELECT * FROM tokens").fetchall()
        assert len(rows) == 1 and not any(secret in str(v) for v in rows[0]), rows


class TestAudit:
    async def test_command_detail_names_who_sent_and_who_canceled(
        self, controller: Controller, caplog: pytest.LogCaptureFixture
    ) -> None:
        """sent_by and canceled_by name the tokens and the client address; each is logged."""
        caplog.set_level(logging.INFO, logger="fleet_controller.audit")
        operate = await issue(controller, Scope.OPERATE, name="ci pipeline")
        body = {"target": AGENT, "command": "sleep", "args": {"seconds": 30}}
        r = await as_token(controller, operate["token"], "POST", "/api/v1/commands", json=body)
        command_id = r.json()["id"]
        await controller.http.post(f"/api/v1/commands/{command_id}/cancel")
        detail = await controller.command(command_id)
        sent, canceled = detail["sent_by"], detail["canceled_by"]
        assert (sent["kind"], sent["token_id"], sent["token_name"]) == (
            "token",
            operate["id"],
            "ci pipeline",
        )
        assert sent["address"] == "127.0.0.1" and sent["at"]
        assert (canceled["kind"], canceled["token_name"]) == ("token", "test admin")
        audit = [r.getMessage() for r in caplog.records if r.name == "fleet_controller.audit"]
        assert any(command_id in m and "ci pipeline" in m and "sent" in m for m in audit), audit
        assert any(command_id in m and "canceled" in m and "test admin" in m for m in audit)
        assert any("created" in m and "ci pipeline" in m for m in audit), audit

    async def test_cancel_of_a_finished_command_records_no_canceler(
        self, controller: Controller
    ) -> None:
        """Canceling a command every agent already finished leaves canceled_by null."""
        sent = (await controller.send(target=AGENT, command="ping", wait=10)).json()
        assert sent["complete"], sent
        r = await controller.http.post(f"/api/v1/commands/{sent['id']}/cancel")
        assert r.status_code == 200 and r.json()["canceled_by"] is None, r.text

    async def test_command_published_over_mqtt_is_recorded_without_a_token(
        self, controller: Controller, amqtt_broker: BrokerEndpoint
    ) -> None:
        """A command published straight to the broker shows sent_by kind mqtt, no token."""
        async with Probe(amqtt_broker) as probe:
            command_id = await probe.send(AGENT, "ping")
        detail = await controller.command(command_id, wait=10)
        assert detail["source"] == "mqtt"
        assert detail["sent_by"] == {"kind": "mqtt", "token_id": None, "token_name": None,
                                     "address": None, "at": None}  # fmt: skip


@pytest.mark.parametrize(("environ", "auth"), [({}, "tokens"), ({PREFIX + "AUTH": "none"}, "none")])
def test_auth_setting_defaults_to_tokens_and_reads_the_environment(
    environ: dict[str, str], auth: str
) -> None:
    """auth is `tokens` unless FLEET_CONTROLLER_AUTH (or --auth) says `none`."""
    settings = load_settings(
        ControllerSettings, flags={}, environ=environ, env_prefix=PREFIX, config_file=None
    )
    assert settings.auth == auth


def test_unknown_auth_setting_is_a_config_error() -> None:
    """FLEET_CONTROLLER_AUTH=off is refused with an error naming the setting."""
    with pytest.raises(ConfigError, match="auth"):
        load_settings(
            ControllerSettings,
            flags={},
            environ={PREFIX + "AUTH": "off"},
            env_prefix=PREFIX,
            config_file=None,
        )


async def test_auth_none_needs_no_token_and_warns(
    amqtt_broker: BrokerEndpoint, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """auth = none: no token needed, a loud warning, the caller audited as unauthenticated."""
    caplog.set_level(logging.WARNING)
    settings = controller_settings(amqtt_broker, tmp_path / "f.sqlite3", auth="none")
    async with (
        run_controller(settings, token=False) as c,
        AgentRunner(amqtt_broker, tmp_path).run(AGENT),
    ):
        await c.wait_agent(AGENT)
        r = await c.send(target=AGENT, command="ping", wait=10)
        assert r.status_code == 202, r.text
        assert r.json()["sent_by"]["kind"] == "unauthenticated"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("AUTHENTICATION IS OFF" in m and "every agent" in m for m in warnings), warnings


class TestCli:
    async def test_offline_create_then_online_create_list_revoke(
        self, amqtt_broker: BrokerEndpoint, tmp_path: Path
    ) -> None:
        """An admin token made with `--db` creates, lists and revokes others through the API."""
        db_path = tmp_path / "f.sqlite3"
        boot = await fleet("token", "create", "--scope", "admin", "--db", str(db_path))
        assert boot.code == 0, boot.err
        admin = boot.out.strip()
        assert admin.startswith("fleet_") and "shown only once" in boot.err
        settings = controller_settings(amqtt_broker, db_path)
        async with run_controller(settings, token=False) as c:
            env = {"FLEET_URL": c.url, "FLEET_TOKEN": admin, "FLEET_STATE_DIR": str(tmp_path)}
            made = await fleet("token", "create", "--scope", "read", "--name", "dash", env=env)
            assert made.code == 0, made.err
            read = made.out.strip()
            assert (await as_token(c, read, "GET", "/api/v1/agents")).status_code == 200
            listed = await fleet("token", "list", "--json", env=env)
            assert listed.code == 0, listed.err
            assert read.split("_", 2)[2] not in listed.out and "dash" in listed.out
            token_id = read.split("_")[1]
            revoked = await fleet("token", "revoke", token_id, env=env)
            assert revoked.code == 0 and token_id in revoked.out, revoked.err
            assert_refused(await as_token(c, read, "GET", "/api/v1/agents"), 401)

    async def test_missing_refused_and_underscoped_tokens_are_one_line_errors(
        self, controller: Controller, tmp_path: Path
    ) -> None:
        """No token, a refused token or too small a scope: exit 2 and one line saying why."""
        env = {"FLEET_URL": controller.url, "FLEET_STATE_DIR": str(tmp_path)}
        read = (await issue(controller, Scope.READ))["token"]
        cases = [
            (("agents",), {}, "no API token: pass --token or set FLEET_TOKEN"),
            (("agents", "--token", "fleet_0_x"), {}, "API token was refused"),
            (("send", AGENT, "ping"), {"FLEET_TOKEN": read}, "lacks scope operate"),
            (("token", "list"), {"FLEET_TOKEN": read}, "lacks scope admin"),
        ]
        for args, extra, message in cases:
            r = await fleet(*args, env={**env, **extra})
            lines = [line for line in r.err.splitlines() if line.strip()]
            assert r.code == 2 and len(lines) == 1 and message in lines[0], (args, r.err)

    async def test_show_names_the_sender(self, controller: Controller) -> None:
        """`fleet show` prints who sent the command."""
        assert controller.token is not None
        sent = (await controller.send(target=AGENT, command="ping", wait=10)).json()
        env = {"FLEET_URL": controller.url, "FLEET_TOKEN": controller.token}
        shown = await fleet("show", sent["id"], env=env)
        assert shown.code == 0, shown.err
        assert "sent by" in shown.out and "test admin" in shown.out
