-- Alerts: thresholds from published guidance, overridable per patient, evaluated into episodes.
-- An alert opens once per *episode* (a run of consecutive breaching readings of one family of rules), not
-- per reading, and resolves at the first reading back in range. A family's rules are levels of one finding
-- (BP stage 2 / severe, SpO2 low / urgent, level 1 / 2 hypoglycaemia, NEWS2 medium / high, no data 24 / 72 h):
-- an episode is one alert at the most severe level it reached — a BP of 182/95 opens bp_severe, not also
-- bp_stage2 — escalated in place (same alert, rule and severity raised, escalated_at set) when a later
-- reading of the episode is worse. Acknowledgement state lives in `alerts` and survives re-evaluation and
-- escalation because episodes are keyed by the reading that opened them and the level it opened at.

-- Incremental evaluation: a pipeline run re-evaluates only the patients whose inputs changed — new readings
-- (marked by the load, in its transaction), a registry entry or a threshold (marked by warehouse/registry.py).
CREATE TABLE IF NOT EXISTS alert_dirty (
    patient_id  VARCHAR PRIMARY KEY,
    marked_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);
-- The earliest measured time among the new readings: no rule looks further ahead than its own NEWS2 slot, so
-- what was evaluated before the checkpoint preceding it stands (alert_checkpoints). -infinity (or NULL) for a
-- registry or threshold change, which can change any evaluation.
ALTER TABLE alert_dirty ADD COLUMN IF NOT EXISTS since TIMESTAMPTZ;
-- The patients the evaluation views below look at, each from `from_at` (one of its checkpoints, or -infinity
-- for the whole history): filled by warehouse.alerts.refresh_alerts inside its transaction (every patient
-- from -infinity for a full evaluation), so the views are only meaningful there.
CREATE TABLE IF NOT EXISTS alert_scope (patient_id VARCHAR NOT NULL);
ALTER TABLE alert_scope ADD COLUMN IF NOT EXISTS from_at TIMESTAMPTZ;
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
-- Checkpoints, where an evaluation can start instead of at a patient's first reading: 00:00 UTC of each day
-- the patient has readings (a whole number of NEWS2 15-minute slots, so no slot straddles one), with what the
-- rules carry across it — the last reading before it (the no-data gap spanning midnight) here, every episode
-- open across it in alert_carry. The weight rules need no state: their 8 days of predecessors are re-read.
-- A checkpoint holds while no reading measured before it arrives (alert_dirty.since); each evaluation rebuilds
-- those after its start.
CREATE TABLE IF NOT EXISTS alert_checkpoints (
    patient_id      VARCHAR NOT NULL,
    day             TIMESTAMPTZ NOT NULL,
    last_at         TIMESTAMPTZ,           -- the patient's last reading before `day`, if any
    last_reading_id VARCHAR
);
-- An episode open across a checkpoint (the family's last evaluation before `day` breached), as it stood then:
-- `rule` is the level it had reached by then.
CREATE TABLE IF NOT EXISTS alert_carry (
    patient_id        VARCHAR NOT NULL,
    day               TIMESTAMPTZ NOT NULL,
    rule              VARCHAR NOT NULL,
    reading_id        VARCHAR NOT NULL,    -- that last evaluation: the episode's place in the series
    measured_at       TIMESTAMPTZ NOT NULL,
    opened_reading_id VARCHAR NOT NULL,
    opened_at         TIMESTAMPTZ NOT NULL,
    breaches          BIGINT NOT NULL,     -- before `day`
    last_observed     VARCHAR
);
ALTER TABLE alert_carry ADD COLUMN IF NOT EXISTS family VARCHAR;
ALTER TABLE alert_carry ADD COLUMN IF NOT EXISTS opened_rule VARCHAR;       -- the level it opened at
ALTER TABLE alert_carry ADD COLUMN IF NOT EXISTS escalated_at TIMESTAMPTZ;  -- when it reached `rule`, if it rose

-- 00:00 UTC of an instant's day, from its microseconds (time_bucket by day goes through ICU's calendar: ~5 µs
-- a call, the largest cost of a dense series' evaluation).
CREATE OR REPLACE MACRO utc_day(ts) AS make_timestamptz(epoch_us(ts) // 86400000000 * 86400000000);

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

-- Each rule with its severity, description and family: the finding it is a level of (the rules not listed
-- are families of their own). Levels of a family nest with the default thresholds (182/95 breaches both BP
-- levels), so only the most severe breaching one is the finding.
CREATE OR REPLACE VIEW alert_rules AS
SELECT p.rule, coalesce(any_value(f.family), p.rule) AS family, min(p.severity) AS severity,
       max(p.description) AS description
FROM alert_rule_params p
LEFT JOIN (VALUES ('bp_severe', 'bp'), ('bp_stage2', 'bp'),
                  ('glucose_level2_low', 'glucose_low'), ('glucose_level1_low', 'glucose_low'),
                  ('spo2_urgent', 'spo2'), ('spo2_low', 'spo2'),
                  ('news2_high', 'news2'), ('news2_medium', 'news2'),
                  ('no_data_72h', 'no_data'), ('no_data_24h', 'no_data')) AS f(rule, family) USING (rule)
GROUP BY p.rule;

CREATE OR REPLACE VIEW patient_alert_params AS
SELECT p.patient_id, r.rule, r.param, coalesce(o.threshold, r.default_value) AS value
FROM patients p
CROSS JOIN alert_rule_params r
LEFT JOIN alert_thresholds o ON o.patient_id = p.patient_id AND o.rule = r.rule || '.' || r.param;

-- One row per (family, reading that the family looks at) from the scope's start: the most severe level it
-- breaches (`rule`, NULL: none). Every family costs a scan, a hash join or an ordered lookup: linear in a
-- patient's series (n log n with the sorts), however dense, so a CGM's year or a scale sending every minute
-- costs what its readings cost.
CREATE OR REPLACE VIEW alert_evaluations AS
SELECT *, rule IS NOT NULL AS breach FROM (
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
    FROM patient_alert_params WHERE patient_id IN (SELECT patient_id FROM alert_scope) GROUP BY patient_id
), r AS MATERIALIZED (
    SELECT r.patient_id, r.reading_id, r.metric, r.value, r.diastolic, r.measured_at, prm.* EXCLUDE (patient_id)
    FROM readings r JOIN alert_scope s USING (patient_id) JOIN prm USING (patient_id)
    WHERE r.measured_at >= s.from_at
), hf AS MATERIALIZED (
    -- Weights of heart-failure patients only (the rules apply to nobody else), from 8 days before the scope's
    -- start: the predecessors of its first weights.
    SELECT w.patient_id, w.reading_id, w.measured_at, w.value, w.measured_at >= s.from_at AS evaluated
    FROM readings w JOIN alert_scope s USING (patient_id) JOIN patients p USING (patient_id)
    WHERE w.metric = 'body_weight' AND list_contains(p.conditions, 'heart_failure')
      AND w.measured_at >= s.from_at - INTERVAL 8 DAY
), weight_at AS (
    -- One weight per instant (two scales at the same instant: the greater reading id), so a lookup is exact.
    SELECT patient_id, measured_at, arg_max(value, reading_id) AS value
    FROM hf GROUP BY patient_id, measured_at
), weights AS (
    -- Each weight against the latest one taken 12-36 h before (about a day: same morning routine, give or
    -- take) and 6-8 days before (about a week). A weight with no such predecessor gains nothing: a slow trend
    -- across an irregular gap is not a one-day gain. The ASOF join finds the latest weight up to the window's
    -- end; it counts only if it is inside the window.
    SELECT w.patient_id, w.reading_id, w.measured_at, prm.wg_day, prm.wg_week,
           w.value - CASE WHEN d.measured_at >= w.measured_at - INTERVAL 36 HOUR THEN d.value END AS gain_day,
           w.value - CASE WHEN k.measured_at >= w.measured_at - INTERVAL 8 DAY THEN k.value END AS gain_week
    FROM (SELECT * FROM hf WHERE evaluated) w
    JOIN prm USING (patient_id)
    ASOF LEFT JOIN weight_at d
        ON d.patient_id = w.patient_id AND w.measured_at - INTERVAL 12 HOUR >= d.measured_at
    ASOF LEFT JOIN weight_at k
        ON k.patient_id = w.patient_id AND w.measured_at - INTERVAL 6 DAY >= k.measured_at
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
-- (`observed` is formatted for breaches only: `rule` here is the alias of the same select list, and a CASE
-- evaluates its branch only for the rows that take it — printf on every evaluation was a third of the marks)
SELECT patient_id, 'bp' AS family,
       CASE WHEN value >= bp_sev_s OR diastolic >= bp_sev_d THEN 'bp_severe'
            WHEN value >= bp_s2_s OR diastolic >= bp_s2_d THEN 'bp_stage2' END AS rule,
       reading_id, measured_at,
       CASE WHEN rule IS NOT NULL THEN printf('%.0f/%.0f mm[Hg]', value, diastolic) END AS observed
FROM r WHERE metric = 'blood_pressure'
UNION ALL
SELECT patient_id, 'glucose_low',
       CASE WHEN value < glu_l2 THEN 'glucose_level2_low' WHEN value < glu_l1 THEN 'glucose_level1_low' END AS rule,
       reading_id, measured_at, CASE WHEN rule IS NOT NULL THEN printf('%.0f mg/dL', value) END
FROM r WHERE metric = 'blood_glucose'
UNION ALL
SELECT patient_id, 'glucose_level2_high', CASE WHEN value > glu_h2 THEN 'glucose_level2_high' END AS rule,
       reading_id, measured_at, CASE WHEN rule IS NOT NULL THEN printf('%.0f mg/dL', value) END
FROM r WHERE metric = 'blood_glucose'
UNION ALL
SELECT patient_id, 'spo2', CASE WHEN value < spo2_u THEN 'spo2_urgent' WHEN value < spo2_l THEN 'spo2_low' END AS rule,
       reading_id, measured_at, CASE WHEN rule IS NOT NULL THEN printf('%.0f %%', value) END
FROM r WHERE metric = 'spo2'
UNION ALL
SELECT patient_id, 'fever', CASE WHEN value >= fever THEN 'fever' END AS rule, reading_id, measured_at,
       CASE WHEN rule IS NOT NULL THEN printf('%.1f Cel', value) END
FROM r WHERE metric = 'body_temperature'
UNION ALL
SELECT patient_id, 'hr_low', CASE WHEN value < hr_lo THEN 'hr_low' END AS rule, reading_id, measured_at,
       CASE WHEN rule IS NOT NULL THEN printf('%.0f /min', value) END
FROM r WHERE metric = 'heart_rate'
UNION ALL
SELECT patient_id, 'hr_high', CASE WHEN value > hr_hi THEN 'hr_high' END AS rule, reading_id, measured_at,
       CASE WHEN rule IS NOT NULL THEN printf('%.0f /min', value) END
FROM r WHERE metric = 'heart_rate'
UNION ALL
SELECT patient_id, 'weight_gain_day', CASE WHEN gain_day > wg_day THEN 'weight_gain_day' END AS rule, reading_id,
       measured_at, CASE WHEN rule IS NOT NULL THEN printf('%+.1f kg since previous weight', gain_day) END
FROM weights
UNION ALL
SELECT patient_id, 'weight_gain_week', CASE WHEN gain_week > wg_week THEN 'weight_gain_week' END AS rule,
       reading_id, measured_at, CASE WHEN rule IS NOT NULL THEN printf('%+.1f kg in a week', gain_week) END
FROM weights
UNION ALL
SELECT patient_id, 'news2',
       CASE WHEN score >= news_hi THEN 'news2_high' WHEN score >= news_med THEN 'news2_medium' END AS rule,
       reading_id, measured_at, CASE WHEN rule IS NOT NULL THEN printf('score %d', score) END
FROM news
);

-- Each (patient, family)'s evaluations in series (measured time, then reading id), after the episode carried
-- across the scope's start: an island of consecutive breaches is one episode. `position` counts the carried
-- episode as the breaches it had, so a breach's count so far in its episode is its position minus the
-- episode's base (alert_islands). `reached_at`: when the mark's level was reached — its own time, or for the
-- carried episode when it rose to the level it carries (opened at it: when it opened).
CREATE OR REPLACE VIEW alert_marks AS
SELECT *, sum(CASE WHEN breach THEN 0 ELSE 1 END) OVER so_far AS island, sum(weight) OVER so_far AS position,
       lead(measured_at) OVER series AS next_at, lead(reading_id) OVER series AS next_reading,
       lead(breach) OVER series AS next_breach
FROM (
    SELECT patient_id, family, rule, reading_id, measured_at, breach,
           CASE WHEN breach THEN observed END AS observed, measured_at AS reached_at,
           NULL::VARCHAR AS carried_opener, NULL::TIMESTAMPTZ AS carried_opened_at,
           NULL::VARCHAR AS carried_opened_rule, 1::BIGINT AS weight
    FROM alert_evaluations
    UNION ALL
    SELECT c.patient_id, c.family, c.rule, c.reading_id, c.measured_at, true, c.last_observed,
           coalesce(c.escalated_at, c.opened_at), c.opened_reading_id, c.opened_at, c.opened_rule, c.breaches
    FROM alert_carry c JOIN alert_scope s ON s.patient_id = c.patient_id AND s.from_at = c.day
)
-- (window names differ across this file: DuckDB 1.5 rejects a name a previous statement of the script used)
WINDOW series AS (PARTITION BY patient_id, family ORDER BY measured_at, reading_id),
       so_far AS (series ROWS UNBOUNDED PRECEDING);

-- Each level an island of marks (a table or view of alert_marks' rows; breaches at least) reached, with the
-- first mark at it: what the episode was at any point of its series is its most severe level reached by then.
CREATE OR REPLACE MACRO alert_levels(marks) AS TABLE
SELECT m.patient_id, m.family, m.island, m.rule, any_value(l.severity) AS severity,
       min(m.position) AS first_position, arg_min(m.reached_at, m.position) AS reached_at
FROM query_table(marks::VARCHAR) m JOIN alert_rules l USING (rule)
WHERE m.breach
GROUP BY m.patient_id, m.family, m.island, m.rule;

-- Episodes from marks: one per island, at the most severe level it reached (escalated_at: when, if it opened
-- lower).
CREATE OR REPLACE MACRO alert_islands(marks) AS TABLE
WITH islands AS (
    SELECT patient_id, family, island,
           arg_min(coalesce(carried_opener, reading_id), position) AS opened_reading_id,
           arg_min(coalesce(carried_opened_at, measured_at), position) AS opened_at,
           arg_min(coalesce(carried_opened_rule, rule), position) AS opened_rule,
           max(measured_at) AS last_breach_at,
           arg_max(observed, position) AS last_observed,
           sum(weight)::BIGINT AS breaches,
           -- resolved by the first in-range reading after the island, if any
           max(next_at) FILTER (next_breach = false) AS resolved_at,
           max(next_reading) FILTER (next_breach = false) AS resolved_reading_id,
           min(position - weight) AS base
    FROM query_table(marks::VARCHAR) WHERE breach
    GROUP BY patient_id, family, island
), peaks AS (
    SELECT patient_id, family, island, arg_min(rule, severity) AS rule, arg_min(reached_at, severity) AS reached_at
    FROM alert_levels(marks) GROUP BY patient_id, family, island
)
SELECT i.*, p.rule, CASE WHEN p.rule <> i.opened_rule THEN p.reached_at END AS escalated_at
FROM islands i JOIN peaks p USING (patient_id, family, island);

-- Each reading of the scope from its start, after the last reading before the start (the gap spanning it),
-- with the reading that follows.
CREATE OR REPLACE VIEW alert_reading_stream AS
SELECT patient_id, reading_id, measured_at,
       lead(measured_at) OVER readings_in_order AS next_at,
       lead(reading_id) OVER readings_in_order AS next_reading_id
FROM (
    SELECT r.patient_id, r.reading_id, r.measured_at
    FROM readings r JOIN alert_scope s USING (patient_id) WHERE r.measured_at >= s.from_at
    UNION ALL
    SELECT c.patient_id, c.last_reading_id, c.last_at
    FROM alert_checkpoints c JOIN alert_scope s ON s.patient_id = c.patient_id AND s.from_at = c.day
    WHERE c.last_at IS NOT NULL
)
WINDOW readings_in_order AS (PARTITION BY patient_id ORDER BY measured_at, reading_id);

-- No data, from a stream (alert_reading_stream's rows): every gap between consecutive readings longer than a
-- threshold, and the current gap — one episode per gap, opened when the first threshold passed and escalated
-- when a more severe one did.
CREATE OR REPLACE MACRO alert_gaps(stream) AS TABLE
SELECT patient_id, family, opened_reading_id, opened_rule,
       last_breach_at + to_hours(CAST(opened_hours AS BIGINT)) AS opened_at, last_breach_at,
       printf('last reading %s', strftime(last_breach_at, '%Y-%m-%d %H:%M UTC')) AS last_observed,
       1::BIGINT AS breaches, resolved_at, resolved_reading_id, rule,
       CASE WHEN rule <> opened_rule THEN last_breach_at + to_hours(CAST(peak_hours AS BIGINT)) END AS escalated_at
FROM (
    SELECT g.patient_id, any_value(l.family) AS family, g.reading_id AS opened_reading_id,
           g.measured_at AS last_breach_at, g.next_at AS resolved_at, g.next_reading_id AS resolved_reading_id,
           arg_min(prm.rule, (prm.value, l.severity)) AS opened_rule, min(prm.value) AS opened_hours,
           arg_min(prm.rule, l.severity) AS rule, arg_min(prm.value, l.severity) AS peak_hours
    FROM query_table(stream::VARCHAR) g
    JOIN patient_alert_params prm ON prm.patient_id = g.patient_id AND prm.rule IN ('no_data_24h', 'no_data_72h')
    JOIN alert_rules l ON l.rule = prm.rule
    -- (in microseconds: comparing intervals normalises both, a quarter of a dense series' evaluation)
    WHERE epoch_us(coalesce(g.next_at, now())) - epoch_us(g.measured_at) > CAST(prm.value AS BIGINT) * 3600000000
    GROUP BY g.patient_id, g.reading_id, g.measured_at, g.next_at, g.next_reading_id
);

-- The scope's episodes from its start: islands of consecutive breaching evaluations per (patient, family), and
-- the no-data gaps.
CREATE OR REPLACE VIEW alert_episodes AS
SELECT * EXCLUDE (island, base) FROM alert_islands('alert_marks')
UNION ALL BY NAME
SELECT * FROM alert_gaps('alert_reading_stream');

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
-- The level the episode opened at (its id is keyed by it), and when it escalated to `rule` if it rose since.
-- NULL opened_rule: made by a release before families, one alert per rule.
ALTER TABLE alerts ADD COLUMN IF NOT EXISTS opened_rule VARCHAR;
ALTER TABLE alerts ADD COLUMN IF NOT EXISTS escalated_at TIMESTAMPTZ;

-- Every acknowledgement of an alert, appended and never changed: who saw it, when, at which level, with what
-- note. `alerts` shows the latest (and forgets it when the alert escalates, to be seen again); a second
-- clinician's acknowledgement adds a row here instead of erasing the first one's note.
CREATE TABLE IF NOT EXISTS alert_acks (
    alert_id        VARCHAR NOT NULL,
    clinician_id    VARCHAR NOT NULL,
    acknowledged_at TIMESTAMPTZ NOT NULL,
    note            VARCHAR,
    rule            VARCHAR NOT NULL,      -- the level the alert had reached
    resolved        BOOLEAN NOT NULL       -- acknowledged after it had resolved
);
