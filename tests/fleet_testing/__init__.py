"""Helpers for black-box tests of fleet against real brokers, for agent and controller tests.

- :func:`run_amqtt`, :func:`run_mosquitto` and :func:`run_broker` start a broker on a free port
  and yield its :class:`BrokerEndpoint`;
- :class:`Probe` is an MQTT client that records every result and status the fleet publishes and
  lets a test wait for one, with a timeout, instead of sleeping;
- :class:`AgentRunner` starts in-process agents (restartable on the same state dir) and
  :class:`AgentProcess` runs ``python -m fleet_agent`` as a real process that can be SIGKILLed.
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
    run_amqtt,
    run_broker,
    run_mosquitto,
    stop_process,
)
from fleet_testing.probe import Probe, Seen, with_id

__all__ = [
    "BROKER_KINDS",
    "BROKER_YAML",
    "DEFAULT_TIMEOUT",
    "MOSQUITTO",
    "AgentProcess",
    "AgentRunner",
    "BrokerEndpoint",
    "Probe",
    "Seen",
    "free_port",
    "is_gone",
    "mosquitto_pub",
    "run_amqtt",
    "run_broker",
    "run_mosquitto",
    "stop_process",
    "wait_process_exit",
    "with_id",
]
