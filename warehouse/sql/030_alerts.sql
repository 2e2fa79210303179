-- Alerts: thresholds from published guidance, overridable per patient, evaluated into episodes.
-- An alert opens once per *episode* (a run of consecutive breaching readings of one rule), not per reading,
-- and resolves at the first reading back in range. Acknowledgement state lives in `alerts` and survives
-- re-evaluation because episodes are keyed by the reading that opened them.

-- Incremental evaluation: a pipeline run re-evaluates only the patients whose inputs changed — new readings
-- (marked by the load, in its transaction), a registry entry or a threshold (marked by warehouse/registry.py).
CREATE TABLE IF NOT EXISTS alert_dirty (
    patient_id  VARCHAR PRIMARY KEY,
    marked_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);
-- The patients the evaluation views below look at: filled by warehouse.alerts.refresh_alerts inside its
-- transaction (every patient for a full evaluation), so the views are only meaningful there.
CREATE TABLE IF NOT EXISTS alert_scope (patient_id VARCHAR NOT NULL);
-- Each patient's latest reading (by measured time, then id), kept by the load and rebuilt by a full evaluation:
-- the no-data rules' current gap of patients outside the scope, without scanning their history.
CREATE TABLE IF NOT EXISTS patient_last_reading (
    patient_id  VARCHAR PRIMARY KEY,
    measured_at TIMESTAMPTZ NOT NULL,
    reading_id  VARCHAR NOT NULL
);
-- The rules a full evaluation last applied (digest of this file): changed rules re-evaluate everyone.
CREATE TABLE IF NOT EXISTS alert_state (
    key         VARCHAR PRIMARY KEY,
    value       VARCHAR NOT NULL
);

-- Default thresholds (canonical units). Per-patient overrides: alert_thresholds.rule = '<rule>.<param>'.
CREATE OR REPLACE VIEW alert_rule_params AS
SELECT * FROM (VALUES
    -- ACC/AHA 2017: >= 180 and/or >= 120 is a hypertensive crisis threshold; stage 2 is >= 140 / >= 90.
    ('bp_severe',           'systolic',  180.0, 1, 'severe blood pressure (>= 180 systolic or >= 120 diastolic)'),
    ('bp_severe',           'diastolic', 120.0, 1, NULL),
    ('bp_stage2',           'systolic',  140.0, 3, 'stage 2 hypertension range (>= 140/90)'),
    ('bp_stage2',           'diastolic',  90.0, 3, NULL),
    -- ADA / international consensus: level 2 hypoglycaemia < 54 mg/dL, level 1 < 70; very high > 250.
    ('glucose_level2_low',  'mg_dl',      54.0, 1, 'level 2 hypoglycaemia (< 54 mg/dL)'),
    ('glucose_level1_low',  'mg_dl',      70.0, 2, 'level 1 hypoglycaemia (< 70 mg/dL)'),
    ('glucose_level2_high', 'mg_dl',     250.0, 2, 'level 2 hyperglycaemia (> 250 mg/dL)'),
    -- SpO2: < 88 % needs urgent review; < 92 % is below the usual target (BTS).
    ('spo2_urgent',         'percent',    88.0, 1, 'SpO2 < 88 %'),
    ('spo2_low',            'percent',    92.0, 2, 'SpO2 < 92 %'),
    ('fever',               'cel',        38.0, 2, 'temperature >= 38.0 Cel'),
    ('hr_low',              'per_min',    40.0, 1, 'heart rate < 40 /min'),
    ('hr_high',             'per_min',   130.0, 1, 'heart rate > 130 /min'),
    -- Heart failure (ACC/AHA HF self-care advice): call for > 2 lb in a day or > 5 lb in a week.
    ('weight_gain_day',     'kg',        0.907, 2, 'heart failure: weight gain > 2 lb in a day'),
    ('weight_gain_week',    'kg',        2.268, 2, 'heart failure: weight gain > 5 lb in a week'),
    -- RCP NEWS2 aggregate (partial: consciousness and supplemental O2 are not measured at home).
    ('news2_high',          'score',       7.0, 1, 'NEWS2-style score >= 7'),
    ('news2_medium',        'score',       5.0, 2, 'NEWS2-style score >= 5'),
    ('no_data_72h',         'hours',      72.0, 2, 'no readings for 72 hours'),
    ('no_data_24h',         'hours',      24.0, 3, 'no readings for 24 hours')
) AS t(rule, param, default_value, severity, description);

