"""Cancel on the agent: queued commands are skipped, running ones killed, unarrived ones
never run; and the birth message says whether the broker kept the session."""

from __future__ import annotations

from fleet_agent.protocol import AgentState, CommandStatus

from fleet_testing import AgentRunner, Probe


async def test_cancel_kills_a_running_command(probe: Probe, agents: AgentRunner) -> None:
    """A running command is killed and reported canceled; the cancel itself succeeds."""
    async with agents.run("a1"):
        target = await probe.send("a1", "sleep", args={"seconds": 60})
        await probe.wait_result("a1", target, CommandStatus.RUNNING)
        cancel = await probe.send("a1", "cancel", args={"command_id": target})
        result = await probe.wait_result("a1", target)
        ack = await probe.wait_result("a1", cancel)
    assert result.status is CommandStatus.CANCELED
    assert result.error == f"canceled by {cancel}"
    assert ack.status is CommandStatus.SUCCEEDED
    assert ack.output == {"command_id": target, "outcome": "canceled"}


async def test_cancel_skips_a_queued_command(probe: Probe, agents: AgentRunner) -> None:
    """A command waiting for a free slot is canceled without ever running."""
    async with agents.run("a1", max_concurrent=1):
        busy = await probe.send("a1", "sleep", args={"seconds": 60})
        await probe.wait_result("a1", busy, CommandStatus.RUNNING)
        queued = await probe.send("a1", "ping")
        await probe.wait_result("a1", queued, CommandStatus.RECEIVED)
        await probe.send("a1", "cancel", args={"command_id": queued})
        result = await probe.wait_result("a1", queued)
        await probe.send("a1", "cancel", args={"command_id": busy})
        await probe.wait_result("a1", busy)
    assert result.status is CommandStatus.CANCELED
    assert CommandStatus.RUNNING not in probe.statuses_of("a1", queued)


async def test_cancel_before_arrival_means_it_never_runs(probe: Probe, agents: AgentRunner) -> None:
    """A command canceled before it reaches the agent is reported canceled when it arrives."""
    async with agents.run("a1"):
        cancel = await probe.send("a1", "cancel", args={"command_id": "later-1"})
        await probe.wait_result("a1", cancel, CommandStatus.SUCCEEDED)
        mark = probe.mark()
        await probe.send("a1", "ping", id="later-1")
        late = await probe.wait_result("a1", "later-1", since=mark)
        await probe.sync()
    assert late.status is CommandStatus.CANCELED
    assert probe.statuses_of("a1", "later-1") == [CommandStatus.CANCELED, CommandStatus.CANCELED]


async def test_cancel_of_a_finished_command_changes_nothing(
    probe: Probe, agents: AgentRunner
) -> None:
    """Canceling a finished command reports it as already finished and keeps its result."""
    async with agents.run("a1"):
        done = await probe.send("a1", "ping")
        await probe.wait_result("a1", done, CommandStatus.SUCCEEDED)
        cancel = await probe.send("a1", "cancel", args={"command_id": done})
        ack = await probe.wait_result("a1", cancel)
    assert ack.output == {"command_id": done, "outcome": "already succeeded"}
    assert probe.statuses_of("a1", done)[-1] is CommandStatus.SUCCEEDED


async def test_cancel_with_bad_args_is_rejected(probe: Probe, agents: AgentRunner) -> None:
    """A cancel without a valid command_id is rejected with the reason."""
    async with agents.run("a1"):
        cancel = await probe.send("a1", "cancel", args={"id": "x"})
        result = await probe.wait_result("a1", cancel)
    assert result.status is CommandStatus.REJECTED
    assert result.error is not None and "command_id" in result.error


async def test_birth_reports_whether_the_session_was_kept(
    probe: Probe, agents: AgentRunner
) -> None:
    """The first birth says session_present false; a restart with a kept session says true."""
    async with agents.run("a1"):
        first = await probe.wait_status("a1", AgentState.ONLINE)
    mark = probe.mark()
    async with agents.run("a1"):
        second = await probe.wait_status("a1", AgentState.ONLINE, since=mark)
    assert first.session_present is False
    assert second.session_present is True
