-- Telehealth appointments: how many were kept, by modality (video, phone, in person).

-- Each appointment's outcome is its latest event: a no-show corrected to attended, or a booking later
-- cancelled, counts once, as what finally happened. At the same instant an outcome outranks the booking.
-- The modality is the latest one given (a video visit moved to phone is a phone visit).
CREATE OR REPLACE VIEW stg_appointment_outcomes AS
SELECT appointment_key, person_key, outcome, coalesce(last_modality, 'unknown') AS modality,
       occurred_at AS outcome_at, occurred_on AS outcome_on, week
FROM (SELECT appointment_key, person_key, occurred_at, occurred_on, week,
             replace(event, 'appointment_', '') AS outcome,
             CASE event WHEN 'appointment_scheduled' THEN 0 ELSE 1 END AS outcome_rank, event_key,
             last_value(modality IGNORE NULLS) OVER (
                 PARTITION BY appointment_key
                 ORDER BY occurred_at, CASE event WHEN 'appointment_scheduled' THEN 0 ELSE 1 END, event_key
                 ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING) AS last_modality
      FROM appointment_events)
QUALIFY row_number() OVER (PARTITION BY appointment_key
                           ORDER BY occurred_at DESC, outcome_rank DESC, event_key DESC) = 1;

-- `scheduled` = still booked (no outcome yet). Completion and no-show rates are over appointments that
-- were due and resolved (attended + no-show): a cancellation is neither kept nor missed.
CREATE OR REPLACE VIEW mart_appointments_by_modality AS
SELECT modality, appointments, scheduled, attended, no_show, cancelled,
       attended / nullif(attended + no_show, 0) AS completion_rate,
       no_show / nullif(attended + no_show, 0) AS no_show_rate
FROM (SELECT CASE WHEN grouping(modality) = 1 THEN 'all' ELSE modality END AS modality,
             count(*) AS appointments,
             count(*) FILTER (WHERE outcome = 'scheduled') AS scheduled,
             count(*) FILTER (WHERE outcome = 'attended') AS attended,
             count(*) FILTER (WHERE outcome = 'no_show') AS no_show,
             count(*) FILTER (WHERE outcome = 'cancelled') AS cancelled
      FROM stg_appointment_outcomes
      GROUP BY GROUPING SETS ((modality), ()));

-- The same by patient-local week of the outcome (the week the appointment was kept, missed or cancelled).
CREATE OR REPLACE VIEW mart_appointments_weekly AS
SELECT week, modality, appointments, scheduled, attended, no_show, cancelled,
       attended / nullif(attended + no_show, 0) AS completion_rate,
       no_show / nullif(attended + no_show, 0) AS no_show_rate
FROM (SELECT week, CASE WHEN grouping(modality) = 1 THEN 'all' ELSE modality END AS modality,
             count(*) AS appointments,
             count(*) FILTER (WHERE outcome = 'scheduled') AS scheduled,
             count(*) FILTER (WHERE outcome = 'attended') AS attended,
             count(*) FILTER (WHERE outcome = 'no_show') AS no_show,
             count(*) FILTER (WHERE outcome = 'cancelled') AS cancelled
      FROM stg_appointment_outcomes
      GROUP BY GROUPING SETS ((week, modality), (week)));
