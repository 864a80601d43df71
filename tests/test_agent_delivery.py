"""Delivery guarantees: offline queueing, at-most-once execution, and timeouts that leave no
process behind."""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import TYPE_CHECKING, Any

from fleet_agent.protocol import AgentState, CommandStatus

from fleet_testing import is_gone, wait_process_exit

if TYPE_CHECKING:
    from pathlib import Path

    from fleet_testing import AgentRunner, Probe

PROCESS_START_TIMEOUT = 30.0


def append_line(path: Path, line: str) -> dict[str, Any]:
    """`run` args whose side effect (one line appended to ``path``) the test can count."""
    return {"argv": ["sh", "-c", 'echo "$1" >> "$0"', str(path), line]}


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


async def test_commands_sent_while_down_arrive_in_order_after_restart(
    probe: Probe, agents: AgentRunner, tmp_path: Path
) -> None:
    """Three QoS 1 commands sent while a known agent is stopped all run, in order, on restart."""
    out = tmp_path / "order.txt"
    async with agents.run("sleeper"):
        pass  # the broker now knows the agent's persistent session
    ids = [await probe.send("sleeper", "run", args=append_line(out, str(n))) for n in (1, 2, 3)]
    await probe.sync()
    assert probe.results("sleeper") == []
    async with agents.run("sleeper", max_concurrent=1):
        for cid in ids:
            await probe.wait_result("sleeper", cid, CommandStatus.SUCCEEDED)
    received = [r.id for r in probe.results("sleeper") if r.status is CommandStatus.RECEIVED]
    assert received == ids
    assert lines(out) == ["1", "2", "3"]


async def test_duplicate_while_running_is_ignored(
    probe: Probe, agents: AgentRunner, tmp_path: Path
) -> None:
    """Copies of an id (valid or malformed) that arrive while it runs are ignored."""
    out, gate = tmp_path / "dup.txt", tmp_path / "gate"
    os.mkfifo(gate)
    # The command blocks reading a line from the FIFO; the test holds it open, so a line it
    # writes waits in the pipe even if the command has not opened it yet: no race.
    gate_fd = os.open(gate, os.O_RDWR)
    script = 'echo ran >> "$0"; exec 3<>"$1"; read -r line <&3'
    args = {"argv": ["sh", "-c", script, str(out), str(gate)]}
    try:
        async with agents.run("dup"):
            first = await probe.send("dup", "run", id="dup-1", args=args)
            await probe.wait_result("dup", first, CommandStatus.RUNNING)
            await probe.send("dup", "run", id="dup-1", args=args)
            malformed = b'{"command": "run", "id": "dup-1", "args": {}, "colour": "red"}'
            await probe.publish(probe.topics.cmd("dup"), malformed)
            # Commands are handled in arrival order: once this ping is answered, so was the copy.
            ping = await probe.send("dup", "ping")
            await probe.wait_result("dup", ping, CommandStatus.SUCCEEDED)
            assert probe.statuses_of("dup", "dup-1") == [
                CommandStatus.RECEIVED,
                CommandStatus.RUNNING,
            ]
            os.write(gate_fd, b"go\n")
            await probe.wait_result("dup", "dup-1", CommandStatus.SUCCEEDED)
    finally:
        if gate_fd >= 0:
            os.close(gate_fd)
    assert lines(out) == ["ran"]
    assert probe.statuses_of("dup", "dup-1") == [
        CommandStatus.RECEIVED,
        CommandStatus.RUNNING,
        CommandStatus.SUCCEEDED,
    ]


async def test_duplicate_after_completion_republishes_the_result(
    probe: Probe, agents: AgentRunner, tmp_path: Path
) -> None:
    """A duplicate id that arrives after completion is not run again; its result is resent."""
    out = tmp_path / "dup.txt"
    async with agents.run("dup"):
        await probe.send("dup", "run", id="dup-2", args=append_line(out, "ran"))
        first = await probe.wait_result("dup", "dup-2")
        mark = probe.mark()
        await probe.send("dup", "run", id="dup-2", args=append_line(out, "ran"))
        again = await probe.wait_result("dup", "dup-2", since=mark)
    assert first.status is CommandStatus.SUCCEEDED
    assert again == first
    finals = [s.payload for s in probe.seen if s.result and s.result.id == "dup-2"][2:]
    assert len(finals) == 2 and finals[0] == finals[1], "republished byte for byte"
    assert lines(out) == ["ran"]


