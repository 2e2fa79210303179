"""DAG integrity: every DAG in dags/ imports cleanly, is wired as designed, and does no work at parse time."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
DAGS = REPO / "dags"
HEAVY = ("pandas", "duckdb", "great_expectations", "paho")
PIPELINE_ORDER = ["claim", "decode_normalise", "validate", "load", "evaluate_alerts", "record_run", "publish_snapshot", "publish_telehealth"]


@pytest.fixture(scope="module")
def dagbag(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    # Airflow reads AIRFLOW_HOME once, at import: set it before the first import of airflow.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AIRFLOW_HOME", str(tmp_path_factory.mktemp("airflow_home")))
        mp.setenv("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
        from airflow.dag_processing.dagbag import DagBag

        yield DagBag(dag_folder=str(DAGS))


def test_dags_import_without_errors(dagbag) -> None:
    assert dagbag.import_errors == {}
    assert "rpm_pipeline" in dagbag.dags


def test_rpm_pipeline_tasks_run_claim_decode_validate_load(dagbag) -> None:
    dag = dagbag.dags["rpm_pipeline"]
    assert set(PIPELINE_ORDER) <= set(dag.task_ids)
    order = [t.task_id for t in dag.topological_sort()]
    assert order[: len(PIPELINE_ORDER)] == PIPELINE_ORDER
    for upstream, downstream in zip(PIPELINE_ORDER, PIPELINE_ORDER[1:], strict=False):
        assert upstream in dag.get_task(downstream).upstream_task_ids, f"{upstream} must run before {downstream}"
    assert dag.get_task("claim").upstream_task_ids == set()
    # Anything else (alerts, snapshots) works on loaded data: it must wait for the load.
    after_load = dag.get_task("load").get_flat_relative_ids(upstream=False)
    assert set(dag.task_ids) - set(PIPELINE_ORDER) <= after_load


def test_rpm_pipeline_runs_one_at_a_time_without_backfill_and_retries(dagbag) -> None:
    dag = dagbag.dags["rpm_pipeline"]
    assert dag.max_active_runs == 1  # DuckDB allows a single writing process
    assert dag.catchup is False
    for task in dag.tasks:
        assert task.retries >= 1, f"{task.task_id} is not retried"


def test_the_quality_gate_judges_after_everything_is_published(dagbag) -> None:
    """A bad batch's good readings still reach clinicians: the gate runs last, after both publishes."""
    dag = dagbag.dags["rpm_pipeline"]
    gate = dag.get_task("quality_gate")
    assert {"record_run", "publish_telehealth"} <= gate.upstream_task_ids
    assert gate.downstream_task_ids == set()


def test_both_dags_record_a_failed_task_for_ops(dagbag) -> None:
    """rpm_daily fails as visibly as rpm_pipeline: every task of both has the failure callback that records the
    failed run (`rpm ops status` reads it), and rpm_daily records its successful runs too."""
    from pipeline import tasks

    for dag_id in ("rpm_pipeline", "rpm_daily"):
        for task in dagbag.dags[dag_id].tasks:
            callbacks = task.on_failure_callback
            callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
            assert tasks.on_failure in callbacks, f"{dag_id}.{task.task_id} has no failure callback"


def _top_level_imports(path: Path) -> Iterator[tuple[int, str]]:
    for node in ast.parse(path.read_text(), filename=str(path)).body:  # top-level statements only
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module


def test_dag_files_do_not_import_heavy_libraries_at_top_level() -> None:
    files = sorted(DAGS.glob("*.py"))
    assert files, "no DAG files found"
    offending = [f"{p.name}:{line} imports {mod}" for p in files for line, mod in _top_level_imports(p)
                 if mod.split(".")[0] in HEAVY]
    assert offending == []


def test_parsing_the_dags_loads_no_heavy_library_even_indirectly(tmp_path: Path) -> None:
    """A top-level import of a project module (e.g. warehouse.load) would pull duckdb in transitively."""
    probe = (
        "import importlib.util, pathlib, sys\n"
        f"for p in sorted(pathlib.Path({str(DAGS)!r}).glob('*.py')):\n"
        "    spec = importlib.util.spec_from_file_location(p.stem, p)\n"
        "    spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
        f"print('HEAVY:' + ','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    env = {"AIRFLOW_HOME": str(tmp_path), "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "HOME": str(tmp_path),
           "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120,
                          cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    [loaded] = [line for line in done.stdout.splitlines() if line.startswith("HEAVY:")]
    assert loaded == "HEAVY:", f"imported while parsing the DAGs: {loaded.removeprefix('HEAVY:')}"


def test_rpm_daily_purges_before_rebuilding_reports_once_a_day(dagbag) -> None:
    dag = dagbag.dags["rpm_daily"]
    assert [t.task_id for t in dag.topological_sort()] == ["purge_landing", "prune_artifacts",
                                                           "compact_warehouse", "rebuild_reports", "record_run"]
    assert dag.max_active_runs == 1 and dag.catchup is False
    assert all(t.retries >= 1 for t in dag.tasks)
