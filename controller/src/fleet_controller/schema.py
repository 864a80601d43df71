"""SQLite schema and its migrations: created at start, upgraded in place, never downgraded."""

from __future__ import annotations

import sqlite3

from fleet_controller.errors import ConfigError

_MIGRATIONS: list[str] = [
    # 1: the first schema
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);
    CREATE TABLE commands (
        seq        INTEGER PRIMARY KEY AUTOINCREMENT,  -- cursor order
        id         TEXT NOT NULL UNIQUE,
        command    TEXT NOT NULL,
        args       TEXT NOT NULL,                      -- JSON object
        target     TEXT NOT NULL,                      -- JSON: "all", "a1" or ["a1", ...]
        source     TEXT NOT NULL,                      -- 'http' or 'mqtt'
        timeout    REAL,
        ttl        REAL NOT NULL,
        created_at TEXT NOT NULL,
        expires_at TEXT NOT NULL
    );
    CREATE INDEX commands_created ON commands (created_at);
    CREATE TABLE deliveries (
        command_id   TEXT NOT NULL,
        agent_id     TEXT NOT NULL,
        status       TEXT NOT NULL,
        rank         INTEGER NOT NULL,  -- 0 pending, 1 received, 2 running, 3 terminal
        swept        INTEGER NOT NULL DEFAULT 0,  -- expired by the controller, not the agent
        exit_code    INTEGER,
        output       TEXT,
        error        TEXT,
        published_at TEXT,
        received_at  TEXT,
        started_at   TEXT,
        finished_at  TEXT,
        updated_at   TEXT NOT NULL,
        PRIMARY KEY (command_id, agent_id)
    );
    CREATE INDEX deliveries_agent ON deliveries (agent_id, status);
    CREATE INDEX deliveries_open ON deliveries (rank) WHERE rank < 3;
    CREATE TABLE agents (
        id              TEXT PRIMARY KEY,
        state           TEXT NOT NULL,
        offline_reason  TEXT,
        last_seen       TEXT NOT NULL,
        connected_since TEXT,
        started_at      TEXT,
        version         TEXT,
        commands        TEXT NOT NULL DEFAULT '[]',
        host            TEXT NOT NULL DEFAULT '{}',
        latency_ms      REAL,
        first_seen      TEXT NOT NULL
    );
    """,
    # 2: redelivery bookkeeping, and id-less commands published by others
    """
    ALTER TABLE deliveries ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE deliveries ADD COLUMN last_sent_at TEXT;
    CREATE TABLE adhoc (
        seq        INTEGER PRIMARY KEY AUTOINCREMENT,
        target     TEXT NOT NULL,          -- an agent id or 'all'
        command    TEXT,                   -- NULL when the payload did not even parse
        seen_at    TEXT NOT NULL,
        expires_at TEXT NOT NULL
    );
    """,
    # 3: API tokens, and who sent or canceled each command
    """
    CREATE TABLE tokens (
        id            TEXT PRIMARY KEY,   -- public; the token string carries it
        name          TEXT NOT NULL,
        scope         TEXT NOT NULL,      -- 'read', 'operate' or 'admin'
        secret_sha256 TEXT NOT NULL,      -- hex digest; the secret itself is never stored
        created_at    TEXT NOT NULL,
        created_by    TEXT NOT NULL,
        last_used_at  TEXT,
        revoked_at    TEXT
    );
    ALTER TABLE commands ADD COLUMN sent_by TEXT;      -- JSON caller; NULL: before auditing
    ALTER TABLE commands ADD COLUMN canceled_by TEXT;  -- JSON caller, with the time
    """,
]

SCHEMA_VERSION = len(_MIGRATIONS)


def migrate(db: sqlite3.Connection) -> None:
    current = db.execute("PRAGMA user_version").fetchone()[0]
    if current > SCHEMA_VERSION:
        raise ConfigError(
            f"the database was written by a newer fleet (schema {current} > {SCHEMA_VERSION})"
        )
    for version in range(current, SCHEMA_VERSION):
        db.executescript(
            f"BEGIN; {_MIGRATIONS[version]}; PRAGMA user_version = {version + 1}; COMMIT;"
        )
