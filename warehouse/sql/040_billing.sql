-- RPM billing eligibility under the CY2026 Medicare physician fee schedule. Views and macros only: always
-- current (the days come from patient_days, which the load keeps), idempotent on every connect. Each view
-- answers one billing question:
--   billing_device_days  which patient-local days have a device-transmitted reading (from patient_days)
--   billing_days     the counted days of each period with the readings behind each (the evidence)
--   billing_periods  which device-supply code (99454 / 99445) each 30-day period earns
--   billing_time     which treatment-management codes (99470 / 99457 / 99458) each calendar month earns
-- "Patient-local" for readings is the reading's own UTC offset (stg_readings.local_date); for "today" and for
-- logged interactions, which carry no offset, it is patients.time_zone (IANA), UTC when unset.

-- billing_device_readings: the readings a device-supply code may rest on. 99445/99454 require data
-- *transmitted by the device*: readings keyed in by hand (manual) never count, and a NULL manual flag is
-- unknown provenance, so it is not billed either. Quarantined items never reached `readings`: only valid
-- readings count.
CREATE OR REPLACE VIEW billing_device_readings AS
SELECT reading_id, patient_id, device_id, measured_at, local_date
FROM stg_readings
WHERE manual = false;

-- billing_device_days: one row per patient-local day with at least one device-transmitted reading and how many,
-- from the per-day rollup the load keeps (005_patient_days.sql): the same days billing_device_readings gives,
-- without reading every reading (50M readings: 30 s -> BENCHMARKS.md §4).
CREATE OR REPLACE VIEW billing_device_days AS
SELECT patient_id, local_date, CAST(sum(device_readings) AS INTEGER) AS readings
FROM patient_days
GROUP BY patient_id, local_date
HAVING sum(device_readings) > 0;

