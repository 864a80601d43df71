"""HTTP never answers 5xx to bad input: requests generated from the live OpenAPI schema
(schemathesis, positive and negative), and hand-written odd bodies and requests.

Every 4xx has the one error shape ``{"error": str, "message": str, ...}``. All tests share
one controller on the embedded broker (the broker is up, so a 503 would be a failure too),
in the module's event loop; the generated requests are sent from a worker thread, since
schemathesis and Hypothesis are synchronous while the controller serves in this loop.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import pytest_asyncio
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import Case, GenerationMode

from controller_testing import Controller, controller_settings, run_controller
from fleet_testing import bearer, run_amqtt

pytestmark = pytest.mark.asyncio(loop_scope="module")

MAX_WAIT = 0.05
"""The controller's max_wait, which caps every ?wait: a generated ?wait=300 answers at once."""
REQUEST_TIMEOUT = 10.0
STREAMING = "/api/v1/events"
"""Never answers by design (server-sent events); everything else is fuzzed, new routes too."""


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def controller(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Controller]:
    """One controller on the embedded broker for the whole module; no agents."""
    db = tmp_path_factory.mktemp("http") / "controller.sqlite3"
    async with (
        run_amqtt() as endpoint,
        run_controller(controller_settings(endpoint, db, max_wait=MAX_WAIT)) as c,
    ):
        yield c


def error_shape_problem(status: int, text: str) -> str | None:
    """Why a response breaks the rules (a 5xx, or a 4xx not in the error shape), or None."""
    if status >= 500:
        return f"server error {status}: {text[:300]}"
    if status < 400:
        return None
    try:
        body = json.loads(text)
    except ValueError:
        return f"{status} with a body that is not JSON: {text[:300]!r}"
    if not (
        isinstance(body, dict)
        and isinstance(body.get("error"), str)
        and body["error"]
        and isinstance(body.get("message"), str)
    ):
        return f"{status} not in the error shape: {text[:300]}"
    return None


def assert_error_shape(r: httpx.Response) -> None:
    assert 400 <= r.status_code < 500, f"{r.status_code}: {r.text[:500]}"
    problem = error_shape_problem(r.status_code, r.text)
    assert problem is None, problem


# -- generated from the schema -----------------------------------------------------------------


VALID_COMMANDS = st.sampled_from([None, "ping", "info", "run", "sleep", "reboot.v2"])
"""The schema does not carry the command name pattern, so a generated body names a valid
command only by luck: most bodies get a valid one, to reach dispatch."""


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
async def test_schema_generated_requests_never_fail_on_the_server(
    controller: Controller, mode: GenerationMode
) -> None:
    """Requests generated from /openapi.json for every route get no 5xx; 4xx have the shape."""
    spec = (await controller.http.get("/openapi.json")).json()
    schema = schemathesis.openapi.from_dict(spec).exclude(path=STREAMING)
    seen: Counter[str] = Counter()

    @settings(
        max_examples=150,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
    )
    @given(schema.as_strategy(generation_mode=mode), VALID_COMMANDS)
    def check(case: Case[Any], command: str | None) -> None:
        if command is not None and isinstance(case.body, dict) and "command" in case.body:
            case.body["command"] = command
        with requests.Session() as session:
            r = case.call(
                base_url=controller.url,
                session=session,
                timeout=REQUEST_TIMEOUT,
                headers=bearer(controller.token),
            )
        seen[f"{case.method} {case.path} {r.status_code}"] += 1
        problem = error_shape_problem(r.status_code, r.text)
        assert problem is None, f"{case.method} {case.formatted_path} {case.query}: {problem}"

    await asyncio.to_thread(check)
    # The generator reached past validation: something was accepted, something refused.
    assert any(k.endswith((" 200", " 202")) for k in seen), seen
    assert any(re.search(r" 4\d\d$", k) for k in seen), seen
    assert (await controller.http.get("/readyz")).status_code == 200