CREATE OR REPLACE VIEW patient_alert_params AS
SELECT p.patient_id, r.rule, r.param, coalesce(o.threshold, r.default_value) AS value
FROM patients p
CROSS JOIN alert_rule_params r
LEFT JOIN alert_thresholds o ON o.patient_id = p.patient_id AND o.rule = r.rule || '.' || r.param;

-- One row per (rule, reading that the rule looks at): does it breach?
CREATE OR REPLACE VIEW alert_evaluations AS
WITH prm AS (
    SELECT patient_id,
           max(value) FILTER (rule = 'bp_severe' AND param = 'systolic')  AS bp_sev_s,
           max(value) FILTER (rule = 'bp_severe' AND param = 'diastolic') AS bp_sev_d,
           max(value) FILTER (rule = 'bp_stage2' AND param = 'systolic')  AS bp_s2_s,
           max(value) FILTER (rule = 'bp_stage2' AND param = 'diastolic') AS bp_s2_d,
           max(value) FILTER (rule = 'glucose_level2_low')  AS glu_l2,
           max(value) FILTER (rule = 'glucose_level1_low')  AS glu_l1,
           max(value) FILTER (rule = 'glucose_level2_high') AS glu_h2,
           max(value) FILTER (rule = 'spo2_urgent') AS spo2_u,
           max(value) FILTER (rule = 'spo2_low')    AS spo2_l,
           max(value) FILTER (rule = 'fever')       AS fever,
           max(value) FILTER (rule = 'hr_low')      AS hr_lo,
           max(value) FILTER (rule = 'hr_high')     AS hr_hi,
           max(value) FILTER (rule = 'weight_gain_day')  AS wg_day,
           max(value) FILTER (rule = 'weight_gain_week') AS wg_week,
           max(value) FILTER (rule = 'news2_high')   AS news_hi,
           max(value) FILTER (rule = 'news2_medium') AS news_med
    FROM patient_alert_params GROUP BY patient_id
), r AS (
    SELECT r.*, prm.* EXCLUDE (patient_id) FROM readings r JOIN prm USING (patient_id)
    WHERE r.patient_id IN (SELECT patient_id FROM alert_scope)
), weights AS (
    -- Each weight against the one taken about a day before (12-36 h: same morning routine, give or take)
    -- and about a week before (6-8 days). A weight with no such predecessor gains nothing: a slow trend
    -- across an irregular gap is not a one-day gain.
    SELECT patient_id, reading_id, measured_at, value, wg_day, wg_week,
           value - (SELECT any_value(o.value ORDER BY o.measured_at DESC) FROM readings o
                    WHERE o.patient_id = d.patient_id AND o.metric = 'body_weight'
                      AND o.measured_at BETWEEN d.measured_at - INTERVAL 36 HOUR AND d.measured_at - INTERVAL 12 HOUR)
               AS gain_day,
           value - (SELECT any_value(o.value ORDER BY o.measured_at DESC) FROM readings o
                    WHERE o.patient_id = d.patient_id AND o.metric = 'body_weight'
                      AND o.measured_at BETWEEN d.measured_at - INTERVAL 8 DAY AND d.measured_at - INTERVAL 6 DAY)
               AS gain_week
    FROM (SELECT * FROM r WHERE metric = 'body_weight') d
), news_sets AS (
    -- Vitals measured together (same patient, same 15-minute slot) scored with the NEWS2 tables (SpO2 scale 1).
    SELECT patient_id, time_bucket(INTERVAL 15 MINUTE, measured_at) AS slot,
           max(measured_at) AS measured_at, arg_max(reading_id, measured_at) AS reading_id,
           any_value(news_hi) AS news_hi, any_value(news_med) AS news_med,
           count(DISTINCT metric) FILTER (metric IN ('respiratory_rate', 'spo2', 'blood_pressure', 'heart_rate',
                                                     'body_temperature')) AS parameters,
           max(CASE WHEN metric = 'respiratory_rate' THEN
                 CASE WHEN value <= 8 THEN 3 WHEN value <= 11 THEN 1 WHEN value <= 20 THEN 0
                      WHEN value <= 24 THEN 2 ELSE 3 END END) AS s_rr,
           max(CASE WHEN metric = 'spo2' THEN
                 CASE WHEN value <= 91 THEN 3 WHEN value <= 93 THEN 2 WHEN value <= 95 THEN 1 ELSE 0 END END) AS s_spo2,
           max(CASE WHEN metric = 'blood_pressure' THEN
                 CASE WHEN value <= 90 THEN 3 WHEN value <= 100 THEN 2 WHEN value <= 110 THEN 1
                      WHEN value <= 219 THEN 0 ELSE 3 END END) AS s_sbp,
           max(CASE WHEN metric = 'heart_rate' THEN
                 CASE WHEN value <= 40 THEN 3 WHEN value <= 50 THEN 1 WHEN value <= 90 THEN 0
                      WHEN value <= 110 THEN 1 WHEN value <= 130 THEN 2 ELSE 3 END END) AS s_hr,
           max(CASE WHEN metric = 'body_temperature' THEN
                 CASE WHEN value <= 35.0 THEN 3 WHEN value <= 36.0 THEN 1 WHEN value <= 38.0 THEN 0
                      WHEN value <= 39.0 THEN 1 ELSE 2 END END) AS s_temp
    FROM r GROUP BY ALL
), news AS (
    SELECT *, coalesce(s_rr, 0) + coalesce(s_spo2, 0) + coalesce(s_sbp, 0) + coalesce(s_hr, 0)
              + coalesce(s_temp, 0) AS score
    FROM news_sets WHERE parameters >= 3  -- "several vitals arrive together"
)
SELECT patient_id, 'bp_severe' AS rule, reading_id, measured_at,
       value >= bp_sev_s OR diastolic >= bp_sev_d AS breach,
       printf('%.0f/%.0f mm[Hg]', value, diastolic) AS observed
