"""amqtt plugins that give every MQTT client one identity: its password is checked against the
argon2 file ``fleet credentials`` writes, its client id must be its username, and it may only
use the topics its role allows (``credentials.topic_rules``, the same rules mosquitto gets).

Only the controller imports this module (amqtt is not an agent dependency)."""

from __future__ import annotations

import asyncio
import hmac
import logging
from dataclasses import dataclass
from pathlib import Path

from amqtt.adapters import ReaderAdapter, WriterAdapter
from amqtt.broker import Broker, BrokerContext
from amqtt.contexts import Action, BaseContext
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.mqtt.connack import NOT_AUTHORIZED, ConnackPacket
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.plugins.authentication import FileAuthPlugin, PasswordFileError
from amqtt.plugins.base import BaseTopicPlugin
from amqtt.session import Session
from amqtt.utils import gen_client_id

from fleet_agent.errors import ConfigError
from fleet_agent.protocol import DEFAULT_PREFIX
from fleet_controller.credentials import (
    Access,
    Role,
    filter_covers,
    load_users,
    topic_rules,
    valid_prefix,
)

log = logging.getLogger(__name__)


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class FleetAuthPlugin(FileAuthPlugin):  # type: ignore[misc]  # amqtt is untyped
    """amqtt's argon2 password file, re-read when it changes (``fleet credentials add`` works
    on a running broker), and a client id that must equal the username."""

    def __init__(self, context: BrokerContext) -> None:
        super().__init__(context)
        self._stamp = _stamp(Path(self._get_config_option("password-file", "")))
        self._verified: dict[str, tuple[str, str]] = {}

    def _reload_if_changed(self) -> None:
        path = Path(self._get_config_option("password-file", ""))
        stamp = _stamp(path)
        if stamp == self._stamp:
            return
        previous: dict[str, str] = self._users  # type: ignore[has-type]
        self._users = {}
        try:
            self._read_password_file()
        except PasswordFileError as exc:
            log.error("keeping the previous MQTT users: %s", exc)
            self._users = previous
            return
        self._stamp = stamp

    async def authenticate(self, *, session: Session) -> bool | None:
        if not session.username:
            log.warning("MQTT login refused: client %r sent no username", session.client_id)
            return False
        if session.client_id != session.username:
            log.warning(
                "MQTT login refused: client id %r is not its username %r",
                session.client_id,
                session.username,
            )
            return False
        self._reload_if_changed()
        stored: str | None = self._users.get(session.username)
        password: str = session.password or ""
        remembered = self._verified.get(session.username)
        if (
            stored is not None
            and remembered is not None
            and remembered[1] == stored
            and hmac.compare_digest(remembered[0].encode(), password.encode())
        ):
            return True
        if stored is not None and await super().authenticate(session=session):
            # argon2 is slow on purpose: a reconnecting fleet pays it once per agent, not
            # once per login (and amqtt checks each login twice).
            self._verified[session.username] = (password, stored)
            return True
        log.warning("MQTT login refused: unknown user or wrong password for %r", session.username)
        return False


@dataclass(frozen=True)
class _Roles:
    stamp: tuple[int, int, int] | None
    roles: dict[str, Role]


class FleetTopicPlugin(BaseTopicPlugin):  # type: ignore[misc]
    """Per-role topic ACL: subscribing (and receiving) needs read access to every topic the
    filter could match; publishing needs write access to the topic."""

    @dataclass
    class Config:
        users_file: str = ""
        prefix: str = DEFAULT_PREFIX

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        self._path = Path(self._get_config_option("users-file", ""))
        self._prefix = valid_prefix(str(self._get_config_option("prefix", DEFAULT_PREFIX)))
        self._roles = _Roles(None, {})
        self._reload_if_changed()

    def _reload_if_changed(self) -> None:
        stamp = _stamp(self._path)
        if stamp == self._roles.stamp:
            return
        try:
            if stamp is None:
                raise ConfigError(f"{self._path} does not exist")
            roles = {user.name: user.role for user in load_users(self._path).values()}
        except ConfigError as exc:
            log.error("keeping the previous MQTT roles: %s", exc)
            return
        self._roles = _Roles(stamp, roles)

    async def topic_filtering(
        self,
        *,
        session: Session | None = None,
        topic: str | None = None,
        action: Action | None = None,
    ) -> bool | None:
        if session is None or not session.username or topic is None:
            return False
        self._reload_if_changed()
        role = self._roles.roles.get(session.username)
        if role is None:
            return False
        need = Access.WRITE if action == Action.PUBLISH else Access.READ
        allowed = any(
            access is need and filter_covers(pattern, topic)
            for access, pattern in topic_rules(session.username, role, self._prefix)
        )
        if not allowed and action != Action.RECEIVE:
            log.warning("MQTT %s of %r refused for %r (%s)", action, topic, session.username, role)
        return allowed


