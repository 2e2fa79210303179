-- Each patient's latest reading per metric (sql/005_patient_days.sql, patient_latest) folded once from the
-- day rollup the warehouse already keeps; from here on the load keeps it beside the days
-- (warehouse/patient_days.py). Numbered 006: 005 is taken by the readings-key change of issue 15; the
-- two are independent, in either order. Folded afresh, so it also settles a warehouse that held rows already.
DELETE FROM patient_latest;
INSERT INTO patient_latest BY NAME SELECT * FROM patient_latest_of('patient_days');