FROM r WHERE metric = 'blood_pressure'
UNION ALL
SELECT patient_id, 'bp_stage2', reading_id, measured_at, value >= bp_s2_s OR diastolic >= bp_s2_d,
       printf('%.0f/%.0f mm[Hg]', value, diastolic)
FROM r WHERE metric = 'blood_pressure'
UNION ALL
SELECT patient_id, 'glucose_level2_low', reading_id, measured_at, value < glu_l2, printf('%.0f mg/dL', value)
FROM r WHERE metric = 'blood_glucose'
UNION ALL
SELECT patient_id, 'glucose_level1_low', reading_id, measured_at, value < glu_l1, printf('%.0f mg/dL', value)
FROM r WHERE metric = 'blood_glucose'
UNION ALL
SELECT patient_id, 'glucose_level2_high', reading_id, measured_at, value > glu_h2, printf('%.0f mg/dL', value)
FROM r WHERE metric = 'blood_glucose'
UNION ALL
SELECT patient_id, 'spo2_urgent', reading_id, measured_at, value < spo2_u, printf('%.0f %%', value)
FROM r WHERE metric = 'spo2'
UNION ALL
SELECT patient_id, 'spo2_low', reading_id, measured_at, value < spo2_l, printf('%.0f %%', value)
FROM r WHERE metric = 'spo2'
UNION ALL
SELECT patient_id, 'fever', reading_id, measured_at, value >= fever, printf('%.1f Cel', value)
FROM r WHERE metric = 'body_temperature'
UNION ALL
SELECT patient_id, 'hr_low', reading_id, measured_at, value < hr_lo, printf('%.0f /min', value)
FROM r WHERE metric = 'heart_rate'
UNION ALL
SELECT patient_id, 'hr_high', reading_id, measured_at, value > hr_hi, printf('%.0f /min', value)
FROM r WHERE metric = 'heart_rate'
UNION ALL
SELECT w.patient_id, 'weight_gain_day', reading_id, measured_at, coalesce(gain_day > wg_day, false),
       printf('%+.1f kg since previous weight', gain_day)