class AuthenticatingBroker(Broker):  # type: ignore[misc]
    """amqtt looks up, takes over or (clean session) deletes the session named by a CONNECT's
    client id before it checks the password: any client could wipe or hijack an agent's
    session. This broker checks credentials first, on the fresh session."""

    async def _initialize_client_session(
        self, reader: ReaderAdapter, writer: WriterAdapter, remote_address: str, remote_port: int
    ) -> tuple[BrokerProtocolHandler, Session]:
        try:
            handler, incoming = await BrokerProtocolHandler.init_from_connect(
                reader, writer, self.plugins_manager
            )
        except (AMQTTError, MQTTError, NoDataError):
            await writer.close()  # amqtt leaves the socket to the garbage collector
            raise
        listener = next(iter(self.listeners_config.values()))  # unused by _authenticate
        if not await self._authenticate(incoming, listener):
            await ConnackPacket.build(0, NOT_AUTHORIZED).to_stream(writer)
            await writer.close()
            raise MQTTError(f"login refused for client {incoming.client_id!r}")
        # amqtt publishes a Last Will without asking the topic plugins: a client could send
        # through its will what its ACL forbids it to publish (another agent's commands).
        if incoming.will_flag and not await self._topic_filtering(
            incoming, incoming.will_topic, Action.PUBLISH
        ):
            await ConnackPacket.build(0, NOT_AUTHORIZED).to_stream(writer)
            await writer.close()
            raise MQTTError(
                f"client {incoming.client_id!r} may not publish its will on {incoming.will_topic!r}"
            )
        # The rest is amqtt 0.12's own session lookup (plus will_retain, which it forgets).
        session = incoming
        if session.clean_session:
            if session.client_id:
                await self._delete_session(session.client_id)
            else:
                session.client_id = gen_client_id()
            session.parent = 0
        elif session.client_id in self._sessions:
            existing, _ = self._sessions[session.client_id]
            for name in (
                "will_flag",
                "will_message",
                "will_topic",
                "will_qos",
                "will_retain",
                "keep_alive",
            ):
                setattr(existing, name, getattr(session, name))
            existing.username = session.username
            existing.password = session.password
            session = existing
            session.parent = 1
        else:
            session.parent = 0
        delay = self.config.get("timeout-disconnect-delay", 0)
        if session.keep_alive > 0 and isinstance(delay, int):
            session.keep_alive += delay
        return handler, session

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        """Retained messages for one of ``session``'s own subscriptions, each only if the
        session may receive it. amqtt calls this on connect for *every* client's filters and
        asks no topic plugin, which handed any login other agents' retained messages."""
        topic_filter, qos = subscription
        subscribers = self._subscriptions.get(topic_filter, ())
        if not any(s.client_id == session.client_id for s, _ in subscribers):
            return
        handler = self._get_handler(session)
        if handler is None:
            return
        sends = [
            asyncio.ensure_future(
                handler.mqtt_publish(
                    retained.topic, retained.data, min(qos, retained.qos or qos), retain=True
                )
            )
            for topic, retained in list(self._retained_messages.items())
            if self._matches(topic, topic_filter)
            and await self._topic_filtering(session, topic, Action.RECEIVE)
        ]
        if sends:
            await asyncio.wait(sends)
