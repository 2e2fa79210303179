"""rpm_pipeline: landed MQTT segments -> decoded, validated readings in the clinical warehouse.

claim sealed segments -> decode + normalise (transforms/) -> validate (expectations/, Great Expectations)
-> load readings, quarantine, duplicates and the segment ledger together, one transaction per group of
segments (warehouse/) -> evaluate alert episodes -> record the run (counts, task durations, freshness)
-> publish the read-only serving snapshot clinicians query -> update the telehealth (pseudonymised) store
-> quality gate: a batch whose quarantine rate is above RPM_QUARANTINE_WARN skips the gate, above
RPM_QUARANTINE_FAIL fails it (and the run), so the grid shows it; what was loaded is published either way.

A run starts when ingest seals a landing segment (an asset event from the triggerer: pipeline/seal_trigger.py),
or every RPM_PIPELINE_SCHEDULE_MINUTES when nothing was sealed.

Wiring only: every task calls one function of `pipeline.tasks` and passes ids and counts, never data. Each
task is safe to retry, and re-running the whole run changes nothing (the ledger skips absorbed segments).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from airflow.sdk import dag, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from pipeline import tasks  # light at parse time: settings only; each task imports its step when it runs


@dag(
    dag_id="rpm_pipeline",
    # A newly sealed landing segment (the triggerer watches landing/sealed/), or RPM_PIPELINE_SCHEDULE_MINUTES.
    schedule=tasks.schedule(),
    start_date=datetime(2026, 1, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,  # one writer: DuckDB allows a single writing process (seals meanwhile queue one run)
    default_args={"retries": 2, "retry_delay": timedelta(seconds=15), "on_failure_callback": tasks.on_failure},
    tags=["rpm", "clinical"],
    doc_md=__doc__,
)
def rpm_pipeline():
    @task
    def claim() -> dict:
        """Claim the sealed landing segments no run has absorbed yet (up to RPM_PIPELINE_MAX_SEGMENTS): the
        batch is their names and a batch id derived from them, so a retried claim names the same batch."""
        return tasks.claim()

    @task
    def decode_normalise(batch) -> dict:  # batch: claim's XCom (Airflow resolves the XComArg)
        """Decode each landed message (one reading or a batch; vitals, device status, app events) and
        normalise it (canonical UCUM unit, LOINC, UTC time, reading id) into the encrypted staging tables. A
        segment that cannot be read is set aside in landing/rejected/; the rest of the batch goes on."""
        return tasks.decode_normalise(batch)

    @task
    def validate(batch) -> dict:
        """Run the Great Expectations suites on the staged rows; each failing row is recorded with every rule
        it broke (names and counts only leave the warehouse)."""
        return tasks.validate(batch)

    @task
    def load(batch) -> dict:
        """Commit readings, events, quarantine, duplicates and the segment ledger together, a group of whole
        segments per transaction; refuses a segment whose items do not balance."""
        return tasks.load(batch, get_current_context()["run_id"])

    @task
    def evaluate_alerts() -> dict:
        """Open, escalate and resolve alert episodes for the patients this load (or a registry change)
        touched, and everyone's current no-data gap."""
        return tasks.evaluate_alerts()

    @task
    def record_run() -> dict:
        """Record the run for ops: counts by outcome and rule, each task's seconds, freshness p50/p95, and its
        validation report (no values, no identifiers)."""
        ctx = get_current_context()
        results = {t: ctx["ti"].xcom_pull(task_ids=t) or {} for t in tasks.RECORDED_TASKS}
        return tasks.record_run(ctx["run_id"], ctx["dag_run"].start_date, results)

    @task
    def publish_snapshot() -> dict:
        """Publish a checkpointed, encrypted read-only copy of the warehouse for clinicians' queries."""
        return tasks.publish_snapshot()

    @task
    def publish_telehealth() -> dict:
        """Update the telehealth store (a limited data set: pseudonyms, dates by day or week) from the new
        snapshot with what this run loaded; rpm_daily rebuilds it whole."""
        return tasks.publish_telehealth()

    @task  # AirflowFailException and AirflowSkipException are final: no retry repeats a verdict
    def quality_gate(recorded) -> dict:  # recorded: record_run's XCom
        """Compare the batch's quarantine rate with RPM_QUARANTINE_WARN (skipped: pink) and
        RPM_QUARANTINE_FAIL (failed: red, the run is failed and `rpm ops status` says failing). The task log
        names the rate and the run's validation report."""
        gate = tasks.quality_gate(recorded)
        if gate["level"] == "fail":
            raise AirflowFailException(f"{gate['message']}; validation report: {gate['report']}")
        if gate["level"] == "warn":
            raise AirflowSkipException(f"{gate['message']}; validation report: {gate['report']}")
        return gate

    batch = claim()
    staged = decode_normalise(batch)
    checked = validate(batch)
    loaded = load(batch)
    recorded = record_run()
    staged >> checked >> loaded >> evaluate_alerts() >> recorded
    # Published before the gate judges: a bad batch's good readings reach clinicians all the same.
    recorded >> publish_snapshot() >> publish_telehealth() >> quality_gate(recorded)


rpm_pipeline()
