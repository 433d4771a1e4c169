-- Readings reach each sink by a cursor over `readings` (`relay_cursors`), not by an outbox
-- row each: the sink's worker reads the routed readings after its cursor in id order,
-- publishes them, and moves the cursor past them in the transaction that settles the
-- batch. Only what cannot go at once enters the outbox: a reading whose publication failed
-- (to wait for its retry), or one held back behind an earlier entry of its device. A row,
-- a claim and a delete per reading and sink cost more CPU than storing the reading.
--
-- `reading_id`: every reading up to it has been dealt with (confirmed, dead-lettered, or
-- moved to the outbox). Created at the end of `readings` when a sink is first routed.
CREATE TABLE relay_cursors (
    sink        TEXT PRIMARY KEY,
    reading_id  INTEGER NOT NULL
);

-- Where an entry stands in the order of everything stored: 2 x the reading id for a
-- reading, 2 x the last reading id + 1 for an event or a replayed dead letter (after every
-- reading stored before it). Entries are planned in (pos, id) order, and an entry is due
-- only once the sink's cursor has passed the readings before it. Entries already queued
-- keep 0: they are older than anything the cursors will read, and keep their id order.
ALTER TABLE outbox ADD COLUMN pos INTEGER NOT NULL DEFAULT 0;
DROP INDEX outbox_sink;
CREATE INDEX outbox_sink ON outbox(sink, pos, id);
-- Is a device's reading held back behind an earlier entry of the same device?
CREATE INDEX outbox_device ON outbox(sink, device_id, pos);
-- A sink's routes, looked up for every reading read (else SQLite builds this index for
-- each statement).
CREATE INDEX routes_sink ON routes(sink, kind);

DROP TRIGGER events_outbox;
CREATE TRIGGER events_outbox AFTER INSERT ON events
BEGIN
    INSERT INTO outbox (sink, kind, ref_id, device_id, encoding, first_at, next_attempt_at, pos)
    SELECT r.sink, NEW.kind, NEW.id, coalesce(NEW.device_id, 0), r.encoding, NEW.at, NEW.at,
           2 * (SELECT coalesce(max(id), 0) FROM readings) + 1
    FROM routes r
    WHERE r.kind = NEW.kind AND NEW.device_type GLOB r.device_type AND NEW.device GLOB r.device
    GROUP BY r.route
    ORDER BY r.route;
END;

-- Everything a sink still has to send: its outbox entries and the routed readings after
-- its cursor (one row per reading and route, as the outbox would hold them). For operators
-- and `gateway relay status`; the worker reads the two apart.
CREATE VIEW relay_queue AS
    SELECT o.sink, o.kind, o.ref_id, o.device_id, o.state, o.attempt, o.first_at
    FROM outbox o
    UNION ALL
    SELECT sink, 'reading', ref_id, device_id, 'pending', 0, first_at FROM (
        -- CROSS JOIN: from each cursor, a range of `readings` by id (not a scan of them all)
        SELECT c.sink, x.id AS ref_id, x.device_id, x.received_at AS first_at
        FROM relay_cursors c
        CROSS JOIN readings x
        CROSS JOIN devices d
        CROSS JOIN routes r
        WHERE x.id > c.reading_id AND d.id = x.device_id AND r.sink = c.sink
            AND r.kind = 'reading' AND d.type GLOB r.device_type AND d.name GLOB r.device
        GROUP BY c.sink, x.id, r.route
    );