async def test_duplicate_across_restart_runs_once(
    probe: Probe, agents: AgentRunner, tmp_path: Path
) -> None:
    """The ledger survives a restart: a duplicate id sent to the restarted agent does not run."""
    out = tmp_path / "dup.txt"
    async with agents.run("dup"):
        await probe.send("dup", "run", id="dup-3", args=append_line(out, "ran"))
        first = await probe.wait_result("dup", "dup-3", CommandStatus.SUCCEEDED)
    mark = probe.mark()
    # One copy waits in the broker's queue for the stopped agent, one arrives live.
    await probe.send("dup", "run", id="dup-3", args=append_line(out, "ran"))
    async with agents.run("dup"):
        await probe.send("dup", "run", id="dup-3", args=append_line(out, "ran"))
        ping = await probe.send("dup", "ping")
        await probe.wait_result("dup", ping, CommandStatus.SUCCEEDED, since=mark)
    after_restart = probe.results("dup", "dup-3")[3:]
    assert after_restart == [first, first]
    assert lines(out) == ["ran"]


async def test_run_timeout_kills_the_child_and_its_children(
    probe: Probe, agents: AgentRunner, tmp_path: Path
) -> None:
    """A `run` past its timeout is `timed_out` and its whole process group, grandchild too, dies."""
    pidfile = tmp_path / "grandchild.pid"
    argv = ["sh", "-c", 'sleep 300 & echo $! > "$0"; wait', str(pidfile)]
    async with agents.run("slow"):
        cid = await probe.send("slow", "run", args={"argv": argv}, timeout=1)
        result = await probe.wait_result("slow", cid)
        ping = await probe.send("slow", "ping")
        await probe.wait_result("slow", ping, CommandStatus.SUCCEEDED)
    assert result.status is CommandStatus.TIMED_OUT
    assert result.error == "timed out after 1s; the process group was killed"
    grandchild = int(pidfile.read_text())
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(10):
            await wait_process_exit(grandchild)
    assert is_gone(grandchild), f"grandchild {grandchild} outlived the timeout"


async def test_command_running_at_a_crash_is_failed_and_never_rerun(
    probe: Probe, agents: AgentRunner, tmp_path: Path
) -> None:
    """A command running when the agent was SIGKILLed is `failed` after restart, not run again."""
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    gate_fd = os.open(gate, os.O_RDWR)  # `cat` blocks until the test closes it
    args = {"argv": ["cat", str(gate)]}
    process = agents.process("crashy")
    try:
        async with process:
            await probe.wait_status("crashy", AgentState.ONLINE, timeout=PROCESS_START_TIMEOUT)
            await probe.send("crashy", "run", id="crash-1", args=args)
            await probe.wait_result("crashy", "crash-1", CommandStatus.RUNNING)
            await process.kill()
            mark = probe.mark()
            await process.start()
            interrupted = await probe.wait_result(
                "crashy", "crash-1", since=mark, timeout=PROCESS_START_TIMEOUT
            )
            await probe.send("crashy", "run", id="crash-1", args=args)
            ping = await probe.send("crashy", "ping")
            await probe.wait_result("crashy", ping, CommandStatus.SUCCEEDED)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nagent log:\n{process.log()}") from None
    finally:
        os.close(gate_fd)
    assert interrupted.status is CommandStatus.FAILED
    assert interrupted.error == "interrupted: the agent stopped while the command was running"
    assert probe.results("crashy", "crash-1")[-2:] == [interrupted, interrupted]
    assert probe.statuses_of("crashy", "crash-1").count(CommandStatus.RUNNING) == 1
