"""The agent's command policy: `run` is off unless executables are allowed, and only those
run; disabled commands are refused with the reason."""

from __future__ import annotations

import shutil

from fleet_agent.protocol import AgentState, CommandStatus

from fleet_testing import AgentRunner, Probe


async def test_run_is_disabled_unless_configured(probe: Probe, agents: AgentRunner) -> None:
    """Without run_allow, `run` is rejected and not listed in the birth message."""
    async with agents.run("a1", run_allow=[]):
        birth = await probe.wait_status("a1", AgentState.ONLINE)
        cid = await probe.send("a1", "run", args={"argv": ["true"]})
        result = await probe.wait_result("a1", cid)
    assert "run" not in birth.commands
    assert result.status is CommandStatus.REJECTED
    assert result.error is not None and "run_allow" in result.error


async def test_only_allowed_executables_run(probe: Probe, agents: AgentRunner) -> None:
    """An allowed program runs (by name or path); any other is rejected, also via PATH tricks."""
    echo = shutil.which("echo")
    assert echo is not None
    async with agents.run("a1", run_allow=["echo"]):
        ok = await probe.send("a1", "run", args={"argv": ["echo", "hi"]})
        by_path = await probe.send("a1", "run", args={"argv": [echo, "there"]})
        other = await probe.send("a1", "run", args={"argv": ["sh", "-c", "echo no"]})
        results = [await probe.wait_result("a1", c) for c in (ok, by_path, other)]
    assert [r.status for r in results] == [
        CommandStatus.SUCCEEDED,
        CommandStatus.SUCCEEDED,
        CommandStatus.REJECTED,
    ]
    assert results[2].error == "executable 'sh' is not allowed on this agent (run_allow)"


async def test_env_sets_only_allowed_variables(probe: Probe, agents: AgentRunner) -> None:
    """With a list of programs, `env` may set only run_env_allow names: LD_PRELOAD and PATH
    tricks are refused, an allowed name passes (and PATH cannot swap the program anyway)."""
    async with agents.run("a1", run_allow=["echo", "env"], run_env_allow=["GREETING", "PATH"]):
        preload = await probe.send(
            "a1", "run", args={"argv": ["echo", "x"], "env": {"LD_PRELOAD": "/tmp/evil.so"}}
        )
        allowed = await probe.send(
            "a1", "run", args={"argv": ["env"], "env": {"GREETING": "hi", "PATH": "/nowhere"}}
        )
        refused, ran = [await probe.wait_result("a1", c) for c in (preload, allowed)]
    assert refused.status is CommandStatus.REJECTED
    assert refused.error == "'LD_PRELOAD' may not be set in env on this agent (run_env_allow)"
    assert ran.status is CommandStatus.SUCCEEDED, ran
    assert isinstance(ran.output, dict) and "GREETING=hi" in ran.output["stdout"], ran.output


async def test_enabled_commands_limit_what_is_accepted(probe: Probe, agents: AgentRunner) -> None:
    """enabled_commands refuses the others, with the reason, and the birth lists the rest."""
    async with agents.run("a1", enabled_commands=["ping"], run_allow=[]):
        birth = await probe.wait_status("a1", AgentState.ONLINE)
        refused = await probe.send("a1", "info")
        allowed = await probe.send("a1", "ping")
        results = [await probe.wait_result("a1", c) for c in (refused, allowed)]
    assert birth.commands == ["cancel", "ping"]
    assert results[0].status is CommandStatus.REJECTED
    assert results[0].error == "command 'info' is disabled on this agent (see enabled_commands)"
    assert results[1].status is CommandStatus.SUCCEEDED
