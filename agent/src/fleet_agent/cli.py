"""The ``fleet-agent`` console script."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

from fleet_agent.agent import Agent
from fleet_agent.errors import ConfigError
from fleet_agent.settings import AgentSettings, parse_agent_settings
from fleet_agent.tls import client_context


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


async def serve(settings: AgentSettings) -> None:
    """Run an agent until SIGINT or SIGTERM, then shut it down gracefully."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with Agent(settings):
        await stop.wait()
        logging.getLogger("fleet_agent").info("signal received, shutting down")


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = parse_agent_settings(argv)
        client_context(settings)  # unusable TLS files end here in one line, before any work
        configure_logging(settings.log_level)
        asyncio.run(serve(settings))
    except ConfigError as exc:
        print(f"fleet-agent: {exc}", file=sys.stderr)
        return 2
    return 0
