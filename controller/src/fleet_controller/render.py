"""Terminal rendering of agents and commands (rich tables)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

STATUS_STYLE = {
    "succeeded": "green",
    "failed": "red",
    "rejected": "red",
    "expired": "yellow",
    "timed_out": "red",
    "pending": "dim",
    "received": "cyan",
    "running": "cyan",
    "in_progress": "cyan",
    "no_targets": "dim",
}


def ago(value: str | None, now: datetime | None = None) -> str:
    if not value:
        return "-"
    then = datetime.fromisoformat(value)
    seconds = ((now or datetime.now(UTC)) - then).total_seconds()
    return f"{duration(seconds)} ago"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h{minutes:02d}m"
    return f"{hours // 24}d{hours % 24:02d}h"


def status_text(status: str) -> Text:
    return Text(status, style=STATUS_STYLE.get(status, ""))


def agents_table(agents: list[dict[str, Any]]) -> Table:
    table = Table(title=f"agents ({sum(a['online'] for a in agents)}/{len(agents)} online)")
    for col in ("agent", "state", "last seen", "uptime", "version", "latency", "host"):
        table.add_column(col)
    now = datetime.now(UTC)
    for a in agents:
        since = a.get("connected_since")
        uptime = (
            duration((now - datetime.fromisoformat(since)).total_seconds())
            if a["online"] and since
            else "-"
        )
        state = (
            Text("online", style="green")
            if a["online"]
            else Text(f"offline ({a.get('offline_reason') or '?'})", style="red")
        )
        latency = f"{a['latency_ms']:.1f}ms" if a.get("latency_ms") is not None else "-"
        table.add_row(
            a["id"],
            state,
            ago(a["last_seen"], now),
            uptime,
            a.get("version") or "-",
            latency,
            str(a.get("host", {}).get("hostname", "-")),
        )
    return table


def _counts(counts: dict[str, int]) -> Text:
    text = Text()
    for i, (status, n) in enumerate(sorted(counts.items())):
        if i:
            text.append(" ")
        text.append(f"{status}:{n}", style=STATUS_STYLE.get(status, ""))
    return text


def commands_table(items: list[dict[str, Any]], *, title: str = "commands") -> Table:
    table = Table(title=title)
    table.add_column("id", no_wrap=True)
    for col in ("command", "target", "source", "created", "status"):
        table.add_column(col, overflow="fold")
    table.add_column("agents", no_wrap=True)
    for c in items:
        target = c["target"] if isinstance(c["target"], str) else ",".join(c["target"])
        answered = sum(n for s, n in c["counts"].items() if s != "pending")
        table.add_row(
            c["id"],
            c["command"],
            target,
            c["source"],
            ago(c["created_at"]),
            status_text(c["status"]),
            Text.assemble(f"{answered}/{c['expected']} ", _counts(c["counts"])),
        )
    return table


def _output(result: dict[str, Any], limit: int = 400) -> str:
    output = result.get("output")
    if isinstance(output, dict) and "stdout" in output:
        text = (output.get("stdout") or "") + (output.get("stderr") or "")
    elif output is None:
        text = ""
    else:
        text = json.dumps(output, separators=(",", ":"))
    text = text.strip()
    return text if len(text) <= limit else text[:limit] + " ..."


def results_table(detail: dict[str, Any]) -> Table:
    table = Table(title=f"{detail['command']} {detail['id']}: {detail['status']}")
    for col in ("agent", "status", "exit", "duration", "output / error"):
        table.add_column(col, overflow="fold")
    for r in detail["results"]:
        table.add_row(
            r["agent"],
            status_text(r["status"]),
            "-" if r.get("exit_code") is None else str(r["exit_code"]),
            duration(r.get("duration_s")),
            r.get("error") or _output(r),
        )
    return table


def tokens_table(tokens: list[dict[str, Any]]) -> Table:
    table = Table(title=f"API tokens ({sum(not t.get('revoked_at') for t in tokens)} active)")
    for col in ("id", "name", "scope", "created", "created by", "last used", "revoked"):
        table.add_column(col, overflow="fold")
    for t in tokens:
        revoked = t.get("revoked_at")
        table.add_row(
            t["id"],
            t["name"],
            t["scope"],
            ago(t["created_at"]),
            t["created_by"],
            ago(t.get("last_used_at")),
            Text(ago(revoked), style="red") if revoked else "-",
        )
    return table


def caller(who: dict[str, Any] | None) -> str:
    """A command's sent_by or canceled_by, in one line."""
    if not who:
        return "-"
    if who["kind"] == "token":
        text = f"token {who.get('token_name')} ({who.get('token_id')})"
    else:
        text = who["kind"]
    if who.get("address"):
        text += f" from {who['address']}"
    if who.get("at"):
        text += f" at {who['at']}"
    return text


def command_detail(detail: dict[str, Any]) -> Group:
    target = detail["target"] if isinstance(detail["target"], str) else ",".join(detail["target"])
    head = Text.assemble(
        ("command ", "bold"),
        f"{detail['command']} {json.dumps(detail['args'])}",
        "\n",
        ("target  ", "bold"),
        f"{target} ({detail['expected']} agents), source {detail['source']}",
        "\n",
        ("created ", "bold"),
        f"{detail['created_at']}  expires {detail['expires_at']}",
        "\n",
        ("status  ", "bold"),
        status_text(detail["status"]),
        "  ",
        _counts(detail["counts"]),
        "\n",
        ("sent by ", "bold"),
        caller(detail.get("sent_by")),
    )
    if detail.get("canceled_by"):
        head.append_text(
            Text.assemble("\n", ("canceled by ", "bold"), caller(detail["canceled_by"]))
        )
    return Group(head, results_table(detail))
