-- readings loses its primary-key index (sql/001_schema.sql says why; warehouse/load.py why reading_id stays
-- unique without it). DuckDB cannot drop a primary key by ALTER, so the table is rebuilt: the same columns in
-- the same order with the same NOT NULLs, rows copied in their physical order (a compacted warehouse stays
-- compacted). The old table's blocks, index included, are freed for reuse; the next compaction (rpm_daily)
-- gives the space back to the file system. On a new warehouse the table is empty and this costs nothing.
CREATE TABLE readings_005 (
    reading_id      VARCHAR NOT NULL,
    patient_id      VARCHAR NOT NULL,
    device_id       VARCHAR NOT NULL,
    metric          VARCHAR NOT NULL,
    loinc           VARCHAR NOT NULL,
    value           DOUBLE NOT NULL,
    diastolic       DOUBLE,
    unit            VARCHAR NOT NULL,
    unit_sent       VARCHAR NOT NULL,
    source          VARCHAR,
    measured_at     TIMESTAMPTZ NOT NULL,
    utc_offset_min  INTEGER NOT NULL,
    received_at     TIMESTAMPTZ NOT NULL,
    loaded_at       TIMESTAMPTZ NOT NULL,
    msg_id          VARCHAR NOT NULL,
    segment         VARCHAR NOT NULL,
    record_no       INTEGER NOT NULL,
    item_no         INTEGER NOT NULL,
    extra           JSON,
    run_id          VARCHAR,
    manual          BOOLEAN DEFAULT false
);
INSERT INTO readings_005 BY NAME SELECT * FROM readings;
DROP TABLE readings;
ALTER TABLE readings_005 RENAME TO readings;
