"""MQTT connection discipline shared by every fleet process: TCP_NODELAY, capped
exponential backoff with jitter, and the one reconnect loop each process uses."""

from __future__ import annotations

import asyncio
import logging
import random
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import aiomqtt

from fleet_agent.tls import client_context, warn_if_insecure

if TYPE_CHECKING:
    from fleet_agent.settings import BrokerSettings

# Without TCP_NODELAY every QoS 1 round trip stalls on delayed ACKs (~40-90 ms instead of ~1 ms).
NODELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]


class Backoff:
    """Capped exponential backoff with full jitter, so a fleet never reconnects in lockstep."""

    def __init__(self, minimum: float, maximum: float, *, rng: random.Random | None = None) -> None:
        self.minimum = minimum
        self.maximum = max(maximum, minimum)
        self._attempt = 0
        self._rng = rng or random.Random()

    def reset(self) -> None:
        self._attempt = 0

    def next_delay(self) -> float:
        ceiling = min(self.maximum, self.minimum * 2**self._attempt)
        self._attempt = min(self._attempt + 1, 32)
        return self._rng.uniform(self.minimum / 2, ceiling)


class SessionFlag:
    """Remembers the session-present flag of the last CONNACK (aiomqtt drops it)."""

    def __init__(self, client: aiomqtt.Client) -> None:
        self.present: bool | None = None
        paho = client._client  # private: the flag is only visible in paho's callback
        original = paho.on_connect

        def on_connect(*args: Any) -> None:
            flags = args[2] if len(args) > 2 else None
            self.present = bool(getattr(flags, "session_present", False))
            if original is not None:
                original(*args)

        paho.on_connect = on_connect


def _fail_fast_on_early_close(client: aiomqtt.Client) -> None:
    """aiomqtt ignores a connection closed before the CONNACK and waits out its timeout.
    A broker that drops the client during the handshake (plain TCP to a TLS port, a refused
    client certificate) should fail the connection attempt at once, with a reason."""
    paho = client._client  # private, like SessionFlag: the close is only seen by paho
    original = paho.on_disconnect

    def on_disconnect(*args: Any) -> None:
        pending = client._connected  # private: the future __aenter__ is waiting on
        if client._lock.locked() and not pending.done():
            pending.set_exception(
                aiomqtt.MqttError(
                    "the broker closed the connection before accepting it (for example a"
                    " plain-TCP client on a TLS port, or a refused client certificate)"
                )
            )
        if original is not None:
            original(*args)

    paho.on_disconnect = on_disconnect


def make_client(
    settings: BrokerSettings,
    *,
    identifier: str,
    username: str,
    will: aiomqtt.Will | None = None,
    clean_session: bool = False,
) -> aiomqtt.Client:
    """A client for the configured broker; :class:`ConfigError` if a TLS or password file
    cannot be used."""
    context = client_context(settings)
    warn_if_insecure(settings)
    client = aiomqtt.Client(
        settings.broker_host,
        settings.broker_port,
        identifier=identifier,
        username=username,
        password=settings.mqtt_password(),
        clean_session=clean_session,
        keepalive=settings.keepalive,
        will=will,
        socket_options=NODELAY,
        tls_context=context,
        timeout=10,
    )
    _fail_fast_on_early_close(client)
    return client


async def stay_connected(
    client: aiomqtt.Client,
    session: Callable[[aiomqtt.Client], Awaitable[None]],
    *,
    backoff: Backoff,
    log: logging.Logger,
    on_disconnect: Callable[[], None] | None = None,
) -> None:
    """Run ``session`` on every (re)connection until it returns; reconnect on MqttError.

    Each state change is logged once: the first failure as a warning, then silence until
    the connection is back.
    """
    where = f"{client._hostname}:{client._port}"  # private, for the log line only
    failing = False
    while True:
        try:
            async with client:
                log.info("connected to MQTT broker %s", where)
                failing = False
                backoff.reset()
                await session(client)
                return
        except* aiomqtt.MqttError as group:
            if on_disconnect is not None:
                on_disconnect()
            if not failing:
                log.warning(
                    "MQTT broker %s unreachable or connection lost (%s); retrying with backoff",
                    where,
                    group.exceptions[0],
                )
                failing = True
        await asyncio.sleep(backoff.next_delay())
