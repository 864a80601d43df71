"""Helpers for black-box tests of fleet against real brokers, for agent and controller tests.

- :func:`run_amqtt`, :func:`run_mosquitto` and :func:`run_broker` start a broker on a free port
  and yield its :class:`BrokerEndpoint`;
- :class:`Probe` is an MQTT client that records every result and status the fleet publishes and
  lets a test wait for one, with a timeout, instead of sleeping;
- :class:`AgentRunner` starts in-process agents (restartable on the same state dir) and
  :class:`AgentProcess` runs ``python -m fleet_agent`` as a real process that can be SIGKILLed;
- :class:`FaultProxy` sits between clients and a broker and cuts, stalls or refuses their
  connections; :func:`run_traced_agent` exposes an agent's ``online`` event as a
  :class:`TracedEvent`, whose clears can be awaited too;
- :class:`TestCA` issues throwaway certificates for TLS tests;
- :class:`BrokerProcess` and :class:`ControllerProcess` run the broker and the controller as
  processes that can be SIGKILLed and restarted on the same ports; :func:`admin_token` writes
  an admin API token into a controller database and :func:`bearer` makes its header.
"""

from fleet_testing.agents import AgentProcess, AgentRunner, is_gone, wait_process_exit
from fleet_testing.brokers import (
    BROKER_KINDS,
    BROKER_YAML,
    DEFAULT_TIMEOUT,
    MOSQUITTO,
    BrokerEndpoint,
    free_port,
    mosquitto_pub,
    require,
    run_amqtt,
    run_broker,
    run_mosquitto,
    run_secure_broker,
    secure_mosquitto_config,
    stop_process,
)
from fleet_testing.certs import Issued, TestCA, mosquitto_tls_config
from fleet_testing.faults import FaultProxy, TracedEvent, run_traced_agent
from fleet_testing.probe import Probe, Seen, with_id
from fleet_testing.processes import (
    PROCESS_START_TIMEOUT,
    BrokerProcess,
    ControllerProcess,
    admin_token,
    bearer,
)

__all__ = [
    "BROKER_KINDS",
    "BROKER_YAML",
    "DEFAULT_TIMEOUT",
    "MOSQUITTO",
    "PROCESS_START_TIMEOUT",
    "AgentProcess",
    "AgentRunner",
    "BrokerEndpoint",
    "BrokerProcess",
    "ControllerProcess",
    "FaultProxy",
    "Issued",
    "Probe",
    "Seen",
    "TestCA",
    "TracedEvent",
    "admin_token",
    "bearer",
    "free_port",
    "is_gone",
    "mosquitto_pub",
    "mosquitto_tls_config",
    "require",
    "run_amqtt",
    "run_broker",
    "run_mosquitto",
    "run_secure_broker",
    "run_traced_agent",
    "secure_mosquitto_config",
    "stop_process",
    "wait_process_exit",
    "with_id",
]
