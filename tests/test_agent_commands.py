"""Round trips of the built-in commands: ping, info and run."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from fleet_agent import __version__
from fleet_agent.protocol import CommandStatus

if TYPE_CHECKING:
    from pathlib import Path
from fleet_testing import AgentRunner, BrokerEndpoint, Probe
from fleet_testing import mosquitto_pub as publish_with

LIFECYCLE = [CommandStatus.RECEIVED, CommandStatus.RUNNING]


async def test_ping_reports_received_running_then_succeeded(
    probe: Probe, agents: AgentRunner
) -> None:
    """A ping gets `received`, `running`, then `succeeded` with a pong and the agent's clock."""
    async with agents.run("pinger"):
        cid = await probe.send("pinger", "ping")
        result = await probe.wait_result("pinger", cid)
    assert probe.statuses_of("pinger", result.id) == [*LIFECYCLE, CommandStatus.SUCCEEDED]
    assert result.command == "ping"
    assert isinstance(result.output, dict)
    assert result.output["pong"] is True
    assert result.received_at is not None and result.started_at is not None
    assert result.finished_at is not None and result.finished_at >= result.started_at
    assert result.exit_code is None and result.error is None


async def test_info_describes_host_and_agent(probe: Probe, agents: AgentRunner) -> None:
    """`info` succeeds with the host, the agent's version, uptime, memory and disk."""
    async with agents.run("informer"):
        cid = await probe.send("informer", "info")
        result = await probe.wait_result("informer", cid)
    assert probe.statuses_of("informer", result.id) == [*LIFECYCLE, CommandStatus.SUCCEEDED]
    output = result.output
    assert isinstance(output, dict)
    assert output["agent_version"] == __version__
    assert isinstance(output["hostname"], str) and output["hostname"]
    assert isinstance(output["agent_uptime_s"], float) and output["agent_uptime_s"] >= 0
    assert isinstance(output["memory"], dict) and isinstance(output["disk"], dict)
    assert output["disk"]["path"] == str(agents.state_dir("informer"))


async def test_run_returns_exit_code_stdout_and_stderr(probe: Probe, agents: AgentRunner) -> None:
    """`run` of a program exiting 0 succeeds with its exit code, stdout and stderr."""
    argv = ["sh", "-c", 'echo "out:$1"; echo err >&2', "sh", "arg with spaces"]
    async with agents.run("runner"):
        cid = await probe.send("runner", "run", args={"argv": argv})
        result = await probe.wait_result("runner", cid)
    assert probe.statuses_of("runner", result.id) == [*LIFECYCLE, CommandStatus.SUCCEEDED]
    assert result.exit_code == 0
    assert result.error is None
    assert result.output == {
        "stdout": "out:arg with spaces\n",
        "stderr": "err\n",
        "stdout_truncated": False,
        "stderr_truncated": False,
    }


async def test_run_nonzero_exit_is_failed(probe: Probe, agents: AgentRunner) -> None:
    """`run` of a program exiting non-zero is `failed` with that exit code and its output."""
    argv = ["sh", "-c", "echo partial; echo broken >&2; exit 3"]
    async with agents.run("runner"):
        cid = await probe.send("runner", "run", args={"argv": argv})
        result = await probe.wait_result("runner", cid)
    assert probe.statuses_of("runner", result.id) == [*LIFECYCLE, CommandStatus.FAILED]
    assert result.exit_code == 3
    assert result.error == "exited with code 3"
    assert isinstance(result.output, dict)
    assert result.output["stdout"] == "partial\n"
    assert result.output["stderr"] == "broken\n"


async def test_run_feeds_stdin_and_sets_cwd_and_env(
    probe: Probe, agents: AgentRunner, tmp_path: Path
) -> None:
    """`run` passes stdin text, the working directory and extra environment to the program."""
    argv = ["sh", "-c", 'read line; echo "$line|$(pwd)|$GREETING"']
    args = {"argv": argv, "stdin": "hello\n", "cwd": str(tmp_path), "env": {"GREETING": "hi"}}
    async with agents.run("runner"):
        cid = await probe.send("runner", "run", args=args)
        result = await probe.wait_result("runner", cid)
    assert result.status is CommandStatus.SUCCEEDED
    assert isinstance(result.output, dict)
    assert result.output["stdout"] == f"hello|{tmp_path}|hi\n"


async def test_run_of_missing_program_is_failed(probe: Probe, agents: AgentRunner) -> None:
    """`run` of a program that does not exist is `failed` with a reason naming it."""
    async with agents.run("runner"):
        cid = await probe.send("runner", "run", args={"argv": ["/nonexistent/fleet-tool"]})
        result = await probe.wait_result("runner", cid)
    assert result.status is CommandStatus.FAILED
    assert result.error is not None
    assert "cannot execute '/nonexistent/fleet-tool'" in result.error


async def test_run_output_is_cut_at_the_limit(probe: Probe, agents: AgentRunner) -> None:
    """`run` keeps at most max_output_bytes of stdout and says it was truncated."""
    argv = ["sh", "-c", "head -c 5000 /dev/zero | tr '\\0' x"]
    async with agents.run("runner", max_output_bytes=1000):
        cid = await probe.send("runner", "run", args={"argv": argv})
        result = await probe.wait_result("runner", cid)
    assert result.status is CommandStatus.SUCCEEDED
    assert isinstance(result.output, dict)
    assert result.output["stdout"] == "x" * 1000
    assert result.output["stdout_truncated"] is True


async def test_command_from_mosquitto_pub_runs(
    broker: BrokerEndpoint, probe: Probe, agents: AgentRunner, mosquitto_pub: str
) -> None:
    """A command published by mosquitto_pub (a C client, logged in by name) is executed."""
    payload = json.dumps({"command": "ping", "id": "from-c-client"})
    async with agents.run("interop"):
        await publish_with(mosquitto_pub, broker, probe.topics.cmd("interop"), payload)
        result = await probe.wait_result("interop", "from-c-client")
    assert result.status is CommandStatus.SUCCEEDED
