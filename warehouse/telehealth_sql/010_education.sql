-- Patient education: who opens the assigned modules, who finishes them, and how long they spend.
-- Runs inside the rebuilt telehealth store (warehouse/telehealth.py): pseudonymous keys, patient-local weeks,
-- modules from the catalogue (anything else is 'other').

-- One row per person, module and patient-local week (Monday start): what the person did with the module.
CREATE OR REPLACE VIEW stg_education_person_weeks AS
SELECT module, week, person_key,
       bool_or(event = 'education_viewed') AS viewed,
       bool_or(event = 'education_completed') AS completed,
       -- minutes are reported per session; a person's time on the module is their sum
       sum(minutes) AS minutes
FROM education_events
GROUP BY module, week, person_key;

-- Completion is counted over everyone who engaged: an app may report a completion without the view
-- that preceded it (offline session), and that person did open the module.
CREATE OR REPLACE VIEW mart_education_weekly AS
SELECT module, week, people_viewed, people_completed, people_engaged,
       people_completed / nullif(people_engaged, 0) AS completion_rate,
       total_minutes, median_minutes_per_person
FROM (SELECT module, week,
             count(*) FILTER (WHERE viewed) AS people_viewed,
             count(*) FILTER (WHERE completed) AS people_completed,
             count(*) AS people_engaged,
             sum(minutes) AS total_minutes,
             median(minutes) AS median_minutes_per_person
      FROM stg_education_person_weeks
      GROUP BY module, week);
