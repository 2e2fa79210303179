-- Registry of the clinical stream: who the patients are, who cares for them, how their devices are bound,
-- and the per-patient overrides clinicians set. Additive migrations: safe on every connect.

ALTER TABLE patients ADD COLUMN IF NOT EXISTS mrn VARCHAR;
ALTER TABLE patients ADD COLUMN IF NOT EXISTS given_name VARCHAR;
ALTER TABLE patients ADD COLUMN IF NOT EXISTS family_name VARCHAR;
ALTER TABLE patients ADD COLUMN IF NOT EXISTS birth_date DATE;
-- IANA zone of the patient's home: billing and adherence count patient-local calendar days.
ALTER TABLE patients ADD COLUMN IF NOT EXISTS time_zone VARCHAR;
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
