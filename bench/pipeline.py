"""Pipeline benchmark: N landed readings through one real ``rpm_pipeline`` run, per stage, against the floor.

    python -m bench.pipeline                       # 200,000 readings (make bench)
    python -m bench.pipeline --size 1000000 --size 5000000 --size 10000000

For each size, in a fresh RPM_HOME: encrypted landing segments are generated (bench/landing.py: the device
mix, ~2% invalid, ~1% re-sent), then

- **floor** (baseline, same data, same run): decrypt every landed record (the at-rest encryption any reader
  pays) and let DuckDB alone parse the payloads and insert one row per reading into an encrypted file, with no
  validation, no deduplication and no accounting;
- **pipeline**: ``rpm pipeline run`` — a real Airflow run of the DAG in a child process. Each stage's work
  seconds are what the task's library call took (the run record, warehouse/ops.timed; Airflow's task instance
  duration for the publish tasks, which the record does not time); their sum gives readings/s. The rest of
  the wall time is Airflow's fixed cost (DAG parsing, task start-up, imports), reported separately. Peak
  memory is the child's maxrss.

The accounting identity is checked after every run (``rpm accounting --json``).

**Steady state** (``--then N``, default 5,000): the schedule runs the DAG every minute, so what a large
warehouse pays per run matters as much as one big batch. After the sized run, N more readings arrive from
the devices of 1 % of the patients (measured over the last day, new segments) and a second run takes them;
its per-stage seconds show which stages follow the batch and which follow the history.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import Timer, bench_home, machine, parser, print_table, write_json
from bench.landing import MESSAGES_PER_SEGMENT, register, write_landing
from core.settings import Settings
from rpmctl import services

RPM = str(Path(sys.executable).with_name("rpm"))
DATA_TASKS = ("claim", "decode_normalise", "validate", "load", "evaluate_alerts", "record_run",
              "publish_snapshot", "publish_telehealth")
# The target is on these (decode + validate + load + alerts); every task's seconds are printed too.
CORE_TASKS = ("decode_normalise", "validate", "load", "evaluate_alerts")
TARGET_READINGS_PER_S = 400_000
TARGET_PEAK_MB = 2048


def floor(s: Settings) -> dict[str, float]:
    """Seconds to decrypt the landing data, then for DuckDB alone to parse and insert it (no validation)."""
    import pandas as pd

    from core.keyring import Keyring
    from core.landing import list_sealed, read_segment_columns
    from warehouse.db import open_clinical

    keyring = Keyring.load(s, "landing")
    with Timer() as decrypt:
        # the landing format's own reader: one decryption per block (v2), the payloads as bytes
        payloads = [payload.decode("utf-8", "replace") for p in list_sealed(s.landing_dir)  # type: ignore[arg-type]
                    for payload in read_segment_columns(p, keyring).payload]
    frame = pd.DataFrame({"payload": payloads})
    con = open_clinical(s, db_path=Path(s.home) / "floor.duckdb")  # type: ignore[arg-type]
    try:
        with Timer() as insert:
            con.register("msgs", frame)
            con.execute("""
                CREATE TABLE floor AS
                WITH items AS (
                    SELECT CASE WHEN json_exists(payload, '$.readings')
                                THEN unnest(json_extract(payload, '$.readings[*]'))
                                ELSE payload::JSON END AS item
                    FROM msgs WHERE json_valid(payload))
                SELECT item->>'$.metric' AS metric, item->>'$.unit' AS unit,
                       TRY_CAST(item->>'$.value' AS DOUBLE) AS value,
                       TRY_CAST(item->>'$.measured_at' AS TIMESTAMPTZ) AS measured_at, item->>'$.msg_id' AS msg_id
                FROM items""")
            rows = con.execute("SELECT count(*) FROM floor").fetchone()[0]  # type: ignore[index]
    finally:
        con.close()
    return {"decrypt_s": decrypt.seconds, "duckdb_s": insert.seconds, "rows": rows}


def task_seconds(s: Settings) -> dict[str, float]:
    """Per-task work seconds of the latest run: the run record's library timings, else Airflow's duration."""
    from warehouse.db import clinical

    with clinical(s, read_only=True) as con:
        (recorded,) = con.execute("SELECT task_seconds FROM pipeline_runs ORDER BY finished_at DESC LIMIT 1"
                                  ).fetchone()  # type: ignore[misc]
    return {**airflow_durations(s), **{k: float(v) for k, v in json.loads(recorded).items() if v is not None}}


def _airflow_db(s: Settings) -> sqlite3.Connection:
    return sqlite3.connect(Path(s.airflow_home) / "airflow.db")  # type: ignore[arg-type]


def _latest_run(con: sqlite3.Connection) -> str:
    return con.execute("SELECT run_id FROM dag_run WHERE dag_id = 'rpm_pipeline' ORDER BY id DESC LIMIT 1"
                       ).fetchone()[0]


def airflow_durations(s: Settings) -> dict[str, float]:
    """Per-task duration (s) of the latest rpm_pipeline run, from Airflow's metadata DB."""
    with _airflow_db(s) as con:
        run_id = _latest_run(con)
        rows = con.execute("SELECT task_id, duration FROM task_instance WHERE dag_id = 'rpm_pipeline' "
                           "AND run_id = ?", [run_id]).fetchall()
    return {task: float(d or 0) for task, d in rows}


