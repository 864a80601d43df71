"""Graceful shutdown: running commands get a grace period, their results are never lost, and
commands that had not started yet run after the restart."""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import TYPE_CHECKING

from fleet_agent.agent import SHUTDOWN_INTERRUPTED
from fleet_agent.protocol import AgentState, CommandStatus

from fleet_testing import is_gone, wait_process_exit

if TYPE_CHECKING:
    from pathlib import Path

    from fleet_testing import AgentRunner, Probe


async def test_stop_waits_for_a_running_command_within_the_grace_period(
    probe: Probe, agents: AgentRunner
) -> None:
    """A command running at a clean stop finishes and its result is published before goodbye."""
    async with agents.run("patient", shutdown_grace=30):
        cid = await probe.send("patient", "sleep", args={"seconds": 0.5})
        await probe.wait_result("patient", cid, CommandStatus.RUNNING)
    result = await probe.wait_result("patient", cid)
    goodbye = await probe.wait_status("patient", AgentState.OFFLINE)
    assert result.status is CommandStatus.SUCCEEDED
    assert goodbye.reason == "shutdown"


async def test_stop_interrupts_commands_past_the_grace_period_and_keeps_queued_ones(
    probe: Probe, agents: AgentRunner, tmp_path: Path
) -> None:
    """Past the grace period a running command is killed and `failed`; a queued one runs later."""
    gate, pidfile = tmp_path / "gate", tmp_path / "leader.pid"
    os.mkfifo(gate)
    gate_fd = os.open(gate, os.O_RDWR)  # `cat` blocks until the test closes it
    argv = ["sh", "-c", 'echo $$ > "$0"; exec cat "$1"', str(pidfile), str(gate)]
    try:
        async with agents.run("hasty", max_concurrent=1, shutdown_grace=0.2):
            stuck = await probe.send("hasty", "run", args={"argv": argv})
            await probe.wait_result("hasty", stuck, CommandStatus.RUNNING)
            queued = await probe.send("hasty", "ping")
            await probe.wait_result("hasty", queued, CommandStatus.RECEIVED)
        interrupted = await probe.wait_result("hasty", stuck)
        await probe.wait_status("hasty", AgentState.OFFLINE)
        assert probe.statuses_of("hasty", queued) == [CommandStatus.RECEIVED]
        leader = int(pidfile.read_text())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                await wait_process_exit(leader)
        assert is_gone(leader), f"the interrupted command's process {leader} is still running"

        async with agents.run("hasty"):
            later = await probe.wait_result("hasty", queued)
    finally:
        os.close(gate_fd)
    assert interrupted.status is CommandStatus.FAILED
    assert interrupted.error == SHUTDOWN_INTERRUPTED
    assert later.status is CommandStatus.SUCCEEDED
    assert probe.statuses_of("hasty", stuck).count(CommandStatus.RUNNING) == 1
