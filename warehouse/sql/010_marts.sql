-- Staging and marts over the canonical readings. Views: always current — those over patient_days because the
-- load keeps that rollup in its own transaction (warehouse/patient_days.py).

-- stg_zone_days: each registered home zone's UTC offset (microseconds) at the start and at the end of every UTC
-- day the readings span. A zone changes its offset at most once a day (a DST transition), so where the two
-- are equal the whole day has that offset and its readings need no time-zone lookup of their own: ICU's
-- (timezone(), AT TIME ZONE) costs ~1.5 us a reading when patients' zones alternate, 20x the rest of the
-- projection (BENCHMARKS.md, bottleneck 2); this costs a hash join. A few hundred rows per zone and year,
-- rebuilt by every query that reads it: always current (a new zone, a new day), nothing to maintain.
CREATE OR REPLACE VIEW stg_zone_days AS
WITH span AS (
    SELECT epoch_us(min(measured_at)) // 86400000000 AS first_day,
           epoch_us(max(measured_at)) // 86400000000 AS last_day
    FROM readings
), days AS (
    SELECT z.time_zone, d.day, make_timestamptz(d.day * 86400000000) AS day_start,
           make_timestamptz((d.day + 1) * 86400000000) AS day_end
    FROM (SELECT DISTINCT time_zone FROM patients WHERE time_zone IS NOT NULL) z
    CROSS JOIN span
    CROSS JOIN range(span.first_day, span.last_day + 1) AS d(day)
)
SELECT time_zone, day,
       epoch_us(timezone(time_zone, day_start)) - epoch_us(day_start) AS start_offset_us,
       epoch_us(timezone(time_zone, day_end)) - epoch_us(day_end) AS end_offset_us
FROM days;

-- with_local_time(source): the rows of `source` (readings, or a subset of their columns holding patient_id,
-- measured_at and utc_offset_min) with the patient-local wall-clock time, the basis of every per-day question
-- (RPM billing and adherence count *patient-local* calendar days, not UTC days). Patient-local is the patient's
-- registered home zone (patients.time_zone, IANA) when there is one, whatever offset the device sent: a device
-- whose clock runs on UTC (`Z` stamps) would otherwise split one home day in two — a Chicago patient's 01:30
-- and 23:30 readings arrive as 07:30Z and 05:30Z the next day — and bill 99445 from one day. Without a
-- registered zone it is the offset the device sent with the reading (UTC microseconds plus that offset).
CREATE OR REPLACE MACRO with_local_time(source) AS TABLE
SELECT r.* EXCLUDE (offset_us),
       make_timestamp(epoch_us(r.measured_at) + r.offset_us) AS measured_local,
       CAST(make_timestamp(epoch_us(r.measured_at) + r.offset_us) AS DATE) AS local_date
FROM (
    SELECT r.*,
           CASE WHEN p.time_zone IS NULL THEN r.utc_offset_min * 60000000::BIGINT
                WHEN z.start_offset_us = z.end_offset_us THEN z.start_offset_us
                -- the day of a DST transition: the zone's offset at this very instant
                ELSE epoch_us(timezone(p.time_zone, r.measured_at)) - epoch_us(r.measured_at)
           END AS offset_us
    FROM query_table(source::VARCHAR) r
    LEFT JOIN patients p ON p.patient_id = r.patient_id
    LEFT JOIN stg_zone_days z
           ON z.time_zone = p.time_zone AND z.day = epoch_us(r.measured_at) // 86400000000
) r;

-- stg_readings: every reading with its patient-local time (measured_local) and day (local_date).
CREATE OR REPLACE VIEW stg_readings AS
SELECT * FROM with_local_time('readings');

