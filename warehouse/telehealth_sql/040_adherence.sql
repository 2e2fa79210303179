-- Monitoring adherence: do enrolled people transmit often enough, and how fast do new ones get started.

-- Days with at least one device-transmitted reading per person, over the 30 patient-local days ending
-- today (UTC date). Manual entries never count: 99454/99445 require device-transmitted data.
CREATE OR REPLACE VIEW stg_transmitted_days_30d AS
SELECT person_key, count(DISTINCT day) AS transmitted_days
FROM device_days
WHERE readings - manual_readings > 0
  AND day > CAST(now() AT TIME ZONE 'UTC' AS DATE) - 30
GROUP BY person_key;

-- Adherent = transmitted on >= 16 distinct days of the last 30: mirrors the 99454 threshold (>= 16 days with
-- a transmitted reading in the 30-day period). Enrolled now = a device is bound to the person now
-- (devices.person_key follows the open enrollment).
CREATE OR REPLACE VIEW mart_adherence AS
WITH enrolled AS (
    SELECT p.person_key, coalesce(t.transmitted_days, 0) AS transmitted_days
    FROM people p
    LEFT JOIN stg_transmitted_days_30d t ON t.person_key = p.person_key
    WHERE p.currently_enrolled AND p.person_key IN (SELECT person_key FROM devices)),
onboarding AS (
    -- Time to first transmitted reading: how long a new patient waits for a working setup. Quantiles are
    -- interpolated (quantile_cont), so the median of an even count is the mean of the middle two.
    SELECT count(*) AS people_with_first_reading,
           quantile_cont(hours_enrolment_to_first_reading, 0.5) AS median_hours_to_first_reading,
           quantile_cont(hours_enrolment_to_first_reading, 0.9) AS p90_hours_to_first_reading
    FROM people
    WHERE hours_enrolment_to_first_reading IS NOT NULL)
SELECT CAST(now() AT TIME ZONE 'UTC' AS DATE) - 29 AS window_start,
       CAST(now() AT TIME ZONE 'UTC' AS DATE) AS window_end,
       a.enrolled_people, a.adherent_people,
       a.adherent_people / nullif(a.enrolled_people, 0) AS adherence_share,
       o.people_with_first_reading, o.median_hours_to_first_reading, o.p90_hours_to_first_reading
FROM (SELECT count(*) AS enrolled_people,
             count(*) FILTER (WHERE transmitted_days >= 16) AS adherent_people
      FROM enrolled) a, onboarding o;
