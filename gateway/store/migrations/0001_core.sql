-- Devices, their registrations, and readings (one row per measurement).
CREATE TABLE devices (
    id          INTEGER PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    type        TEXT NOT NULL,
    created_at  REAL NOT NULL,
    last_seen   REAL,
    -- where the device's latest message came from ("host:port"); commands and
    -- observations follow it
    address     TEXT,
    online      INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE registrations (
    id             TEXT PRIMARY KEY,
    device_id      INTEGER NOT NULL UNIQUE REFERENCES devices(id) ON DELETE CASCADE,
    lifetime       INTEGER NOT NULL,
    registered_at  REAL NOT NULL,
    updated_at     REAL NOT NULL,
    expires_at     REAL NOT NULL,
    address        TEXT,
    links          TEXT NOT NULL DEFAULT '',
    queue_mode     INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX registrations_expiry ON registrations(expires_at);

CREATE TABLE readings (
    id           INTEGER PRIMARY KEY,
    device_id    INTEGER NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
    measurement  TEXT NOT NULL,
    -- no declared type: SQLite keeps integers, reals and text as sent; `kind` tells
    -- bools ('b') from numbers ('n') and strings ('s')
    value        NOT NULL,
    kind         TEXT NOT NULL,
    unit         TEXT,
    device_time  REAL,
    received_at  REAL NOT NULL,
    seq          INTEGER,
    -- idempotency key: a device retrying a lost request must not create a duplicate
    dedup_key    TEXT
);
CREATE UNIQUE INDEX readings_dedup ON readings(device_id, dedup_key) WHERE dedup_key IS NOT NULL;
CREATE INDEX readings_device_measurement ON readings(device_id, measurement, id);
CREATE INDEX readings_received ON readings(received_at);
