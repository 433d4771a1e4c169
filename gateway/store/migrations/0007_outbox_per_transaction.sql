-- Readings' outbox entries are written by the store writer, one statement per transaction
-- for all the readings it inserted (`ENQUEUE_READINGS` in gateway/store/writer.py), in
-- the same order and with the same rows as this trigger wrote them one reading at a time.
-- A trigger program per inserted row cost SQLite about 9 µs per reading; the statement
-- costs about 3. Events keep their trigger: they are few. (Since migration 0008 readings
-- have no outbox entries: each sink reads them through its cursor.)
DROP TRIGGER readings_outbox;
