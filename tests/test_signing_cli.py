"""`fleet keys generate` and `fleet sign`, run as a user runs them (real subprocesses)."""

from __future__ import annotations

import asyncio
import json
import stat
from pathlib import Path

import httpx
import pytest
from test_cli import fleet
from test_fleet_up import banner_token, fleet_up

from fleet_agent.protocol import CommandStatus
from fleet_agent.signing import PRIVATE_KEY_NAME, PUBLIC_KEY_NAME

from fleet_testing import AgentRunner, BrokerEndpoint, Probe, bearer, free_port
from fleet_testing import mosquitto_pub as publish_with


@pytest.fixture
async def key_dir(tmp_path: Path) -> Path:
    """A directory holding a key pair made by `fleet keys generate`."""
    directory = tmp_path / "keys"
    r = await fleet("keys", "generate", "--dir", str(directory))
    assert r.code == 0, r.err
    return directory


async def test_keys_generate_writes_a_private_key_only_the_owner_reads(key_dir: Path) -> None:
    """The private key is mode 0600 PEM PKCS8, the public key PEM; both paths are printed."""
    private, public = key_dir / PRIVATE_KEY_NAME, key_dir / PUBLIC_KEY_NAME
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert private.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert public.read_text().startswith("-----BEGIN PUBLIC KEY-----")


async def test_keys_generate_prints_what_to_configure(tmp_path: Path) -> None:
    """The output names both files and the settings that take them."""
    r = await fleet("keys", "generate", "--dir", str(tmp_path))
    assert r.code == 0, r.err
    assert str(tmp_path / PRIVATE_KEY_NAME) in r.out and str(tmp_path / PUBLIC_KEY_NAME) in r.out
    assert "--signing-key" in r.out and "--command-public-key" in r.out


async def test_keys_generate_refuses_to_overwrite(key_dir: Path) -> None:
    """A second `fleet keys generate` into the same directory exits 2 and changes nothing."""
    before = (key_dir / PRIVATE_KEY_NAME).read_bytes()
    r = await fleet("keys", "generate", "--dir", str(key_dir))
    assert r.code == 2
    assert "already exists; refusing to overwrite" in r.err
    assert (key_dir / PRIVATE_KEY_NAME).read_bytes() == before


async def test_fleet_sign_output_runs_when_published_with_mosquitto_pub(
    broker: BrokerEndpoint,
    probe: Probe,
    agents: AgentRunner,
    mosquitto_pub: str,
    key_dir: Path,
) -> None:
    """`fleet sign` prints a payload that mosquitto_pub delivers and the agent runs."""
    key = str(key_dir / PRIVATE_KEY_NAME)
    signed = await fleet(
        "sign", "--key", key, "--to", "a1", "--id", "by-hand-1", "--ttl", "60",
        "sleep", "--args", '{"seconds": 0}',
    )  # fmt: skip
    assert signed.code == 0, signed.err
    assert len(signed.out.splitlines()) == 1
    broadcast = await fleet("sign", "--key", key, "--to", "all", "--id", "by-hand-2", "ping")
    assert broadcast.code == 0, broadcast.err
    async with agents.run("a1", command_public_key=key_dir / PUBLIC_KEY_NAME):
        await publish_with(mosquitto_pub, broker, probe.topics.cmd("a1"), signed.out.strip())
        one = await probe.wait_result("a1", "by-hand-1")
        await publish_with(mosquitto_pub, broker, probe.topics.broadcast_cmd, broadcast.out)
        every = await probe.wait_result("a1", "by-hand-2")
    assert one.status is CommandStatus.SUCCEEDED and one.output == {"slept": 0}, one
    assert every.status is CommandStatus.SUCCEEDED, every


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--key", "{keys}/missing.key", "--to", "a1", "ping"], "cannot read signing key"),
        (["--key", "{keys}/" + PUBLIC_KEY_NAME, "--to", "a1", "ping"], "not an unencrypted PEM"),
        (["--key", "{key}", "--to", "a/1", "ping"], "--to: invalid agent id 'a/1'"),
        (["--key", "{key}", "--to", "a1", "ping", "--args", "nope"], "--args is not JSON"),
        (["--key", "{key}", "--to", "a1", "ping", "--args", "[1]"], "must be a JSON object"),
        (["--key", "{key}", "--to", "a1", "Ping"], "invalid command: command"),
        (["--key", "{key}", "--to", "a1", "--id", "a b", "ping"], "invalid command: id"),
    ],
)
async def test_fleet_sign_bad_input_is_one_clear_line(
    key_dir: Path, args: list[str], error: str
) -> None:
    """Bad key files, agent ids, args and commands exit 2 with one line saying what is wrong."""
    filled = [a.format(keys=key_dir, key=key_dir / PRIVATE_KEY_NAME) for a in args]
    r = await fleet("sign", *filled)
    assert r.code == 2, (r.out, r.err)
    assert r.out == ""
    assert len(r.err.strip().splitlines()) == 1 and error in r.err, r.err


async def test_fleet_sign_covers_the_topic(key_dir: Path) -> None:
    """The same command signed for two agents carries two different signatures."""
    key = str(key_dir / PRIVATE_KEY_NAME)
    a1 = await fleet("sign", "--key", key, "--to", "a1", "--id", "same", "ping")
    a2 = await fleet("sign", "--key", key, "--to", "a2", "--id", "same", "ping")
    assert json.loads(a1.out)["sig"] != json.loads(a2.out)["sig"]


async def test_fleet_up_agents_require_signatures(tmp_path: Path, mosquitto_pub: str) -> None:
    """`fleet up` keeps its key pair in the state dir and its demo agents refuse unsigned
    commands."""
    mqtt, http = free_port(), free_port()
    async with fleet_up(
        tmp_path, "--agents", "1", "--mqtt-port", str(mqtt), "--http-port", str(http)
    ) as (_, banner):
        # The printed example, with its login, but an unsigned payload.
        pub = next(line.strip() for line in banner if line.strip().startswith("mosquitto_pub"))
        login = pub.removeprefix("mosquitto_pub").split(" -m ")[0]
        unsigned = f"""{mosquitto_pub}{login} -m '{{"command":"ping","id":"unsigned-1"}}'"""
        run = await asyncio.create_subprocess_exec("sh", "-c", unsigned)
        assert await run.wait() == 0
        auth = bearer(banner_token(banner))
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{http}", headers=auth) as client:
            r = await client.get("/api/v1/commands/unsigned-1", params={"wait": 10})
    result = r.json()["results"][0]
    assert (result["status"], result["error"]) == ("rejected", "signature required"), r.text
    key = tmp_path / "state" / "keys" / PRIVATE_KEY_NAME
    assert stat.S_IMODE(key.stat().st_mode) == 0o600


async def test_signing_subcommands_have_help() -> None:
    """`fleet sign --help` and `fleet keys generate --help` work and are listed by `fleet`."""
    for sub in (["sign"], ["keys"], ["keys", "generate"]):
        r = await fleet(*sub, "--help")
        assert r.code == 0, (sub, r.err)
        assert "usage" in r.out.lower(), sub
    listing = await fleet("--help")
    assert "sign" in listing.out and "keys" in listing.out
