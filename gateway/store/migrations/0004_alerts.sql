-- Alerts raised by rules, and the shopping lists kept from stock levels.
--
-- One row per alert: raised, re-notified (last_notified_at, notify_count) and cleared in
-- place. The device's name and type are kept beside its id so an alert stays readable
-- after the device is gone. value and threshold are JSON text, so true, 3 and "x" come
-- back as what they were.
CREATE TABLE alerts (
    id                INTEGER PRIMARY KEY,
    rule              TEXT NOT NULL,
    device_id         INTEGER REFERENCES devices(id) ON DELETE SET NULL,
    device            TEXT NOT NULL,
    device_type       TEXT NOT NULL,
    kind              TEXT NOT NULL,
    severity          TEXT NOT NULL,
    state             TEXT NOT NULL CHECK (state IN ('open', 'cleared')),
    raised_at         REAL NOT NULL,
    cleared_at        REAL,
    last_notified_at  REAL NOT NULL,
    notify_count      INTEGER NOT NULL DEFAULT 1,
    value             TEXT,
    threshold         TEXT,
    message           TEXT NOT NULL,
    clear_message     TEXT,
    acknowledged_at   REAL
);
-- At most one open alert per rule and device, whatever the code above does.
CREATE UNIQUE INDEX alerts_one_open ON alerts(rule, device) WHERE state = 'open';
CREATE INDEX alerts_device ON alerts(device, raised_at);
CREATE INDEX alerts_raised ON alerts(raised_at);

-- Items on shopping lists: the engine's list state, enough to restore it after a restart.
-- levels is a JSON object, device name -> the level it reports (every device reporting low).
CREATE TABLE shopping_list_items (
    list_name   TEXT NOT NULL,
    item        TEXT NOT NULL,
    level       INTEGER NOT NULL,
    minimum     INTEGER NOT NULL,
    levels      TEXT NOT NULL,
    added_at    REAL NOT NULL,
    updated_at  REAL NOT NULL,
    PRIMARY KEY (list_name, item)
);
