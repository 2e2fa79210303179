-- Which DAG a run record belongs to: rpm_daily records its runs (and failures) beside rpm_pipeline's, so the
-- ops verdict covers housekeeping too. Its records' run ids carry the DAG's name ("rpm_daily:<run id>"):
-- Airflow's run ids are unique per DAG only, and both DAGs have a scheduled run at midnight.
ALTER TABLE pipeline_runs ADD COLUMN IF NOT EXISTS dag_id VARCHAR DEFAULT 'rpm_pipeline';
