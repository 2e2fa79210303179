"""The pipeline's steps as the DAG's tasks run them — each with its own warehouse connection, as separate task
processes would — for tests that drive a batch through claim, stage, validate and load. Results come back as
the dicts the tasks hand to XCom; ``sizes`` shrinks the chunks (pipeline.Sizes) without touching the code."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from core.settings import Settings
from pipeline import Sizes, tasks
from pipeline import stage as stage_step
from pipeline import validate as validate_step
from warehouse import ledger
from warehouse import load as load_step
from warehouse.db import clinical
from warehouse.ledger import Batch

SIZES = Sizes()


def claim_segments(s: Settings) -> Batch:
    with clinical(s) as con:
        return ledger.claim_segments(con, s.landing_dir, s.pipeline_max_segments)


def stage_batch(s: Settings, batch: Batch, sizes: Sizes = SIZES) -> dict:
    with clinical(s) as con:
        return stage_step.stage_batch(con, s, batch, sizes.stage_messages, sizes.stage_items).to_xcom()


def validate_batch(s: Settings, batch: Batch, sizes: Sizes = SIZES) -> dict:
    with clinical(s) as con:
        return validate_step.validate_batch(con, s, batch, sizes.validate_rows).to_xcom()


def load_batch(s: Settings, batch: Batch, run_id: str, sizes: Sizes = SIZES) -> dict:
    with clinical(s) as con:
        return load_step.load_batch(con, batch, run_id, sizes.load_items).to_xcom()


def run_pipeline_in_process(s: Settings) -> dict:
    """What `rpm pipeline run` does, without Airflow: seal what ingest has landed, then rpm_pipeline's tasks in
    the DAG's order, in this process (no ~10-15 s of Airflow start-up per run). For tests that only need the
    data loaded; the run is recorded (ops status, validation report), the snapshot and the telehealth store
    published. Not produced here: an Airflow run id, Airflow's metadata, run/pipeline-run.log, the command's
    exit code and output — tests that assert on those run `rpm pipeline run` (tests/integration/test_end_to_end.py).

    Returns what `rpm pipeline run --json` prints: run_id, state, tasks (each task's result) and rejected."""
    from rpmctl.services.airflow_run import seal_open_segments
    from warehouse.serving import serving

    seal_open_segments(s)
    run_id = f"in_process__{datetime.now(UTC).isoformat()}-{time.monotonic_ns()}"
    started_at = datetime.now(UTC)
    results: dict[str, dict] = {}
    batch = results["claim"] = tasks.claim(s)  # every later task takes the claim's batch, as the DAG wires it
    results["decode_normalise"] = tasks.decode_normalise(batch, s)
    results["validate"] = tasks.validate(batch, s)
    results["load"] = tasks.load(batch, run_id, s)
    results["evaluate_alerts"] = tasks.evaluate_alerts(s)
    recorded = {t: results[t] for t in tasks.RECORDED_TASKS}
    results["record_run"] = tasks.record_run(run_id, started_at, recorded, s)
    results["publish_snapshot"] = tasks.publish_snapshot(s)
    results["publish_telehealth"] = tasks.publish_telehealth(s)
    results["quality_gate"] = tasks.quality_gate(results["record_run"], s)
    with serving(s) as con:  # what this run set aside, as run_once reports it
        rejected = [{"segment": r[0], "reason": r[1]} for r in con.execute(
            "SELECT segment, reason FROM rejected_segments WHERE run_id = ? ORDER BY segment", [run_id]
        ).fetchall()]
    return {"run_id": run_id, "state": "success", "tasks": results, "rejected": rejected}
