-- Staging and marts over the canonical readings. Views: always current, nothing to refresh.

-- stg_readings: readings with the patient-local wall-clock time, the basis of every per-day question
-- (RPM billing and adherence count *patient-local* calendar days, not UTC days).
CREATE OR REPLACE VIEW stg_readings AS
SELECT
    r.*,
    (r.measured_at AT TIME ZONE 'UTC') + to_minutes(r.utc_offset_min) AS measured_local,
    CAST((r.measured_at AT TIME ZONE 'UTC') + to_minutes(r.utc_offset_min) AS DATE) AS local_date
FROM readings r;

-- mart_latest_vitals: the most recent reading of each metric per patient (a clinician's first glance).
CREATE OR REPLACE VIEW mart_latest_vitals AS
SELECT patient_id, metric, value, diastolic, unit, measured_at, measured_local, device_id,
       count(*) OVER (PARTITION BY patient_id, metric) AS readings_total
FROM stg_readings
QUALIFY row_number() OVER (PARTITION BY patient_id, metric ORDER BY measured_at DESC, reading_id) = 1;

-- mart_daily_vitals: per patient, metric and patient-local day: count, min, mean, max.
CREATE OR REPLACE VIEW mart_daily_vitals AS
SELECT patient_id, metric, local_date, unit,
       count(*) AS readings, min(value) AS min_value, avg(value) AS mean_value, max(value) AS max_value,
       avg(diastolic) AS mean_diastolic
FROM stg_readings
GROUP BY ALL;
