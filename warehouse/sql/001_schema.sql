-- Clinical warehouse schema (encrypted DuckDB file). Idempotent: safe to run on every connect.

-- Registry: patients are pseudonymous ids here; names, MRNs and dates of birth arrive with the registry issue.
CREATE TABLE IF NOT EXISTS patients (
    patient_id  VARCHAR PRIMARY KEY,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
-- IANA zone of the patient's home: billing, adherence and the daily marts count its calendar days
-- (010_marts.sql with_local_time).
ALTER TABLE patients ADD COLUMN IF NOT EXISTS time_zone VARCHAR;

CREATE TABLE IF NOT EXISTS devices (
    device_id   VARCHAR PRIMARY KEY,       -- also the device's broker login
    kind        VARCHAR,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Device -> patient binding over time. A re-issued device gets a new row; readings are attributed by the
-- enrollment valid at their *measured* time, so two patients' data never mix.
CREATE TABLE IF NOT EXISTS enrollments (
    device_id   VARCHAR NOT NULL,
    patient_id  VARCHAR NOT NULL,
    valid_from  TIMESTAMPTZ NOT NULL,
    valid_to    TIMESTAMPTZ,               -- NULL: still enrolled
    PRIMARY KEY (device_id, valid_from)
);

-- Canonical readings: one row per reading_id (the idempotency key: device, metric, measured instant).
-- No primary-key index: the load keeps reading_id unique (warehouse/load.py says why that holds), and
-- DuckDB 1.5.5 rewrites a table's whole ART index at every checkpoint — at 10M readings a run of 5,000
-- rewrote most of the file (bench/readings_key.py; migrations/005 drops it from existing warehouses).
CREATE TABLE IF NOT EXISTS readings (
    reading_id      VARCHAR NOT NULL,
    patient_id      VARCHAR NOT NULL,
    device_id       VARCHAR NOT NULL,
    metric          VARCHAR NOT NULL,
    loinc           VARCHAR NOT NULL,
    value           DOUBLE NOT NULL,       -- canonical UCUM unit; systolic for blood pressure
    diastolic       DOUBLE,                -- blood pressure only
    unit            VARCHAR NOT NULL,      -- canonical UCUM unit
    unit_sent       VARCHAR NOT NULL,
    source          VARCHAR,               -- glucose: meter | cgm
    measured_at     TIMESTAMPTZ NOT NULL,  -- UTC instant
    utc_offset_min  INTEGER NOT NULL,      -- the device's offset, to recover the patient-local time
    received_at     TIMESTAMPTZ NOT NULL,
    loaded_at       TIMESTAMPTZ NOT NULL,
    msg_id          VARCHAR NOT NULL,
    segment         VARCHAR NOT NULL,
    record_no       INTEGER NOT NULL,
    item_no         INTEGER NOT NULL,
    extra           JSON,                  -- fields outside contract v1, kept verbatim
    run_id          VARCHAR
);

-- Every item that did not load, with every rule it broke. Raw bytes kept for replay after a fix.
CREATE TABLE IF NOT EXISTS quarantine (
    row_key         VARCHAR PRIMARY KEY,   -- segment:record:item
    segment         VARCHAR NOT NULL,
    record_no       INTEGER NOT NULL,
    item_no         INTEGER NOT NULL,
    device_id       VARCHAR,
    reading_id      VARCHAR,
    reasons         VARCHAR[] NOT NULL,
    detail          VARCHAR,
    raw             BLOB,
    received_at     TIMESTAMPTZ NOT NULL,
    quarantined_at  TIMESTAMPTZ NOT NULL,
    run_id          VARCHAR
);

-- Items whose reading was already loaded (redelivery, device retry): counted, not loaded twice.
CREATE TABLE IF NOT EXISTS duplicates (
    row_key         VARCHAR PRIMARY KEY,
    reading_id      VARCHAR NOT NULL,
    segment         VARCHAR NOT NULL,
    record_no       INTEGER NOT NULL,
    item_no         INTEGER NOT NULL,
    received_at     TIMESTAMPTZ NOT NULL,
    run_id          VARCHAR
);

-- Ledger of processed landing segments, committed in the same transaction as the rows they produced.
CREATE TABLE IF NOT EXISTS segments (
    segment         VARCHAR PRIMARY KEY,
    messages        INTEGER NOT NULL,      -- MQTT messages in the segment
    items           INTEGER NOT NULL,      -- readings (an unreadable message counts as one item)
    loaded          INTEGER NOT NULL,
    quarantined     INTEGER NOT NULL,
    duplicates      INTEGER NOT NULL,
    processed_at    TIMESTAMPTZ NOT NULL,
    run_id          VARCHAR
);

-- Staging of the batch in flight (inside the encrypted file: it holds PHI). Emptied by the load.
CREATE TABLE IF NOT EXISTS stg_candidates (
    batch_id VARCHAR NOT NULL, row_key VARCHAR NOT NULL, segment VARCHAR, record_no INTEGER, item_no INTEGER,
    device_id VARCHAR, msg_id VARCHAR, metric VARCHAR, unit VARCHAR, unit_key VARCHAR,
    value_sent DOUBLE, diastolic_sent DOUBLE, value DOUBLE, diastolic DOUBLE, canonical_unit VARCHAR,
    loinc VARCHAR, source VARCHAR, measured_at TIMESTAMPTZ, utc_offset_min INTEGER, has_time BOOLEAN,
    received_at TIMESTAMPTZ, seconds_ahead DOUBLE, reading_id VARCHAR, extra VARCHAR, raw BLOB,
    patient_id VARCHAR
);
CREATE TABLE IF NOT EXISTS stg_rejects (
    batch_id VARCHAR NOT NULL, row_key VARCHAR NOT NULL, segment VARCHAR, record_no INTEGER, item_no INTEGER,
    device_id VARCHAR, received_at TIMESTAMPTZ, reason VARCHAR, detail VARCHAR, raw BLOB
);
CREATE TABLE IF NOT EXISTS stg_segments (
    batch_id VARCHAR NOT NULL, segment VARCHAR NOT NULL, messages INTEGER NOT NULL
);
-- Verdicts of the validation suite for the staged batch: only failing rows appear.
CREATE TABLE IF NOT EXISTS stg_verdicts (
    batch_id VARCHAR NOT NULL, row_key VARCHAR NOT NULL, reasons VARCHAR[] NOT NULL
);
CREATE TABLE IF NOT EXISTS stg_validated (
    batch_id VARCHAR PRIMARY KEY, rows_checked INTEGER NOT NULL, validated_at TIMESTAMPTZ NOT NULL
);