@pytest.mark.parametrize("path", ["/api/v1/commands/nope", "/api/v1/agents/nobody"])
async def test_long_polls_are_capped_by_max_wait(controller: Controller, path: str) -> None:
    """A ?wait above the controller's max_wait answers once max_wait has passed."""
    started = time.monotonic()
    r = await controller.http.get(path, params={"wait": 1})
    assert r.status_code == 404, r.text
    assert time.monotonic() - started < 0.5, "?wait=1 was not capped at max_wait"


# -- hand-written odd bodies -------------------------------------------------------------------

JSON = "application/json"
CMD = {"target": "g1", "command": "ping", "allow_unknown": True}
SURROGATE = "\\ud800"
"""A JSON escape for an unpaired UTF-16 surrogate: valid JSON, but not encodable as UTF-8."""


def cmd_with(**fields: Any) -> bytes:
    return json.dumps({**CMD, **fields}).encode()


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def raw_cmd(args: str) -> bytes:
    return f'{{"target": "g1", "command": "ping", "allow_unknown": true, "args": {args}}}'.encode()


def raw_field(field: str) -> bytes:
    """A command body with one more field, written as raw JSON text (NaN and such)."""
    return ('{"target": "g1", "command": "ping", ' + field + "}").encode()


MULTIPART = b'--x\r\nContent-Disposition: form-data; name="target"\r\n\r\ng1\r\n--x--\r\n'
LATIN_1 = cmd_with(target="é").decode().encode("latin-1")


ODD_BODIES = [
    # huge strings
    pytest.param(cmd_with(target="a" * 100_000), JSON, id="huge-target"),
    pytest.param(cmd_with(command="p" * 1_000_000), JSON, id="huge-command-name"),
    pytest.param(cmd_with(args={"s": "x" * 100_000}), JSON, id="huge-arg"),
    pytest.param(cmd_with(args={"k" * 100_000: 1}), JSON, id="huge-arg-name"),
    pytest.param(cmd_with(target=["a1"] * 10_001), JSON, id="too-many-targets"),
    # deep nesting
    pytest.param(raw_cmd(f'{{"a": {nested(200)}}}'), JSON, id="nested-200"),
    pytest.param(raw_cmd(f'{{"a": {nested(300)}}}'), JSON, id="nested-300"),
    pytest.param(raw_cmd(f'{{"a": {nested(100_000)}}}'), JSON, id="nested-100000"),
    pytest.param(raw_cmd('{"n": ' + "9" * 5000 + "}"), JSON, id="5000-digit-integer"),
    # odd agent ids and names
    pytest.param(cmd_with(target="ägent"), JSON, id="unicode-target"),
    pytest.param(cmd_with(target="агент-1"), JSON, id="cyrillic-target"),
    pytest.param(cmd_with(target=["a1", "🤖"]), JSON, id="emoji-in-target-list"),
    pytest.param(cmd_with(target="a\u0000b"), JSON, id="nul-in-target"),
    pytest.param(cmd_with(target="fleet/a1"), JSON, id="slash-in-target"),
    pytest.param(cmd_with(target="+"), JSON, id="wildcard-target"),
    pytest.param(cmd_with(target="ALL"), JSON, id="upper-case-all"),
    pytest.param(cmd_with(target=""), JSON, id="empty-target"),
    pytest.param(cmd_with(target=7), JSON, id="numeric-target"),
    pytest.param(cmd_with(command="пинг"), JSON, id="unicode-command"),
    pytest.param(raw_cmd(f'{{"s": "{SURROGATE}"}}'), JSON, id="lone-surrogate-arg"),
    pytest.param(raw_cmd(f'{{"{SURROGATE}": 1}}'), JSON, id="lone-surrogate-key"),
    pytest.param(raw_field(f'"timeout": 1, "x{SURROGATE}": 1'), JSON, id="lone-surrogate-field"),
    pytest.param(
        f'{{"command": "ping", "target": "g1{SURROGATE}"}}'.encode(),
        JSON,
        id="lone-surrogate-target",
    ),
    # non-finite numbers
    pytest.param(raw_field('"timeout": NaN'), JSON, id="nan-timeout"),
    pytest.param(raw_field('"ttl": Infinity'), JSON, id="infinite-ttl"),
    pytest.param(raw_field('"timeout": -Infinity'), JSON, id="minus-infinite-timeout"),
    pytest.param(raw_field('"timeout": 1e999'), JSON, id="overflowing-timeout"),
    pytest.param(raw_field('"allow_unknown": NaN'), JSON, id="nan-flag"),
    pytest.param(b'{"target": NaN, "command": "ping"}', JSON, id="nan-target"),
    pytest.param(raw_cmd('{"x": NaN, "y": [Infinity, -Infinity]}'), JSON, id="non-finite-args"),
    # sizes
    pytest.param(cmd_with(args={"blob": "x" * (1 << 20)}), JSON, id="1MiB-command"),
    pytest.param(b"x" * (1 << 20), JSON, id="1MiB-of-garbage"),
    # not a command object at all
    pytest.param(b"", JSON, id="empty-body"),
    pytest.param(b"null", JSON, id="null"),
    pytest.param(b"[]", JSON, id="list"),
    pytest.param(b'"ping"', JSON, id="string"),
    pytest.param(b"1e999", JSON, id="infinite-number"),
    pytest.param(b'{"target": "g1", "command": "ping"', JSON, id="truncated"),
    pytest.param(b'{"target": "g1", "command": "ping",}', JSON, id="trailing-comma"),
    pytest.param(b"\x00\x01\xfe\xff" + bytes(range(256)), JSON, id="binary"),
    # encodings and content types
    pytest.param("\ufeff".encode() + cmd_with(), JSON, id="utf8-bom"),
    pytest.param(cmd_with().decode().encode("utf-16"), JSON, id="utf-16"),
    pytest.param(LATIN_1, "application/json; charset=latin-1", id="latin-1"),
    pytest.param(cmd_with(), "text/plain", id="text-plain"),
    pytest.param(b"target=g1&command=ping", "application/x-www-form-urlencoded", id="form"),
    pytest.param(MULTIPART, "multipart/form-data; boundary=x", id="multipart"),
    pytest.param(b"--x\r\n", "multipart/form-data", id="multipart-without-boundary"),
    pytest.param(b"<command target='g1'>ping</command>", "application/xml", id="xml"),
    pytest.param(cmd_with(), "application/vnd.api+json", id="json-suffix"),
    pytest.param(cmd_with(), "", id="no-content-type"),
]  # fmt: skip


