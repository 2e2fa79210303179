"""The stack's executor (pipeline/executor.py): task processes start with the pipeline's steps imported.

Run in a fresh interpreter, as the scheduler runs it: the executor is started for real, and its worker
processes — what every task process is forked from — are looked at from outside.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = """
import json, sys
from pathlib import Path
from pipeline.executor import PreloadedLocalExecutor
from pipeline.tasks import STEP_MODULES

assert "duckdb" not in sys.modules and "great_expectations" not in sys.modules  # nothing imported them yet
executor = PreloadedLocalExecutor(parallelism=2)
executor.start()
try:
    # extension modules a worker has loaded are mapped into it: DuckDB's and pandas' libraries
    maps = {pid: Path(f"/proc/{pid}/maps").read_text() for pid in executor.workers}
    print("SEEN " + json.dumps({"workers": len(maps),
                      "duckdb": [("duckdb" in m) for m in maps.values()],
                      "pandas": [("pandas/_libs" in m) for m in maps.values()],
                      "imported": [m for m in (*STEP_MODULES, "great_expectations") if m in sys.modules],
                      "steps": list(STEP_MODULES)}))
finally:
    executor.end()
"""


def test_workers_are_forked_with_the_steps_already_imported(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300,
                         env={"AIRFLOW_HOME": str(tmp_path), "PATH": "/usr/bin:/bin",
                              "GX_ANALYTICS_ENABLED": "false"})
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(next(line[5:] for line in out.stdout.splitlines() if line.startswith("SEEN ")))
    assert seen["workers"] == 2
    assert all(seen["duckdb"]) and all(seen["pandas"]), "a worker was forked before the steps were imported"
    assert seen["imported"] == [*seen["steps"], "great_expectations"]
