-- patient_days: one row per patient, patient-local day, metric and unit with what the clinician views and
-- billing ask of that day's readings — counts, value aggregates, every reading's instant and the latest
-- reading. The load adds each batch's readings to it in the batch's transaction (warehouse/patient_days.py),
-- so billing's days with data, the panel's aggregates and the daily vitals read ~2M rows instead of 50M
-- readings (BENCHMARKS.md §4, bottlenecks 3 and 4). The day is billing's: the registered home zone's when
-- the patient has one, else the device's offset (010_marts.sql with_local_time), computed at load so no
-- query pays the zone join. Created here, before the views of 010/040 that read it.
CREATE TABLE IF NOT EXISTS patient_days (
    patient_id          VARCHAR NOT NULL,
    local_date          DATE NOT NULL,
    metric              VARCHAR NOT NULL,
    unit                VARCHAR NOT NULL,
    readings            BIGINT NOT NULL,
    device_readings     BIGINT NOT NULL,   -- manual = false: the readings 99445/99454 may count
    first_at            TIMESTAMPTZ NOT NULL,
    last_at             TIMESTAMPTZ NOT NULL,
    sum_value           DOUBLE NOT NULL,
    min_value           DOUBLE NOT NULL,
    max_value           DOUBLE NOT NULL,
    sum_diastolic       DOUBLE,
    diastolic_readings  BIGINT NOT NULL,
    -- epoch microseconds of every reading: exact counts over a window that starts inside the day
    -- ("readings in the last 30 days" starts at an instant, not at midnight)
    at_us               BIGINT[] NOT NULL,
    -- the day's latest reading (ties: the smallest reading_id, as mart_latest_vitals always chose), with its
    -- patient-local time: the first glance needs no zone lookup at query time
    latest              STRUCT(reading_id VARCHAR, value DOUBLE, diastolic DOUBLE, device_id VARCHAR,
                               utc_offset_min INTEGER, measured_local TIMESTAMP) NOT NULL
);

-- patient_latest: per patient and metric, the latest reading (across units and days, as mart_latest_vitals
-- chooses it) and the readings in total — patient_days folded once more, kept beside it by the same load and
-- recounts (warehouse/patient_days.py). The panel's latest vitals read ~29k rows here instead of picking the
-- latest of 2M day rows: a vector of day rows whose `latest` is touched at all is decoded whole, and a
-- 100-patient panel touches most of them (BENCHMARKS.md §4).
CREATE TABLE IF NOT EXISTS patient_latest (
    patient_id      VARCHAR NOT NULL,
    metric          VARCHAR NOT NULL,
    unit            VARCHAR NOT NULL,
    last_at         TIMESTAMPTZ NOT NULL,
    readings_total  BIGINT NOT NULL,
    latest          STRUCT(reading_id VARCHAR, value DOUBLE, diastolic DOUBLE, device_id VARCHAR,
                           utc_offset_min INTEGER, measured_local TIMESTAMP) NOT NULL
);

-- The home zone each patient's days were counted in (NULL: the devices' offsets). A registry change of the
-- zone moves the patient's local days: registry.upsert_patient recounts them in the same transaction
-- (patient_days.refresh_zones), and the load and the compaction check again for a change made otherwise.
CREATE TABLE IF NOT EXISTS patient_day_zones (
    patient_id  VARCHAR PRIMARY KEY,
    time_zone   VARCHAR
);

-- The manual flag (020_registry.sql says why manual readings never bill) is counted by the views over this
-- rollup in 010/040, which come first.
ALTER TABLE readings ADD COLUMN IF NOT EXISTS manual BOOLEAN DEFAULT false;