@pytest.mark.parametrize(("content", "content_type"), ODD_BODIES)
async def test_odd_body_is_never_a_server_error(
    controller: Controller, content: bytes, content_type: str
) -> None:
    """POST /commands with an odd body answers 202 or a 4xx in the error shape, never a 5xx."""
    headers = {"content-type": content_type} if content_type else {}
    r = await controller.http.post("/api/v1/commands", content=content, headers=headers)
    if r.status_code == 202:
        created = r.json()
        shown = await controller.http.get(f"/api/v1/commands/{created['id']}")
        assert shown.status_code == 200, shown.text
    else:
        assert_error_shape(r)
    assert (await controller.http.get("/readyz")).status_code == 200


async def test_non_finite_numbers_in_args_are_refused(controller: Controller) -> None:
    """NaN and Infinity in args are not JSON: 422 naming args, and nothing is recorded."""
    r = await controller.http.post(
        "/api/v1/commands",
        content=raw_cmd('{"x": NaN, "y": [Infinity, -Infinity]}'),
        headers={"content-type": JSON},
    )
    assert r.status_code == 422, r.text
    assert_error_shape(r)
    assert "args" in r.json()["message"] and "finite" in r.json()["message"]


# -- hand-written odd paths and query strings --------------------------------------------------

ODD_REQUESTS = [
    pytest.param("GET", "/api/v1/agents/%C3%A4gent", {}, id="unicode-agent"),
    pytest.param("GET", "/api/v1/agents/%F0%9F%A4%96", {}, id="emoji-agent"),
    pytest.param("GET", "/api/v1/agents/%ED%A0%80", {}, id="surrogate-agent"),
    pytest.param("GET", "/api/v1/agents/%FF%FE", {}, id="invalid-utf8-agent"),
    pytest.param("GET", "/api/v1/agents/a%00b", {}, id="nul-agent"),
    pytest.param("GET", "/api/v1/agents/a%2Fb", {}, id="encoded-slash-agent"),
    pytest.param("GET", "/api/v1/agents/" + "a" * 5000, {}, id="long-agent"),
    pytest.param("GET", "/api/v1/agents/all", {}, id="reserved-agent"),
    pytest.param("DELETE", "/api/v1/agents/%C3%A4gent", {}, id="delete-unicode-agent"),
    pytest.param("DELETE", "/api/v1/agents/all", {}, id="delete-all"),
    pytest.param("GET", "/api/v1/agents/a1", {"wait": "nan"}, id="nan-wait"),
    pytest.param("GET", "/api/v1/agents/a1", {"wait": "inf"}, id="infinite-wait"),
    pytest.param("GET", "/api/v1/agents/a1", {"wait": "0.01", "until": "asleep"}, id="bad-until"),
    pytest.param("GET", "/api/v1/commands/%ED%A0%80", {}, id="surrogate-command"),
    pytest.param("GET", "/api/v1/commands/%FF", {"wait": "0.01"}, id="invalid-utf8-command"),
    pytest.param("GET", "/api/v1/commands/" + "c" * 5000, {"wait": "0.01"}, id="long-command"),
    pytest.param("GET", "/api/v1/commands/x", {"wait": "-1"}, id="negative-wait"),
    pytest.param("GET", "/api/v1/commands/x", {"wait": "1e999"}, id="overflowing-wait"),
    pytest.param("GET", "/api/v1/commands/x", {"wait": "0.01", "after": "v" * 65}, id="long-after"),
    pytest.param("GET", "/api/v1/commands/x", {"wait": ["0.01", "0.02"]}, id="repeated-wait"),
    pytest.param("GET", "/api/v1/commands", {"limit": "0"}, id="zero-limit"),
    pytest.param("GET", "/api/v1/commands", {"limit": "1e3"}, id="float-limit"),
    pytest.param("GET", "/api/v1/commands", {"limit": "9" * 400}, id="huge-limit"),
    pytest.param("GET", "/api/v1/commands", {"cursor": "9" * 19}, id="huge-cursor"),
    pytest.param("GET", "/api/v1/commands", {"cursor": "٣"}, id="arabic-digit-cursor"),
    pytest.param("GET", "/api/v1/commands", {"cursor": "-1"}, id="negative-cursor"),
    pytest.param("GET", "/api/v1/commands", {"since": "9999-12-31T23:59:59+14:00"}, id="far-since"),
    pytest.param("GET", "/api/v1/commands", {"since": "0001-01-01T00:00-23:59"}, id="early-since"),
    pytest.param("GET", "/api/v1/commands", {"since": "yesterday"}, id="word-since"),
    pytest.param("GET", "/api/v1/commands", {"since": "1" * 400}, id="huge-timestamp-since"),
    pytest.param("GET", "/api/v1/commands", {"status": "ünknown"}, id="unicode-status"),
    pytest.param("GET", "/api/v1/commands", {"agent": "ägent"}, id="unicode-agent-filter"),
    pytest.param("GET", "/api/v1/commands", {"x" * 1000: "y" * 1000}, id="unknown-param"),
    pytest.param("GET", "/readyz", {"wait": "nan"}, id="nan-readyz-wait"),
    pytest.param("PUT", "/api/v1/commands", {}, id="wrong-method"),
    pytest.param("GET", "/api/v1/" + "%2e%2e/" * 5 + "etc/passwd", {}, id="dot-dot"),
]  # fmt: skip


@pytest.mark.parametrize(("method", "path", "params"), ODD_REQUESTS)
async def test_odd_request_is_never_a_server_error(
    controller: Controller, method: str, path: str, params: dict[str, Any]
) -> None:
    """Odd path ids and query values get a 2xx or a 4xx in the error shape, never a 5xx."""
    r = await controller.http.request(method, path, params=params)
    if r.status_code >= 300:
        assert_error_shape(r)
    assert (await controller.http.get("/readyz")).status_code == 200
