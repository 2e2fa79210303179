-- Telehealth appointments: how many were kept, by modality (video, phone, in person).
-- `appointments` holds one row per appointment with its outcome (its latest event, decided when the store was
-- built) and the patient-local week of that outcome; no appointment time is stored.

-- `scheduled` = still booked (no outcome yet). Completion and no-show rates are over appointments that
-- were due and resolved (attended + no-show): a cancellation is neither kept nor missed.
-- The 'all' row is the sum of the modalities: published reports suppress around it (warehouse/reports.py).
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
      FROM (SELECT coalesce(modality, 'unknown') AS modality, outcome FROM appointments)
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
      FROM (SELECT week, coalesce(modality, 'unknown') AS modality, outcome FROM appointments)
      GROUP BY GROUPING SETS ((week, modality), (week)));
