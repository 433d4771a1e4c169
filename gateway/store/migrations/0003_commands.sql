-- Commands for devices: queued until the device can be reached, then sent once, settled with
-- the device's response. States and their allowed moves: gateway/core/commands.py.
CREATE TABLE commands (
    id                INTEGER PRIMARY KEY,
    device_id         INTEGER NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
    method            TEXT NOT NULL,
    path              TEXT NOT NULL,
    payload           BLOB,
    content_format    INTEGER,
    state             TEXT NOT NULL DEFAULT 'queued',
    created_at        REAL NOT NULL,
    -- NULL: the command never expires
    expires_at        REAL,
    attempts          INTEGER NOT NULL DEFAULT 0,
    sent_at           REAL,
    settled_at        REAL,
    response_code     TEXT,
    response_payload  BLOB,
    response_format   INTEGER,
    error             TEXT,
    -- who asked: "cli", "coap" (upstream) or "api"
    origin            TEXT NOT NULL DEFAULT 'api'
);
CREATE INDEX commands_open ON commands(state, device_id, id) WHERE state IN ('queued', 'sent');
CREATE INDEX commands_device ON commands(device_id, id);
