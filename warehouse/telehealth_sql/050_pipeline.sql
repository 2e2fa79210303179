-- Pipeline volume per UTC day, for the practice's trend of what its devices send and what is set aside.
-- Each run's id, instants, durations and freshness stay in the ops records (`rpm reports pipeline`,
-- `rpm ops status`): run ids and run times are instants, which this store does not hold.
CREATE OR REPLACE VIEW mart_pipeline_daily AS
SELECT day, runs, failed_runs, received, loaded, quarantined, duplicates,
       quarantined / nullif(received, 0) AS quarantine_rate
FROM pipeline_daily;
