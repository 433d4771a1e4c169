-- Versions of what worker processes sharing this database must notice of each other:
-- registrations (the device list and its observers), alerts and shopping lists (their
-- observers). Bumped by triggers, so a worker learns of another's change with one cheap
-- query instead of comparing tables. Readings need no counter: their ids only grow.
CREATE TABLE change_versions (
    topic    TEXT PRIMARY KEY,
    version  INTEGER NOT NULL
) WITHOUT ROWID;
INSERT INTO change_versions (topic, version) VALUES ('registrations', 0), ('alerts', 0), ('lists', 0);

CREATE TRIGGER registrations_changed_insert AFTER INSERT ON registrations
BEGIN
    UPDATE change_versions SET version = version + 1 WHERE topic = 'registrations';
END;
CREATE TRIGGER registrations_changed_update AFTER UPDATE ON registrations
BEGIN
    UPDATE change_versions SET version = version + 1 WHERE topic = 'registrations';
END;
CREATE TRIGGER registrations_changed_delete AFTER DELETE ON registrations
BEGIN
    UPDATE change_versions SET version = version + 1 WHERE topic = 'registrations';
END;
CREATE TRIGGER alerts_changed_insert AFTER INSERT ON alerts
BEGIN
    UPDATE change_versions SET version = version + 1 WHERE topic = 'alerts';
END;
CREATE TRIGGER alerts_changed_update AFTER UPDATE ON alerts
BEGIN
    UPDATE change_versions SET version = version + 1 WHERE topic = 'alerts';
END;
CREATE TRIGGER lists_changed_insert AFTER INSERT ON shopping_list_items
BEGIN
    UPDATE change_versions SET version = version + 1 WHERE topic = 'lists';
END;
CREATE TRIGGER lists_changed_update AFTER UPDATE ON shopping_list_items
BEGIN
    UPDATE change_versions SET version = version + 1 WHERE topic = 'lists';
END;
CREATE TRIGGER lists_changed_delete AFTER DELETE ON shopping_list_items
BEGIN
    UPDATE change_versions SET version = version + 1 WHERE topic = 'lists';
END;
