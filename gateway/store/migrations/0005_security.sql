-- Credentials of devices and operators. Key material is kept in clear in this table and
-- protected by the database file's mode (0600, set by the CLI when it writes credentials):
-- encrypting it with a key stored on the same disk would add nothing (docs/security.md).
CREATE TABLE credentials (
    id             INTEGER PRIMARY KEY,
    name           TEXT NOT NULL,
    -- "device" or "operator"
    role           TEXT NOT NULL,
    -- "oscore" (RFC 8613); the only kind so far
    kind           TEXT NOT NULL,
    -- the gateway's sender id is the device's recipient id and vice versa
    sender_id      BLOB NOT NULL,
    recipient_id   BLOB NOT NULL UNIQUE,
    master_secret  BLOB NOT NULL,
    master_salt    BLOB NOT NULL,
    -- bumped on every rotation, so a rotated context never reuses old sequence state
    generation     INTEGER NOT NULL DEFAULT 1,
    created_at     REAL NOT NULL,
    revoked_at     REAL,
    UNIQUE (role, name)
);

-- One row; bumped by every change to `credentials`, so the running gateway notices a
-- rotation or revocation by another process with one cheap query.
CREATE TABLE credentials_version (
    id       INTEGER PRIMARY KEY CHECK (id = 1),
    version  INTEGER NOT NULL
);
INSERT INTO credentials_version (id, version) VALUES (1, 0);
