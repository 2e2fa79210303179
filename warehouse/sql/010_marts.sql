-- Staging and marts over the canonical readings. Views: always current, nothing to refresh.

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

-- mart_latest_vitals: the most recent reading of each metric per patient (a clinician's first glance). The
-- latest reading is chosen on the UTC instant, and only it is given its local time.
CREATE OR REPLACE VIEW mart_latest_vitals AS
WITH latest AS (
    SELECT patient_id, metric, value, diastolic, unit, measured_at, utc_offset_min, device_id,
           count(*) OVER (PARTITION BY patient_id, metric) AS readings_total
    FROM readings
    QUALIFY row_number() OVER (PARTITION BY patient_id, metric ORDER BY measured_at DESC, reading_id) = 1
)
SELECT patient_id, metric, value, diastolic, unit, measured_at, measured_local, device_id, readings_total
FROM with_local_time('latest');

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
