-- The relay's transactional outbox: routes (copied from the config at every start),
-- outbox entries written by triggers in the same transaction as what they announce,
-- dead letters, non-reading events, and the live figures of each sink for the CLI.

-- One row per (route, kind, type glob, device glob); `route` is the index in [[routes]].
-- The triggers group by `route`, so a route with several globs still gives one entry.
CREATE TABLE routes (
    route        INTEGER NOT NULL,
    sink         TEXT NOT NULL,
    kind         TEXT NOT NULL,
    device_type  TEXT NOT NULL,
    device       TEXT NOT NULL,
    encoding     TEXT NOT NULL,
    PRIMARY KEY (route, kind, device_type, device)
);

-- Alerts, shopping-list events, command results: anything relayed that is not a reading.
-- The device's name and type are kept with the event: an alert may outlive its device.
CREATE TABLE events (
    id           INTEGER PRIMARY KEY,
    kind         TEXT NOT NULL,
    device_id    INTEGER REFERENCES devices(id) ON DELETE SET NULL,
    device       TEXT NOT NULL,
    device_type  TEXT NOT NULL,
    at           REAL NOT NULL,
    body         TEXT NOT NULL
);
CREATE INDEX events_device ON events(device_id, id);

-- Unfinished deliveries only: a confirmed entry is deleted, a dead one moves to
-- dead_letters. AUTOINCREMENT: ids never come back, so id order is commit order.
CREATE TABLE outbox (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    sink             TEXT NOT NULL,
    -- 'reading' (ref_id is readings.id) or an event kind (ref_id is events.id)
    kind             TEXT NOT NULL,
    ref_id           INTEGER NOT NULL,
    device_id        INTEGER NOT NULL,
    encoding         TEXT NOT NULL,
    state            TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'in_flight')),
    -- failed attempts so far
    attempt          INTEGER NOT NULL DEFAULT 0,
    first_at         REAL NOT NULL,
    next_attempt_at  REAL NOT NULL,
    last_error       TEXT
);
CREATE INDEX outbox_sink ON outbox(sink, id);
-- retention keeps readings that still have to be delivered (or replayed)
CREATE INDEX outbox_ref ON outbox(kind, ref_id);

CREATE TABLE dead_letters (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    outbox_id   INTEGER NOT NULL,
    sink        TEXT NOT NULL,
    kind        TEXT NOT NULL,
    ref_id      INTEGER NOT NULL,
    device_id   INTEGER NOT NULL,
    encoding    TEXT NOT NULL,
    attempt     INTEGER NOT NULL,
    first_at    REAL NOT NULL,
    dead_at     REAL NOT NULL,
    -- permanent | max_attempts | max_age | source_missing | no_sink
    reason      TEXT NOT NULL,
    last_error  TEXT
);
CREATE INDEX dead_letters_sink ON dead_letters(sink, id);
CREATE INDEX dead_letters_ref ON dead_letters(kind, ref_id);

-- Written by the running gateway every relay.status_interval; read by `gateway relay status`.
CREATE TABLE relay_status (
    sink         TEXT PRIMARY KEY,
    connected    INTEGER NOT NULL,
    sent         INTEGER NOT NULL,
    retries      INTEGER NOT NULL,
    dead         INTEGER NOT NULL,
    dropped      INTEGER NOT NULL,
    sent_per_s   REAL NOT NULL,
    last_error   TEXT,
    last_error_at REAL,
    updated_at   REAL NOT NULL
);

-- INSERT OR IGNORE of a duplicate reading inserts nothing, so it fires nothing.
CREATE TRIGGER readings_outbox AFTER INSERT ON readings
BEGIN
    INSERT INTO outbox (sink, kind, ref_id, device_id, encoding, first_at, next_attempt_at)
    SELECT r.sink, 'reading', NEW.id, NEW.device_id, r.encoding, NEW.received_at, NEW.received_at
    FROM routes r JOIN devices d ON d.id = NEW.device_id
    WHERE r.kind = 'reading' AND d.type GLOB r.device_type AND d.name GLOB r.device
    GROUP BY r.route
    ORDER BY r.route;
END;

CREATE TRIGGER events_outbox AFTER INSERT ON events
BEGIN
    INSERT INTO outbox (sink, kind, ref_id, device_id, encoding, first_at, next_attempt_at)
    SELECT r.sink, NEW.kind, NEW.id, coalesce(NEW.device_id, 0), r.encoding, NEW.at, NEW.at
    FROM routes r
    WHERE r.kind = NEW.kind AND NEW.device_type GLOB r.device_type AND NEW.device GLOB r.device
    GROUP BY r.route
    ORDER BY r.route;
END;
