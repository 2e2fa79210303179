-- Staging of a batch in flight (with 001_schema.sql's stg_ tables): the payload of each vitals batch message,
-- kept once per message. A batch item's raw is built from it only if the item goes to quarantine
-- (warehouse/load.py), instead of re-serialising every item of every CGM upload at the stage.
CREATE TABLE IF NOT EXISTS stg_messages (
    batch_id VARCHAR NOT NULL, segment VARCHAR NOT NULL, record_no INTEGER NOT NULL, payload BLOB NOT NULL
);
