-- The per-patient-day rollup (sql/005_patient_days.sql) counted for the readings loaded before it existed;
-- from here on the load keeps it (warehouse/patient_days.py).
INSERT INTO patient_days BY NAME SELECT * FROM patient_days_of('readings');
INSERT INTO patient_day_zones
SELECT p.patient_id, p.time_zone FROM patients p WHERE p.patient_id IN (SELECT DISTINCT patient_id FROM readings);
