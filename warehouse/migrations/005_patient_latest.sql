-- Each patient's latest reading per metric (sql/005_patient_days.sql, patient_latest) folded once from the
-- day rollup the warehouse already keeps; from here on the load keeps it beside the days
-- (warehouse/patient_days.py).
INSERT INTO patient_latest BY NAME SELECT * FROM patient_latest_of('patient_days');