-- patient_days_of(source): the patient_days rows of `source` (readings, or rows with their columns): what
-- the load adds for a batch, and what a rebuild recounts.
CREATE OR REPLACE MACRO patient_days_of(source) AS TABLE
SELECT patient_id, local_date, metric, unit,
       count(*) AS readings,
       count(*) FILTER (manual = false) AS device_readings,
       min(measured_at) AS first_at, max(measured_at) AS last_at,
       sum(value) AS sum_value, min(value) AS min_value, max(value) AS max_value,
       sum(diastolic) AS sum_diastolic, count(diastolic) AS diastolic_readings,
       list(epoch_us(measured_at)) AS at_us,
       arg_min({'reading_id': reading_id, 'value': value, 'diastolic': diastolic, 'device_id': device_id,
                'utc_offset_min': utc_offset_min, 'measured_local': measured_local},
               {'at': -epoch_us(measured_at), 'reading_id': reading_id}) AS latest
FROM with_local_time(source)
GROUP BY patient_id, local_date, metric, unit;

-- combined_patient_days(source): rows of patient_days for the same key (an existing day and a batch's part
-- of it) merged into one: the aggregates of their readings together.
CREATE OR REPLACE MACRO combined_patient_days(source) AS TABLE
SELECT patient_id, local_date, metric, unit,
       CAST(sum(readings) AS BIGINT) AS readings, CAST(sum(device_readings) AS BIGINT) AS device_readings,
       min(first_at) AS first_at, max(last_at) AS last_at,
       sum(sum_value) AS sum_value, min(min_value) AS min_value, max(max_value) AS max_value,
       sum(sum_diastolic) AS sum_diastolic, CAST(sum(diastolic_readings) AS BIGINT) AS diastolic_readings,
       flatten(list(at_us)) AS at_us,
       arg_min(latest, {'at': -epoch_us(last_at), 'reading_id': latest.reading_id}) AS latest
FROM query_table(source::VARCHAR)
GROUP BY patient_id, local_date, metric, unit;

-- stg_day_zone_changes: patients whose registered zone changed since their days were counted (the registry
-- recounts them at once, warehouse/patient_days.refresh_zones; the load and the compaction check again).
CREATE OR REPLACE VIEW stg_day_zone_changes AS
SELECT z.patient_id FROM patient_day_zones z JOIN patients p USING (patient_id)
WHERE z.time_zone IS DISTINCT FROM p.time_zone;

-- patient_latest_of(source): the patient_latest rows of `source` (patient_days, or rows with its patient_id,
-- metric, unit, last_at, readings and latest — a batch's day rows beside the stored latest rows they add to):
-- per patient and metric the reading latest on the UTC instant (ties: the smallest reading_id), with its day's
-- unit, and the readings counted.
CREATE OR REPLACE MACRO patient_latest_of(source) AS TABLE
SELECT patient_id, metric, arg_min(unit, {'at': -epoch_us(last_at), 'reading_id': latest.reading_id}) AS unit,
       max(last_at) AS last_at, CAST(sum(readings) AS BIGINT) AS readings_total,
       arg_min(latest, {'at': -epoch_us(last_at), 'reading_id': latest.reading_id}) AS latest
FROM query_table(source::VARCHAR)
GROUP BY patient_id, metric;

-- mart_latest_vitals: the most recent reading of each metric per patient (a clinician's first glance), chosen on
-- the UTC instant (ties: the smallest reading_id), with the local time the rollup stored for it.
CREATE OR REPLACE VIEW mart_latest_vitals AS
SELECT patient_id, metric, latest.value AS value, latest.diastolic AS diastolic, unit, last_at AS measured_at,
       latest.measured_local AS measured_local, latest.device_id AS device_id, readings_total
FROM patient_latest;

-- mart_daily_vitals: per patient, metric and patient-local day: count, min, mean, max.
CREATE OR REPLACE VIEW mart_daily_vitals AS
SELECT patient_id, metric, local_date, unit, readings, min_value, sum_value / readings AS mean_value,
       max_value, sum_diastolic / nullif(diastolic_readings, 0) AS mean_diastolic
FROM patient_days;

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
