-- Registry of the clinical stream: who the patients are, who cares for them, how their devices are bound,
-- and the per-patient overrides clinicians set. Additive migrations: safe on every connect.

ALTER TABLE patients ADD COLUMN IF NOT EXISTS mrn VARCHAR;
ALTER TABLE patients ADD COLUMN IF NOT EXISTS given_name VARCHAR;
ALTER TABLE patients ADD COLUMN IF NOT EXISTS family_name VARCHAR;
ALTER TABLE patients ADD COLUMN IF NOT EXISTS birth_date DATE;
ALTER TABLE patients ADD COLUMN IF NOT EXISTS conditions VARCHAR[];

ALTER TABLE devices ADD COLUMN IF NOT EXISTS model VARCHAR;
ALTER TABLE devices ADD COLUMN IF NOT EXISTS serial VARCHAR;

-- A reading keyed in by hand (patient app) rather than transmitted by the device: never billable (99445/99454
-- require device-transmitted data).
ALTER TABLE readings ADD COLUMN IF NOT EXISTS manual BOOLEAN DEFAULT false;
ALTER TABLE stg_candidates ADD COLUMN IF NOT EXISTS manual BOOLEAN DEFAULT false;

CREATE TABLE IF NOT EXISTS clinicians (
    clinician_id VARCHAR PRIMARY KEY,
    name         VARCHAR,
    role         VARCHAR,           -- physician, nurse, care manager ...
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Care-team membership over time: a clinician sees a patient only while assigned.
CREATE TABLE IF NOT EXISTS care_team (
    clinician_id VARCHAR NOT NULL,
    patient_id   VARCHAR NOT NULL,
    since        TIMESTAMPTZ NOT NULL,
    until        TIMESTAMPTZ,
    PRIMARY KEY (clinician_id, patient_id, since)
);

-- Per-patient alert threshold overrides (rule name -> threshold in the rule's canonical unit).
CREATE TABLE IF NOT EXISTS alert_thresholds (
    patient_id  VARCHAR NOT NULL,
    rule        VARCHAR NOT NULL,
    threshold   DOUBLE NOT NULL,
    set_by      VARCHAR,
    set_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (patient_id, rule)
);

-- Logged treatment-management time (99457/99458/99470) and whether it included an interactive communication.
-- UUID ids rather than a sequence: `rpm keys rotate` copies the database, and copies keep no sequence state.
CREATE TABLE IF NOT EXISTS interactions (
    interaction_id UUID PRIMARY KEY DEFAULT uuid(),
    patient_id     VARCHAR NOT NULL,
    clinician_id   VARCHAR NOT NULL,
    minutes        INTEGER NOT NULL CHECK (minutes > 0),
    interactive    BOOLEAN NOT NULL,
    occurred_at    TIMESTAMPTZ NOT NULL,
    note           VARCHAR
);

-- Telehealth events (patient-app events and device status) as received, attributed to the patient through
-- the source's enrollment. Kept here, encrypted, with identifiers; the telehealth store gets a pseudonymised
-- projection of them (warehouse/telehealth.py).
CREATE TABLE IF NOT EXISTS telehealth_events (
    event_id        VARCHAR PRIMARY KEY,   -- idempotency key: source, event, instant, subject
    patient_id      VARCHAR NOT NULL,
    device_id       VARCHAR NOT NULL,      -- the publishing device or app
    channel         VARCHAR NOT NULL,      -- status | events
    event           VARCHAR NOT NULL,
    occurred_at     TIMESTAMPTZ NOT NULL,
    utc_offset_min  INTEGER NOT NULL,
    received_at     TIMESTAMPTZ NOT NULL,
    loaded_at       TIMESTAMPTZ NOT NULL,
    module          VARCHAR,
    minutes         DOUBLE,
    appointment_id  VARCHAR,
    modality        VARCHAR,
    scheduled_for   TIMESTAMPTZ,
    survey          VARCHAR,
    battery_pct     DOUBLE,
    signal_dbm      DOUBLE,
    firmware        VARCHAR,
    uptime_s        DOUBLE,
    msg_id          VARCHAR NOT NULL,
    segment         VARCHAR NOT NULL,
    record_no       INTEGER NOT NULL,
    item_no         INTEGER NOT NULL,
    extra           JSON,
    run_id          VARCHAR
);

CREATE TABLE IF NOT EXISTS stg_events (
    batch_id VARCHAR NOT NULL, row_key VARCHAR NOT NULL, segment VARCHAR, record_no INTEGER, item_no INTEGER,
    device_id VARCHAR, channel VARCHAR, channel_event VARCHAR, msg_id VARCHAR, event VARCHAR,
    occurred_at TIMESTAMPTZ, utc_offset_min INTEGER, has_time BOOLEAN, received_at TIMESTAMPTZ,
    seconds_ahead DOUBLE, event_id VARCHAR, module VARCHAR, minutes DOUBLE, appointment_id VARCHAR,
    modality VARCHAR, scheduled_for TIMESTAMPTZ, survey VARCHAR, battery_pct DOUBLE, signal_dbm DOUBLE,
    firmware VARCHAR, uptime_s DOUBLE, status_fields INTEGER, extra VARCHAR, raw BLOB, patient_id VARCHAR
);

-- Ops record of every rpm_pipeline run (no PHI): what it absorbed, how long each task took, how fresh
-- the data was. Failed runs are written by the tasks' failure callback.
CREATE TABLE IF NOT EXISTS pipeline_runs (
    run_id              VARCHAR PRIMARY KEY,
    state               VARCHAR NOT NULL,      -- success | failed
    started_at          TIMESTAMPTZ,
    finished_at         TIMESTAMPTZ NOT NULL,
    segments            INTEGER,
    messages            INTEGER,
    received            INTEGER,
    loaded              INTEGER,
    quarantined         INTEGER,
    duplicates          INTEGER,
    quarantined_by_rule JSON,
    task_seconds        JSON,
    measured_to_received_p50_s DOUBLE,
    measured_to_received_p95_s DOUBLE,
    received_to_loaded_p50_s   DOUBLE,
    received_to_loaded_p95_s   DOUBLE,
    measured_to_loaded_p50_s   DOUBLE,
    measured_to_loaded_p95_s   DOUBLE,
    failed_task         VARCHAR,
    error               VARCHAR
);

-- Optional fields present with the wrong type, named for the optional_fields_typed rule.
ALTER TABLE stg_candidates ADD COLUMN IF NOT EXISTS mistyped VARCHAR;
ALTER TABLE stg_events ADD COLUMN IF NOT EXISTS mistyped VARCHAR;
