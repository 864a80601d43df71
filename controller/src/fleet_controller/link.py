"""The controller's one MQTT connection: it publishes commands and records everything the
fleet says (results, presence, and commands that others publish straight to the broker)."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

import aiomqtt

from fleet_agent.errors import PayloadError
from fleet_agent.mqtt import Backoff, make_client, stay_connected
from fleet_agent.protocol import (
    BROADCAST,
    AgentState,
    Command,
    TopicKind,
    Topics,
    decode_command,
    decode_result,
    decode_status,
    encode,
)
from fleet_controller.errors import BrokerUnavailable

if TYPE_CHECKING:
    from fleet_agent.signing import Signer
    from fleet_controller.settings import ControllerSettings
    from fleet_controller.store import Store

log = logging.getLogger(__name__)


class Link:
    def __init__(
        self, settings: ControllerSettings, store: Store, *, signer: Signer | None = None
    ) -> None:
        self.settings = settings
        self.signer = signer
        self.topics = Topics(settings.prefix)
        self.store = store
        self.connected = asyncio.Event()
        self.rejected: Counter[str] = Counter()
        """Dropped inbound messages, by topic kind."""
        self._client: aiomqtt.Client | None = None
        self.on_birth: Callable[[str, bool | None], None] | None = None
        """Called when an agent announces itself online, with its session-present flag."""

    async def run(self) -> None:
        """Stay connected forever (until cancelled)."""
        self._client = make_client(
            self.settings,
            identifier=self.settings.client_id,
            username=self.settings.mqtt_username,
        )
        backoff = Backoff(self.settings.reconnect_min, self.settings.reconnect_max)
        try:
            await stay_connected(
                self._client,
                self._session,
                backoff=backoff,
                log=log,
                on_disconnect=self.connected.clear,
            )
        finally:
            self.connected.clear()

    async def _session(self, client: aiomqtt.Client) -> None:
        await client.subscribe(
            [
                (self.topics.any_agent(kind), 1)
                for kind in (TopicKind.RESULT, TopicKind.STATUS, TopicKind.CMD)
            ]
        )
        self.connected.set()
        async for message in client.messages:
            self.on_message(str(message.topic), message.payload, message_retained=message.retain)

    def encode(self, topic: str, command: Command) -> bytes:
        """The payload of ``command`` on ``topic``: signed for that topic when there is a key.
        Every command the controller sends is encoded here."""
        return self.signer.encode(topic, command) if self.signer else encode(command)

    async def publish(self, topic: str, command: Command) -> None:
        """Publish at QoS 1 and wait for the broker's acknowledgement."""
        if self._client is None or not self.connected.is_set():
            raise BrokerUnavailable("the controller is not connected to the MQTT broker")
        try:
            await self._client.publish(topic, self.encode(topic, command), qos=1)
        except aiomqtt.MqttError as exc:
            raise BrokerUnavailable(f"publishing to the MQTT broker failed: {exc}") from exc

    async def clear_retained(self, topic: str) -> None:
        if self._client is not None and self.connected.is_set():
            try:
                await self._client.publish(topic, b"", qos=1, retain=True)
            except aiomqtt.MqttError as exc:
                log.warning("could not clear retained %s: %s", topic, exc)

    def on_message(self, topic: str, raw: object, *, message_retained: bool = False) -> None:
        """Record one inbound message. Never raises: bad input is logged, counted, dropped."""
        parsed = self.topics.parse(topic)
        if parsed is None:
            return
        payload = raw if isinstance(raw, bytes | bytearray) else str(raw or "").encode()
        limit = self.settings.result_payload_bytes
        try:
            if parsed.kind is TopicKind.RESULT:
                result = decode_result(bytes(payload), max_bytes=limit)
                if result.agent != parsed.agent_id:
                    raise PayloadError(f"result names agent {result.agent!r}, not the topic's")
                self.store.record_result(result)
            elif parsed.kind is TopicKind.STATUS:
                if not payload:
                    return  # a cleared retained status
                status = decode_status(bytes(payload), max_bytes=limit)
                if status.agent != parsed.agent_id:
                    raise PayloadError(f"status names agent {status.agent!r}, not the topic's")
                self.store.record_status(status)
                if status.state is AgentState.ONLINE and not message_retained and self.on_birth:
                    self.on_birth(status.agent, status.session_present)
            else:
                self._on_command(parsed.agent_id, bytes(payload))
        except PayloadError as exc:
            self.rejected[parsed.kind.value] += 1
            log.warning("dropped message on %s: %s", topic, exc.reason)

    def _on_command(self, target: str, payload: bytes) -> None:
        try:
            command = decode_command(payload, max_bytes=self.settings.max_payload_bytes)
        except PayloadError as exc:
            # The agents reject it and report why; here it is counted, and remembered so
            # that their rejections (under ids nobody announced) are recorded.
            self.rejected[TopicKind.CMD.value] += 1
            self.store.record_adhoc(target, exc.command, None)
            log.info(
                "invalid command on %s: %s",
                self.topics.cmd(target) if target != BROADCAST else self.topics.broadcast_cmd,
                exc.reason,
            )
            return
        if command.id is None:
            # The agent assigns an id; its first answer creates the record.
            self.store.record_adhoc(target, command.command, command.expires_at)
            return
        agents = None if target == BROADCAST else [target]
        self.store.record_foreign_command(command, target, agents)