FROM weights w JOIN patients p USING (patient_id) WHERE list_contains(p.conditions, 'heart_failure')
UNION ALL
SELECT w.patient_id, 'weight_gain_week', reading_id, measured_at, coalesce(gain_week > wg_week, false),
       printf('%+.1f kg in a week', gain_week)
FROM weights w JOIN patients p USING (patient_id) WHERE list_contains(p.conditions, 'heart_failure')
UNION ALL
SELECT patient_id, 'news2_high', reading_id, measured_at, score >= news_hi, printf('score %d', score) FROM news
UNION ALL
SELECT patient_id, 'news2_medium', reading_id, measured_at, score >= news_med, printf('score %d', score) FROM news;

-- Episodes: islands of consecutive breaching evaluations per (patient, rule).
CREATE OR REPLACE VIEW alert_episodes AS
WITH flagged AS (
    SELECT *, sum(CASE WHEN breach THEN 0 ELSE 1 END) OVER (PARTITION BY patient_id, rule
              ORDER BY measured_at, reading_id ROWS UNBOUNDED PRECEDING) AS island,
           lead(measured_at) OVER w AS next_at, lead(reading_id) OVER w AS next_reading, lead(breach) OVER w AS next_breach
    FROM alert_evaluations
    WINDOW w AS (PARTITION BY patient_id, rule ORDER BY measured_at, reading_id)
)
SELECT patient_id, rule,
       arg_min(reading_id, measured_at) AS opened_reading_id,
       min(measured_at) AS opened_at,
       max(measured_at) AS last_breach_at,
       arg_max(observed, measured_at) AS last_observed,
       count(*) AS breaches,
       -- resolved by the first in-range reading after the island, if any
       max(next_at) FILTER (next_breach = false) AS resolved_at,
       max(next_reading) FILTER (next_breach = false) AS resolved_reading_id
FROM flagged WHERE breach
GROUP BY patient_id, rule, island
UNION ALL
-- No data: every gap between consecutive readings longer than the threshold, and the current gap.
SELECT g.patient_id, g.rule, g.last_reading_id, g.last_at + to_hours(CAST(g.hours AS BIGINT)), g.last_at,
       printf('last reading %s', strftime(g.last_at, '%Y-%m-%d %H:%M UTC')), 1, g.next_at, g.next_reading_id
FROM (
    SELECT r.patient_id, prm.rule, prm.value AS hours, r.reading_id AS last_reading_id, r.measured_at AS last_at,
           lead(r.measured_at) OVER w AS next_at, lead(r.reading_id) OVER w AS next_reading_id
    FROM readings r
    JOIN patient_alert_params prm ON prm.patient_id = r.patient_id AND prm.rule IN ('no_data_24h', 'no_data_72h')
    WHERE r.patient_id IN (SELECT patient_id FROM alert_scope)
    WINDOW w AS (PARTITION BY r.patient_id, prm.rule ORDER BY r.measured_at, r.reading_id)
) g
WHERE coalesce(g.next_at, now()) - g.last_at > to_hours(CAST(g.hours AS BIGINT));

CREATE TABLE IF NOT EXISTS alerts (
    alert_id            VARCHAR PRIMARY KEY,   -- hash of patient, rule and the reading that opened it
    patient_id          VARCHAR NOT NULL,
    rule                VARCHAR NOT NULL,
    severity            INTEGER NOT NULL,      -- 1 most severe
    description         VARCHAR,
    opened_at           TIMESTAMPTZ NOT NULL,
    opened_reading_id   VARCHAR NOT NULL,
    last_breach_at      TIMESTAMPTZ NOT NULL,
    last_observed       VARCHAR,
    breaches            INTEGER NOT NULL,
    resolved_at         TIMESTAMPTZ,
    resolved_reading_id VARCHAR,
    acknowledged_by     VARCHAR,
    acknowledged_at     TIMESTAMPTZ,
    ack_note            VARCHAR,
    evaluated_at        TIMESTAMPTZ NOT NULL
);
ALTER TABLE alerts ADD COLUMN IF NOT EXISTS resolution VARCHAR;  -- 'back in range' | 'disproved by late readings'
