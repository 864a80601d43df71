"""`fleet controller`: the controller alone, for real deployments (e.g. against mosquitto)."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence

from fastapi import FastAPI

from fleet_agent.errors import FleetError
from fleet_agent.settings import parse_settings
from fleet_agent.tls import client_context
from fleet_controller.app import create_app
from fleet_controller.serve import bind_tcp, http_server, stop_on_signals
from fleet_controller.settings import ControllerSettings

log = logging.getLogger("fleet_controller")


def parse_controller_settings(argv: Sequence[str] | None = None) -> ControllerSettings:
    return parse_settings(
        ControllerSettings,
        prog="fleet controller",
        description="Run the fleet controller: HTTP API on one side, MQTT broker on the other.",
        env_prefix="FLEET_CONTROLLER_",
        argv=argv,
    )


async def serve(settings: ControllerSettings) -> None:
    sock = bind_tcp(settings.http_host, settings.http_port, what="HTTP", flag="--http-port")
    server = http_server(create_app(settings), log_level=settings.log_level.lower())
    stop = asyncio.Event()
    stop_on_signals(stop)
    task = asyncio.create_task(server.serve(sockets=[sock]), name="fleet-controller-http")
    log.info(
        "controller on http://%s:%d, broker %s:%d",
        settings.http_host,
        sock.getsockname()[1],
        settings.broker_host,
        settings.broker_port,
    )
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait([task, stopped], return_when=asyncio.FIRST_COMPLETED)
    server.should_exit = True
    await task
    stopped.cancel()
    sock.close()


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = parse_controller_settings(argv)
        client_context(settings)  # unusable TLS files end here in one line, not at app startup
        logging.basicConfig(
            level=settings.log_level.upper(),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        for noisy in ("amqtt", "transitions"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        asyncio.run(serve(settings))
    except FleetError as exc:
        print(f"fleet controller: {exc}", file=sys.stderr)
        return 2
    return 0


def app_from_env() -> FastAPI:
    """For `uvicorn --factory fleet_controller.main:app_from_env` (settings from the
    FLEET_CONTROLLER_* environment). Run exactly one worker: the MQTT client id is fixed."""
    return create_app(parse_controller_settings([]))
