"""rpm_pipeline: landed MQTT segments -> decoded, validated readings in the clinical warehouse.

claim sealed segments -> decode + normalise (transforms/) -> validate (expectations/, Great Expectations)
-> load readings, quarantine, duplicates and the segment ledger in one transaction (warehouse/)
-> evaluate alert episodes -> publish the read-only serving snapshot clinicians query.

Wiring only: every task calls one library function and passes ids and counts, never data. Each task is
safe to retry, and re-running the whole run changes nothing (the ledger skips absorbed segments).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from airflow.sdk import dag, get_current_context, task


@dag(
    dag_id="rpm_pipeline",
    schedule=timedelta(minutes=2),
    start_date=datetime(2026, 1, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,  # one writer: DuckDB allows a single writing process
    default_args={"retries": 2, "retry_delay": timedelta(seconds=15)},
    tags=["rpm", "clinical"],
    doc_md=__doc__,
)
def rpm_pipeline():
    @task
    def claim() -> dict:
        from rpmctl.settings import Settings
        from warehouse.ledger import claim_segments

        return claim_segments(Settings.from_env()).to_xcom()

    @task
    def decode_normalise(batch: dict) -> dict:
        from rpmctl.settings import Settings
        from transforms.stage import stage_batch
        from warehouse.ledger import Batch

        return stage_batch(Settings.from_env(), Batch.from_xcom(batch))

    @task
    def validate(batch: dict, staged: dict) -> dict:
        from expectations.gate import validate_batch
        from rpmctl.settings import Settings
        from warehouse.ledger import Batch

        return validate_batch(Settings.from_env(), Batch.from_xcom(batch))

    @task
    def load(batch: dict, failures_by_rule: dict) -> dict:
        from rpmctl.settings import Settings
        from warehouse.ledger import Batch
        from warehouse.load import load_batch

        run_id = get_current_context()["run_id"]
        return load_batch(Settings.from_env(), Batch.from_xcom(batch), run_id)

    @task
    def evaluate_alerts(loaded: dict) -> dict:
        from rpmctl.settings import Settings
        from warehouse.alerts import evaluate

        return evaluate(Settings.from_env())

    @task
    def publish_snapshot(open_alerts: dict) -> str:
        from rpmctl.settings import Settings
        from warehouse.serving import publish_snapshot

        return publish_snapshot(Settings.from_env()).name

    batch = claim()
    staged = decode_normalise(batch)
    loaded = load(batch, validate(batch, staged))
    publish_snapshot(evaluate_alerts(loaded))


rpm_pipeline()
