"""TLS settings and flags: every entry point exposes them, and unusable certificate files end
the process with one clear line and exit code 2, never a traceback."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from test_cli import fleet

from fleet_agent.cli import main as agent_main
from fleet_agent.settings import parse_agent_settings
from fleet_controller.main import main as controller_main

from fleet_testing import Issued, TestCA, free_port

BadFiles = Callable[[TestCA, Path], list[str]]


def _encrypted_key(ca: TestCA, tmp_path: Path) -> list[str]:
    issued = ca.issue("a1", server=False)
    key = serialization.load_pem_private_key(issued.key.read_bytes(), password=None)
    locked = tmp_path / "locked.key"
    locked.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    return ["--tls-cert", str(issued.cert), "--tls-key", str(locked)]


def _junk(tmp_path: Path) -> Path:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    return junk


def _pair(issued: Issued) -> list[str]:
    return ["--tls-cert", str(issued.cert), "--tls-key", str(issued.key)]


def _mismatched(ca: TestCA, tmp_path: Path) -> list[str]:
    cert, other = ca.issue("a1", server=False), ca.issue("a2", server=False)
    return ["--tls-cert", str(cert.cert), "--tls-key", str(other.key)]


BAD_CLIENT_FILES: list[tuple[str, BadFiles, str]] = [
    ("missing-ca", lambda ca, p: ["--tls-ca", str(p / "nope.pem")], "cannot read tls_ca"),
    ("junk-ca", lambda ca, p: ["--tls-ca", str(_junk(p))], "holds no valid PEM certificate"),
    ("directory-ca", lambda ca, p: ["--tls-ca", str(p)], "Is a directory"),
    (
        "cert-without-key",
        lambda ca, p: ["--tls-cert", str(ca.issue("a1").cert)],
        "tls_cert and tls_key go together",
    ),
    (
        "junk-cert",
        lambda ca, p: ["--tls-cert", str(_junk(p)), "--tls-key", str(_junk(p))],
        "not a PEM",
    ),
    ("key-of-another-cert", _mismatched, "is not the private key of"),
    ("encrypted-key", _encrypted_key, "is encrypted"),
    ("tls-false", lambda ca, p: ["--tls", "false", "--tls-ca", str(ca.cert)], "tls is false"),
]


def one_error_line(err: str, prog: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{prog}: "), err
    return lines[0]


@pytest.mark.parametrize(
    ("args", "expected"),
    [pytest.param(args, expected, id=name) for name, args, expected in BAD_CLIENT_FILES],
)
def test_agent_refuses_unusable_tls_files_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: BadFiles, expected: str
) -> None:
    """fleet-agent exits 2 with one line naming the setting, the file and what is wrong."""
    argv: Sequence[str] = ["--agent-id", "a1", "--state-dir", str(tmp_path / "state")]
    code = agent_main([*argv, *args(TestCA(tmp_path), tmp_path)])
    line = one_error_line(capsys.readouterr().err, "fleet-agent")
    assert code == 2
    assert expected in line


def test_controller_refuses_unusable_tls_file_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`fleet controller` with an unreadable tls_ca exits 2 with one line before serving."""
    missing = tmp_path / "nope.pem"
    code = controller_main(["--tls-ca", str(missing), "--http-port", "0"])
    line = one_error_line(capsys.readouterr().err, "fleet controller")
    assert code == 2
    assert f"cannot read tls_ca {missing}: No such file or directory" in line


def test_tls_flags_and_environment() -> None:
    """`--tls` alone turns TLS on; a tls_* file from the environment turns it on implicitly."""
    assert parse_agent_settings(["--agent-id", "a1", "--tls"], environ={}).tls is True
    assert parse_agent_settings(["--agent-id", "a1"], environ={}).tls is False
    from_env = parse_agent_settings(
        ["--agent-id", "a1"], environ={"FLEET_AGENT_TLS_CA": "/etc/fleet/ca.pem"}
    )
    assert (from_env.tls, from_env.tls_ca) == (True, Path("/etc/fleet/ca.pem"))
    insecure = parse_agent_settings(["--agent-id", "a1", "--tls-insecure", "--tls"], environ={})
    assert insecure.tls_insecure is True


@pytest.mark.parametrize("sub", ["agent", "controller"])
async def test_agent_and_controller_help_list_tls_settings(sub: str) -> None:
    """`fleet agent --help` and `fleet controller --help` list every TLS setting."""
    r = await fleet(sub, "--help")
    assert r.code == 0, r.err
    for flag in ("--tls ", "--tls-ca", "--tls-cert", "--tls-key", "--tls-insecure"):
        assert flag in r.out, (flag, r.out)


BAD_BROKER_FILES: list[tuple[str, BadFiles, str]] = [
    (
        "missing-cert",
        lambda ca, p: ["--tls-cert", str(p / "nope.crt"), "--tls-key", str(p / "nope.key")],
        "cannot read TLS certificate (--tls-cert, certfile)",
    ),
    ("cert-without-key", lambda ca, p: ["--tls-cert", str(ca.server().cert)], "go together"),
    ("ca-without-cert", lambda ca, p: ["--tls-ca", str(ca.cert)], "--tls-ca needs --tls-cert"),
    ("junk-ca", lambda ca, p: [*_pair(ca.server()), "--tls-ca", str(_junk(p))], "client CA"),
    ("key-of-another-cert", _mismatched, "is not the private key of"),
]


@pytest.mark.parametrize(
    ("args", "expected"),
    [pytest.param(args, expected, id=name) for name, args, expected in BAD_BROKER_FILES],
)
async def test_broker_refuses_unusable_tls_files_in_one_line(
    tmp_path: Path, args: BadFiles, expected: str
) -> None:
    """`fleet broker` with unusable TLS files exits 2 with one line naming the flag and file."""
    flags = args(TestCA(tmp_path), tmp_path)
    # Wide enough that the error's long paths are not wrapped onto a second line.
    r = await fleet("broker", "--port", str(free_port()), *flags, env={"COLUMNS": "1000"})
    assert r.code == 2, (r.out, r.err)
    line = one_error_line(r.err, "fleet")
    assert expected in line
