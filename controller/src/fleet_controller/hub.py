"""In-process notifications: who is waiting for which command to change."""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import Iterable, Iterator


class Hub:
    """Wakes waiters (``?wait``, live views) when a command's deliveries change."""

    def __init__(self) -> None:
        self._waiters: defaultdict[str, set[asyncio.Event]] = defaultdict(set)
        self._any: set[asyncio.Event] = set()

    def notify(self, command_ids: Iterable[str]) -> None:
        for command_id in command_ids:
            for event in self._waiters.get(command_id, ()):
                event.set()
        for event in self._any:
            event.set()

    @contextlib.contextmanager
    def watch(self, command_id: str | None = None) -> Iterator[asyncio.Event]:
        """An event set on every change to ``command_id`` (or to any command if None)."""
        event = asyncio.Event()
        bucket = self._any if command_id is None else self._waiters[command_id]
        bucket.add(event)
        try:
            yield event
        finally:
            bucket.discard(event)
            if command_id is not None and not bucket:
                self._waiters.pop(command_id, None)
