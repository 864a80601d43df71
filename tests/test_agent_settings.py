"""Agent settings: invalid agent ids are refused with a clear message and exit code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fleet_agent.cli import main
from fleet_agent.errors import ConfigError
from fleet_agent.settings import parse_agent_settings

INVALID_IDS = [
    pytest.param("a/b", "agent ids are 1 to 64 characters", id="slash"),
    pytest.param("all", "'all' is reserved for broadcasts", id="broadcast"),
    pytest.param("+", "agent ids are 1 to 64 characters", id="wildcard"),
    pytest.param("", "agent ids are 1 to 64 characters", id="empty"),
    pytest.param("x" * 65, "agent ids are 1 to 64 characters", id="65-chars"),
]


@pytest.mark.parametrize(("agent_id", "reason"), INVALID_IDS)
def test_invalid_agent_id_is_a_config_error(agent_id: str, reason: str) -> None:
    """An invalid --agent-id raises ConfigError naming the field, the value and the rule."""
    with pytest.raises(ConfigError) as caught:
        parse_agent_settings(["--agent-id", agent_id], environ={})
    message = str(caught.value)
    assert message.startswith("invalid settings: agent_id: ")
    assert reason in message
    assert repr(agent_id) in message


@pytest.mark.parametrize(("agent_id", "reason"), INVALID_IDS)
def test_invalid_agent_id_exits_with_code_2(
    agent_id: str, reason: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`fleet-agent --agent-id <invalid>` prints the reason on stderr and exits with code 2."""
    monkeypatch.delenv("FLEET_AGENT_CONFIG", raising=False)
    assert main(["--agent-id", agent_id]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fleet-agent: invalid settings: agent_id: ")
    assert reason in err


def test_console_script_exits_with_code_2_on_invalid_id() -> None:
    """The installed `fleet-agent` script exits 2, without a traceback, for an invalid id."""
    script = Path(sys.executable).with_name("fleet-agent")
    proc = subprocess.run(
        [str(script), "--agent-id", "a/b"], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("fleet-agent: invalid settings: agent_id: ")


def test_missing_agent_id_is_a_config_error() -> None:
    """Without an agent id, settings fail with a message naming the missing field."""
    with pytest.raises(ConfigError, match=r"agent_id: Field required"):
        parse_agent_settings([], environ={})


def test_valid_agent_id_of_64_chars_is_accepted() -> None:
    """Letters, digits, '-', '_' and '.' up to 64 characters make a valid id."""
    agent_id = "Edge-01_a.b" + "x" * 53
    assert len(agent_id) == 64
    assert parse_agent_settings(["--agent-id", agent_id], environ={}).agent_id == agent_id
