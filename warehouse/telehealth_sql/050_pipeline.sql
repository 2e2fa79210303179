-- Pipeline health for the ops team: every rpm_pipeline run, newest first, with its counts, duration and
-- freshness (seconds from measurement to broker, broker to warehouse, end to end; p50/p95 of the run).
-- The failure's error text is left out: exception messages can quote the ids of the rows they failed on.
CREATE OR REPLACE VIEW mart_pipeline_health AS
SELECT row_number() OVER (ORDER BY finished_at DESC, run_id DESC) AS recency,
       run_id, state, started_at, finished_at,
       date_diff('millisecond', started_at, finished_at) / 1000.0 AS duration_s,
       segments, messages, received, loaded, quarantined, duplicates,
       CAST(quarantined_by_rule AS VARCHAR) AS quarantined_by_rule,
       CAST(task_seconds AS VARCHAR) AS task_seconds,
       measured_to_received_p50_s, measured_to_received_p95_s,
       received_to_loaded_p50_s, received_to_loaded_p95_s,
       measured_to_loaded_p50_s, measured_to_loaded_p95_s,
       failed_task
FROM pipeline_runs;