-- billing_calendar: the 30-day device-supply periods of each patient. Periods are anchored on the patient-local
-- date of the first valid device-transmitted reading and run back to back: period k covers local dates
-- [start + 30k, start + 30k + 29]. Periods are generated up to and including the one containing today's
-- patient-local date (the current, still open period), so a patient who stopped transmitting shows empty
-- periods rather than none; if a device offset puts a reading past today, its period is generated too.
CREATE OR REPLACE VIEW billing_calendar AS
WITH anchors AS (
    SELECT r.patient_id,
           min(r.local_date) AS first_date,
           max(r.local_date) AS last_date,
           CAST(now() AT TIME ZONE coalesce(any_value(p.time_zone), 'UTC') AS DATE) AS today
    FROM billing_device_days r
    LEFT JOIN patients p ON p.patient_id = r.patient_id
    GROUP BY r.patient_id
), numbered AS (
    SELECT patient_id, first_date, today,
           unnest(range(0, greatest(today - first_date, last_date - first_date, 0) // 30 + 1)) AS period_no
    FROM anchors
)
SELECT patient_id,
       CAST(period_no AS INTEGER) AS period_no,
       first_date + CAST(30 * period_no AS INTEGER) AS period_start,
       first_date + CAST(30 * period_no + 29 AS INTEGER) AS period_end,
       first_date,
       today
FROM numbered;

-- billing_days: one row per patient-local day with at least one device-transmitted reading, with the reading ids
-- behind it (sorted) so every counted day can be traced back to the data. Several devices or several readings
-- on one day still make one day.
CREATE OR REPLACE VIEW billing_days AS
SELECT c.patient_id, c.period_no, c.period_start, c.period_end, r.local_date,
       list_sort(list(r.reading_id)) AS reading_ids,
       CAST(count(*) AS INTEGER) AS readings
FROM billing_device_readings r
JOIN billing_calendar c
  ON c.patient_id = r.patient_id AND r.local_date BETWEEN c.period_start AND c.period_end
GROUP BY c.patient_id, c.period_no, c.period_start, c.period_end, r.local_date;

-- billing_periods: the device-supply code each 30-day period earns. One code per patient per period, however
-- many devices the patient has:
--   99454 needs >= 16 distinct patient-local days with a device-transmitted reading in the 30-day period
--   99445 (new in 2026) covers 2-15 such days
--   0-1 days earn no device-supply code
-- For the current period, days_left counts the days from today to period_end that have no reading yet (today
-- included while it has none), i.e. the days on which a reading could still add to days_with_data; the patient
-- is at risk of missing 99454 while it is still reachable: days_with_data < 16 <= days_with_data + days_left.
-- billing_periods_for(ids) answers for the patients in ids only, reading only their days (billing_report asks
-- it for a clinician's scope); the view billing_periods is everyone's.
CREATE OR REPLACE MACRO billing_periods_for(ids) AS TABLE
WITH days AS (
    -- the patients asked for (NULL: everyone), filtered where the days are read; a join, not list_contains,
    -- which compares each row with every id (2 s for 10,000 ids over 2M day rows)
    SELECT patient_id, local_date, readings FROM billing_device_days
    WHERE ids IS NULL OR patient_id IN (SELECT unnest(ids))
), zone_today AS (  -- today in each zone once, not once per patient (a zone lookup is ~30 us)
    SELECT zone, CAST(now() AT TIME ZONE zone AS DATE) AS today
    FROM (SELECT DISTINCT coalesce(time_zone, 'UTC') AS zone FROM patients UNION SELECT 'UTC')
), anchors AS (  -- billing_calendar's anchors, from the same days read once
    SELECT d.patient_id, min(d.local_date) AS first_date, max(d.local_date) AS last_date,
           any_value(z.today) AS today
    FROM days d LEFT JOIN patients p ON p.patient_id = d.patient_id
    JOIN zone_today z ON z.zone = coalesce(p.time_zone, 'UTC')
    GROUP BY d.patient_id
), calendar AS (
    SELECT patient_id, first_date, today,
           CAST(unnest(range(0, greatest(today - first_date, last_date - first_date, 0) // 30 + 1)) AS INTEGER)
               AS period_no
    FROM anchors
), per_period AS (  -- a day's period is its distance from the anchor in whole 30-day steps
    SELECT d.patient_id, CAST((d.local_date - a.first_date) // 30 AS INTEGER) AS period_no,
           count(*) AS days_with_data, sum(d.readings) AS readings,
           count(*) FILTER (WHERE d.local_date >= a.today) AS days_from_today
    FROM days d JOIN anchors a USING (patient_id)
    GROUP BY ALL
), counted AS (
    SELECT c.patient_id, c.period_no, c.first_date + 30 * c.period_no AS period_start,
           c.first_date + 30 * c.period_no + 29 AS period_end, c.today,
           CAST(coalesce(p.days_with_data, 0) AS INTEGER) AS days_with_data,
           CAST(coalesce(p.readings, 0) AS INTEGER) AS readings,
           CAST(coalesce(p.days_from_today, 0) AS INTEGER) AS days_from_today,
           c.today BETWEEN c.first_date + 30 * c.period_no AND c.first_date + 30 * c.period_no + 29 AS is_current
    FROM calendar c LEFT JOIN per_period p USING (patient_id, period_no)
), remaining AS (
    SELECT *,
           CASE WHEN is_current
                THEN CAST(period_end - today + 1 - days_from_today AS INTEGER) END AS days_left
    FROM counted
)
SELECT patient_id, period_no, period_start, period_end, days_with_data, readings,
       CASE WHEN days_with_data >= 16 THEN '99454'
            WHEN days_with_data >= 2 THEN '99445'
       END AS device_code,
       is_current,
       days_left,
       CASE WHEN is_current THEN greatest(16 - days_with_data, 0) END AS days_needed_99454,
       coalesce(is_current AND days_with_data < 16 AND days_with_data + days_left >= 16, false)
           AS at_risk_99454
FROM remaining;

CREATE OR REPLACE VIEW billing_periods AS SELECT * FROM billing_periods_for(NULL);

-- billing_time: treatment-management time per patient-local calendar month (interactions.occurred_at in the
-- patient's time zone, UTC when unset), summed over every clinician:
--   10-19 minutes          -> 99470 (new in 2026)
--   20+ minutes            -> 99457, plus one 99458 per further *full* 20 minutes (40 -> 1, 59 -> 1, 60 -> 2)
--   any management code requires at least one interactive communication (interactive = true) that month;
--   without one no code is billed and the month is flagged needs_interactive_communication.
-- 15-19 minutes are flagged near 99457 with the minutes still needed to reach 20.
-- A zone's calendar months as UTC instants [starts, ends): each interaction's month is the one its instant falls
-- in, a hash join on the zone instead of a zone lookup per interaction (~11 us each: 0.9 s for 10,000 patients'
-- quarter of logged time). Months span the interactions, one either side.
CREATE OR REPLACE VIEW billing_zone_months AS
WITH zones AS (
    SELECT DISTINCT coalesce(time_zone, 'UTC') AS zone FROM patients UNION SELECT 'UTC'
), span AS (
    SELECT date_trunc('month', min(occurred_at) AT TIME ZONE 'UTC') - INTERVAL 1 MONTH AS first_month,
           date_trunc('month', max(occurred_at) AT TIME ZONE 'UTC') + INTERVAL 2 MONTH AS past_month
    FROM interactions
)
SELECT z.zone, CAST(m.month AS DATE) AS month, timezone(z.zone, m.month) AS starts,
       timezone(z.zone, m.month + INTERVAL 1 MONTH) AS ends
FROM zones z, span, range(span.first_month, span.past_month, INTERVAL 1 MONTH) m(month);

CREATE OR REPLACE VIEW billing_time AS
WITH months AS (
    SELECT i.patient_id, zm.month,
           CAST(sum(i.minutes) AS INTEGER) AS minutes,
           CAST(count(*) FILTER (WHERE i.interactive) AS INTEGER) AS interactive_count
    FROM interactions i
    LEFT JOIN patients p ON p.patient_id = i.patient_id
    JOIN billing_zone_months zm
      ON zm.zone = coalesce(p.time_zone, 'UTC') AND i.occurred_at >= zm.starts AND i.occurred_at < zm.ends
    GROUP BY ALL
)
SELECT patient_id, month, minutes, interactive_count,
       CAST(CASE WHEN interactive_count = 0 THEN []
                 WHEN minutes >= 20
                      THEN list_concat(['99457'], list_transform(range((minutes - 20) // 20), x -> '99458'))
                 WHEN minutes >= 10 THEN ['99470']
                 ELSE []
            END AS VARCHAR[]) AS codes,
       interactive_count = 0 AS needs_interactive_communication,
       CASE WHEN minutes BETWEEN 15 AND 19 THEN 20 - minutes END AS minutes_to_99457
FROM months;
