"""rpm_pipeline: landed MQTT segments -> decoded, validated readings in the clinical warehouse.

claim sealed segments -> decode + normalise (transforms/) -> validate (expectations/, Great Expectations)
-> load readings, quarantine, duplicates and the segment ledger together, one transaction per group of
segments (warehouse/) -> evaluate alert episodes -> record the run (counts, task durations, freshness)
-> publish the read-only serving snapshot clinicians query -> rebuild the telehealth (pseudonymised) store.

Wiring only: every task calls one library function and passes ids and counts, never data. Each task is
safe to retry, and re-running the whole run changes nothing (the ledger skips absorbed segments).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from airflow.sdk import dag, get_current_context, task

from rpmctl.settings import Settings  # stdlib only: safe to read the schedule at parse time


def _on_failure(context) -> None:
    """Failed task (after its retries): leave a failed run record for `rpm ops status`."""
    from warehouse.ops import on_task_failure

    on_task_failure(context)


@dag(
    dag_id="rpm_pipeline",
    schedule=timedelta(minutes=Settings.from_env().pipeline_schedule_minutes),  # RPM_PIPELINE_SCHEDULE_MINUTES
    start_date=datetime(2026, 1, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,  # one writer: DuckDB allows a single writing process
    default_args={"retries": 2, "retry_delay": timedelta(seconds=15), "on_failure_callback": _on_failure},
    tags=["rpm", "clinical"],
    doc_md=__doc__,
)
def rpm_pipeline():
    @task
    def claim() -> dict:
        from warehouse.ledger import claim_segments
        from warehouse.ops import timed

        return timed(lambda s: claim_segments(s).to_xcom(), Settings.from_env())

    @task
    def decode_normalise(batch: dict) -> dict:
        from transforms.stage import stage_batch
        from warehouse.ledger import Batch
        from warehouse.ops import timed

        return timed(stage_batch, Settings.from_env(), Batch.from_xcom(batch))

    @task
    def validate(batch: dict, staged: dict) -> dict:
        from expectations.gate import validate_batch
        from expectations.suite import warm
        from warehouse.ledger import Batch
        from warehouse.ops import timed

        warm()  # GX's import is start-up, not work: the recorded seconds are the validation's own
        return timed(validate_batch, Settings.from_env(), Batch.from_xcom(batch))

    @task
    def load(batch: dict, failures_by_rule: dict) -> dict:
        from warehouse.ledger import Batch
        from warehouse.load import load_batch
        from warehouse.ops import timed

        run_id = get_current_context()["run_id"]
        return timed(load_batch, Settings.from_env(), Batch.from_xcom(batch), run_id)

    @task
    def evaluate_alerts(loaded: dict) -> dict:
        from warehouse.alerts import evaluate
        from warehouse.ops import timed

        return timed(evaluate, Settings.from_env())

    @task
    def record_run(claimed: dict, staged: dict, failures: dict, loaded: dict, alerts: dict) -> dict:
        from warehouse.ops import record_run, timed

        ctx = get_current_context()
        results = {"claim": claimed, "decode_normalise": staged, "validate": failures, "load": loaded,
                   "evaluate_alerts": alerts}
        return timed(record_run, Settings.from_env(), ctx["run_id"], ctx["dag_run"].start_date, results)

    @task
    def publish_snapshot(run: dict) -> dict:
        from warehouse.ops import timed
        from warehouse.serving import publish_snapshot

        return timed(lambda s: publish_snapshot(s).name, Settings.from_env())

    @task
    def publish_telehealth(snapshot: dict) -> dict:
        from warehouse.ops import timed
        from warehouse.telehealth import publish_telehealth

        return timed(publish_telehealth, Settings.from_env())

    batch = claim()
    staged = decode_normalise(batch)
    failures = validate(batch, staged)
    loaded = load(batch, failures)
    run = record_run(batch, staged, failures, loaded, evaluate_alerts(loaded))
    publish_telehealth(publish_snapshot(run))


rpm_pipeline()