def task_peaks(s: Settings) -> dict[str, float]:
    """Each timed task's own peak RSS (MiB) in the latest run, from its XCom result (warehouse/ops.timed)."""
    with _airflow_db(s) as con:
        run_id = _latest_run(con)
        rows = con.execute("SELECT task_id, value FROM xcom WHERE dag_id = 'rpm_pipeline' AND run_id = ? "
                           "AND key = 'return_value'", [run_id]).fetchall()
    peaks = {}
    for task, value in rows:
        doc = json.loads(value) if isinstance(value, str | bytes) else value
        if isinstance(doc, dict) and doc.get("peak_rss_mb") is not None:
            peaks[task] = float(doc["peak_rss_mb"])
    return peaks


def run_pipeline(s: Settings) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one `rpm pipeline run` child process."""
    env = {**os.environ, **s.as_env()}
    t0 = time.perf_counter()
    proc = subprocess.Popen([RPM, "pipeline", "run"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"rpm pipeline run exited {proc.returncode}:\n{out[-3000:]}")
    return wall, usage.ru_maxrss / 1024


def accounting(s: Settings) -> dict[str, Any]:
    out = subprocess.run([RPM, "accounting", "--json"], env={**os.environ, **s.as_env()}, capture_output=True,
                         text=True)
    return json.loads(out.stdout)


def measure(size: int, patients: int, memory_limit: str, then: int) -> dict[str, Any]:
    # One run claims every segment (the default caps a run at 5,000 segments).
    with bench_home("pipeline", pipeline_max_segments=100_000, warehouse_memory_limit=memory_limit) as s:
        services.init(s)
        from warehouse.db import clinical

        with clinical(s):
            pass  # create and migrate the warehouse
        register(s, patients)
        with Timer() as gen:
            landed = write_landing(s, size, patients)
        print(f"  generated {landed['items']:,} readings in {landed['messages']:,} messages, "
              f"{landed['segments']} segments, in {gen.seconds:.1f}s", flush=True)
        base = floor(s)
        wall, peak_mb = run_pipeline(s)
        tasks = task_seconds(s)
        peaks = task_peaks(s)
        acc = accounting(s)
        if then:
            next_landed = write_landing(s, then, max(1, patients // 100), seed=8, prefix="bench-next", days=1)
            next_wall, _ = run_pipeline(s)
            next_tasks = task_seconds(s)
            next_acc = accounting(s)
    data_s = sum(tasks.get(t, 0.0) for t in DATA_TASKS)
    core_s = sum(tasks.get(t, 0.0) for t in CORE_TASKS)
    steady = {} if not then else {
        "size": next_landed["items"], "patients": max(1, patients // 100), "tasks_s": next_tasks,
        "data_s": sum(next_tasks.get(t, 0.0) for t in DATA_TASKS), "wall_s": next_wall,
        "balanced": next_acc.get("balanced")}
    return {"size": landed["items"], "messages": landed["messages"], "segments": landed["segments"],
            "tasks_s": tasks, "task_peak_mb": peaks, "data_s": data_s, "wall_s": wall, "airflow_fixed_s": wall - data_s,
            # Each task resets the process's high-water mark as it starts (pipeline/tasks.py), which ru_maxrss
            # follows on Linux: the process's peak is the larger of what is left and every task's own peak.
            "readings_per_s": landed["items"] / data_s, "peak_mb": max([peak_mb, *peaks.values()]),
            "ru_maxrss_mb": peak_mb,
            "core_s": core_s, "core_readings_per_s": landed["items"] / core_s,
            "floor": base, "floor_readings_per_s": base["rows"] / (base["decrypt_s"] + base["duckdb_s"]),
            "steady": steady, "accounting": {k: acc.get(k) for k in ("received", "loaded", "quarantined", "duplicates", "balanced")}}


def report(results: list[dict[str, Any]]) -> None:
    stages = [t for t in DATA_TASKS if any(t in r["tasks_s"] for r in results)]
    print_table("rpm_pipeline: work seconds per stage (one Airflow run)",
                ["readings", *stages, "data total", "Airflow fixed", "wall"],
                [[r["size"], *(r["tasks_s"].get(t, 0.0) for t in stages), r["data_s"], r["airflow_fixed_s"],
                  r["wall_s"]] for r in results])
    peaked = [t for t in DATA_TASKS if any(t in r.get("task_peak_mb", {}) for r in results)]
    if peaked:
        print_table("Peak RSS of each timed task (MiB; the high-water mark is reset as each task starts)",
                    ["readings", *peaked],
                    [[r["size"], *(r["task_peak_mb"].get(t, float("nan")) for t in peaked)] for r in results])
    print_table("Throughput and memory, against the floor measured in the same run (data stages: decode + "
                "validate + load + alerts; pipeline: every task above)",
                ["readings", "data stages s", "data stages readings/s", "target", "pipeline readings/s",
                 "floor readings/s (decrypt + DuckDB insert)", "floor decrypt s", "floor DuckDB s",
                 "data stages / floor", "pipeline / floor", "peak MiB (process)", "≤ 2 GiB"],
                [[r["size"], r["core_s"], r["core_readings_per_s"],
                  "≥ 400,000" if r["core_readings_per_s"] < TARGET_READINGS_PER_S else "met",
                  r["readings_per_s"], r["floor_readings_per_s"], r["floor"]["decrypt_s"], r["floor"]["duckdb_s"],
                  r["core_readings_per_s"] / r["floor_readings_per_s"],
                  r["readings_per_s"] / r["floor_readings_per_s"], r["peak_mb"],
                  "met" if r["peak_mb"] <= TARGET_PEAK_MB else "NOT met"] for r in results])
    print_table("Accounting after each run: received = loaded + quarantined + duplicates",
                ["readings", "received", "loaded", "quarantined", "duplicates", "balanced"],
                [[r["size"], *(r["accounting"][k] for k in ("received", "loaded", "quarantined", "duplicates",
                                                            "balanced"))] for r in results])
    steady = [r for r in results if r.get("steady")]
    if steady:
        print_table("Steady state: the next run, a small batch on top of that history (seconds)",
                    ["history", "new readings", "patients", *stages, "data total", "wall", "balanced"],
                    [[r["size"], r["steady"]["size"], r["steady"]["patients"],
                      *(r["steady"]["tasks_s"].get(t, 0.0) for t in stages), r["steady"]["data_s"],
                      r["steady"]["wall_s"], r["steady"]["balanced"]] for r in steady])
    if len(results) > 1:
        first = results[0]
        print_table("Scaling (cost per reading relative to the smallest size; 1.00 = linear)",
                    ["readings", "data s", "µs per reading", "relative"],
                    [[r["size"], r["data_s"], r["data_s"] / r["size"] * 1e6,
                      (r["data_s"] / r["size"]) / (first["data_s"] / first["size"])] for r in results])


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0], 200_000, repeat_size=True)
    p.add_argument("--patients", type=int, default=0, help="patients (default: one per 1,000 readings)")
    p.add_argument("--then", type=int, default=5_000,
                   help="readings of the steady-state run after each size (0: none; default 5,000)")
    p.add_argument("--memory-limit", default=Settings().warehouse_memory_limit,
                   help="RPM_WAREHOUSE_MEMORY_LIMIT of the run (default: the project's)")
    args = p.parse_args(argv)
    sizes = args.size or [200_000]
    results = []
    print(f"machine: {machine()}", flush=True)
    failed = []
    for size in sizes:
        print(f"\n{size:,} readings (segments of {MESSAGES_PER_SEGMENT:,} messages)", flush=True)
        load_before = os.getloadavg()
        try:
            results.append(measure(size, args.patients or max(100, size // 1000), args.memory_limit, args.then))
            # the machine may be shared: the 1-minute load average around the run says how much
            results[-1]["load_avg"] = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]
            print(f"  load average (1 min) before / after: {results[-1]['load_avg']}", flush=True)
        except RuntimeError as exc:  # a failed run is a result too: report it, keep the other sizes
            failed.append({"size": size, "error": str(exc)[-1500:]})
            print(f"  FAILED: {str(exc)[-1500:]}", flush=True)
            continue
        report(results)  # after every size, so a later failure loses nothing
    for f in failed:
        print(f"\n{f['size']:,} readings: the run FAILED (see above)")
    write_json(args.json, "pipeline", {"results": results, "failed": failed})
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
