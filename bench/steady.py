"""Steady state: what one ``rpm_pipeline`` run of a few thousand new readings costs on a large history.

    python -m bench.steady                                  # a 10M-reading history, 3 timed runs of 5,000
    python -m bench.steady --home /srv/steady10m --runs 5   # reuse (or first build) that history

The schedule (and each sealed segment) starts a run, so a run's cost on a big warehouse matters as much as a
big batch: the target is <= 5 s of work for 5,000 new readings on 10M. The history is generated once with
``bench.generate`` (``--size`` readings, ``--patients``; about 2.5 min at 10M) into ``--home``, or reused
from it when it already holds a warehouse. Each run then takes ``--then`` new readings from the devices of
1 % of the patients (``bench.landing``: the device mix, ~2 % invalid, ~1 % re-sent, measured over the last
day), through ``rpm pipeline run`` — a real Airflow run in a child process. Per task, the work seconds are
what the task's timed library call took (its XCom ``seconds``); "data total" is their sum.

Two warm-up runs come first and are reported apart: the new devices are a registry change (the telehealth
store is rebuilt whole once), and the serving folder needs its three snapshots before one can be reused.

Baselines, measured in the same run right after: the old paths of the two publish tasks on the same
warehouse — a full telehealth rebuild (``publish_telehealth(full=True)``, what every run did) and the whole
snapshot copy with its fsync (what ``publish_snapshot`` did).
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import Timer, machine, parser, print_table, write_json
from bench.landing import device_ids, write_landing
from core.settings import Settings

RPM = str(Path(sys.executable).with_name("rpm"))
TASKS = ("claim", "decode_normalise", "validate", "load", "evaluate_alerts", "record_run", "publish_snapshot",
         "publish_telehealth")
TARGET_S = 5.0
WARM_UP_RUNS = 2


def history(home: Path, size: int, patients: int) -> Settings:
    """The generated warehouse in ``home``: built unless it is already there."""
    from bench.generate import Plan, generate
    from rpmctl import services

    # This process reads the keys too (landing generation, the baselines): the runs stay under its account.
    s = Settings(home=home, run_as=Settings().run_as if os.geteuid() else "root")
    if not s.clinical_db.exists():
        home.mkdir(parents=True, exist_ok=True)
        os.chmod(home, 0o700)
        with Timer() as t:
            generate(s, Plan(patients, size), log=lambda line: print(f"  {line}", flush=True))
        print(f"  history generated in {t.seconds:.0f} s", flush=True)
    services.init(s)
    return s


def register_fleet(s: Settings, patients: int) -> None:
    """The landing generator's devices that the history lacks, enrolled to their patients (same numbering:
    a device the history already has is left as it is)."""
    import pandas as pd

    from warehouse.db import clinical, transaction

    devs = pd.DataFrame(device_ids(patients), columns=["device_id", "patient_id", "kind"])
    with clinical(s) as con, transaction(con):
        con.register("devs", devs)
        con.execute("INSERT INTO patients (patient_id) SELECT DISTINCT patient_id FROM devs ON CONFLICT DO NOTHING")
        con.execute("INSERT INTO devices (device_id, kind) SELECT device_id, kind FROM devs ON CONFLICT DO NOTHING")
        con.execute("""INSERT INTO enrollments
                       SELECT device_id, patient_id, now() - INTERVAL 120 DAY, NULL FROM devs
                       WHERE device_id NOT IN (SELECT device_id FROM enrollments)""")
        con.unregister("devs")


def run_pipeline(s: Settings) -> float:
    """Wall seconds of one ``rpm pipeline run`` child process."""
    t0 = time.perf_counter()
    out = subprocess.run([RPM, "pipeline", "run"], env={**os.environ, **s.as_env()}, capture_output=True,
                         text=True)
    if out.returncode != 0:
        raise RuntimeError(f"rpm pipeline run exited {out.returncode}:\n{(out.stdout + out.stderr)[-3000:]}")
    return time.perf_counter() - t0


def task_seconds(s: Settings) -> dict[str, float]:
    """Each task's work seconds in the latest run (its timed result in XCom), else Airflow's duration."""
    with sqlite3.connect(Path(s.airflow_home) / "airflow.db") as con:  # type: ignore[arg-type]
        (run_id,) = con.execute("SELECT run_id FROM dag_run WHERE dag_id = 'rpm_pipeline' ORDER BY id DESC LIMIT 1"
                                ).fetchone()
        durations = dict(con.execute("SELECT task_id, duration FROM task_instance WHERE dag_id = 'rpm_pipeline' "
                                     "AND run_id = ?", [run_id]).fetchall())
        xcoms = con.execute("SELECT task_id, value FROM xcom WHERE dag_id = 'rpm_pipeline' AND run_id = ? "
                            "AND key = 'return_value'", [run_id]).fetchall()
    seconds = {task: float(d or 0) for task, d in durations.items()}
    for task, value in xcoms:
        doc = json.loads(value) if isinstance(value, str | bytes) else value
        if isinstance(doc, dict) and isinstance(doc.get("seconds"), int | float):
            seconds[task] = float(doc["seconds"])
    return seconds


def loaded_total(s: Settings) -> int:
    from warehouse.db import clinical

    with clinical(s, read_only=True) as con:
        return con.execute("SELECT count(*) FROM readings").fetchone()[0]  # type: ignore[index]


def old_paths(s: Settings) -> dict[str, float]:
    """The two publish tasks as they were: the telehealth store rebuilt whole, the snapshot copied whole."""
    from warehouse.telehealth import publish_telehealth

    with Timer() as rebuild:
        publish_telehealth(s, full=True)
    tmp = Path(s.warehouse_dir) / "serving" / ".bench-copy.tmp"
    with Timer() as copy:
        shutil.copyfile(s.clinical_db, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    tmp.unlink()
    return {"publish_telehealth": rebuild.seconds, "publish_snapshot": copy.seconds}


def measure(home: Path, size: int, patients: int, then: int, runs: int) -> dict[str, Any]:
    s = history(home, size, patients)
    fleet = max(1, patients // 100)
    register_fleet(s, fleet)
    results = []
    for i in range(WARM_UP_RUNS + runs):
        landed = write_landing(s, then, fleet, seed=1000 + i + int(time.time()) % 100_000,
                               prefix=f"steady-{int(time.time())}-{i}", days=1)
        wall = run_pipeline(s)
        tasks = task_seconds(s)
        results.append({"run": i + 1, "warm_up": i < WARM_UP_RUNS, "new_readings": landed["items"],
                        "tasks_s": tasks, "data_s": sum(tasks.get(t, 0.0) for t in TASKS), "wall_s": wall,
                        "load_avg": os.getloadavg()[0]})
        print(f"  run {i + 1}: {landed['items']:,} readings, {results[-1]['data_s']:.2f} s of work, "
              f"{wall:.1f} s wall", flush=True)
    baseline = old_paths(s)
    return {"history": loaded_total(s), "patients": patients, "fleet": fleet, "runs": results,
            "baseline_s": baseline, "clinical_mb": s.clinical_db.stat().st_size / 2**20}


def report(r: dict[str, Any]) -> None:
    print_table(f"Steady-state runs on a {r['history']:,}-reading history ({r['fleet']} patients send; seconds "
                "of work per task)",
                ["run", "new readings", *TASKS, "data total", "target", "wall", "load avg"],
                [[f"{x['run']}{' (warm-up)' if x['warm_up'] else ''}", x["new_readings"],
                  *(x["tasks_s"].get(t, float("nan")) for t in TASKS), x["data_s"],
                  "-" if x["warm_up"] else ("met" if x["data_s"] <= TARGET_S else "NOT met"), x["wall_s"],
                  x["load_avg"]] for x in r["runs"]])
    timed = [x for x in r["runs"] if not x["warm_up"]]
    rows = []
    for task in ("publish_telehealth", "publish_snapshot"):
        new = sorted(x["tasks_s"].get(task, float("nan")) for x in timed)
        median = new[len(new) // 2] if new else float("nan")
        rows.append([task, median, r["baseline_s"][task], r["baseline_s"][task] / median if median else float("nan")])
    print_table(f"The publish tasks against their old paths, same warehouse, same run "
                f"(clinical file {r['clinical_mb']:,.0f} MiB)",
                ["task", "now s (median of the timed runs)", "old path s", "old / now"], rows)


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0], 10_000_000)
    p.add_argument("--patients", type=int, default=0, help="patients of the history (default: one per 1,000 readings)")
    p.add_argument("--then", type=int, default=5_000, help="new readings per run (default 5,000)")
    p.add_argument("--runs", type=int, default=3, help="timed runs after the warm-up (default 3)")
    p.add_argument("--home", help="RPM_HOME holding the history (built there if empty; default: a temporary "
                                  "folder, removed afterwards)")
    args = p.parse_args(argv)
    print(f"machine: {machine()}; load average {os.getloadavg()}", flush=True)
    home = Path(args.home) if args.home else None
    temporary = home is None
    if home is None:
        import tempfile

        home = Path(tempfile.mkdtemp(prefix="rpm-bench-steady-")) / "var"
    try:
        result = measure(home, args.size, args.patients or max(100, args.size // 1000), args.then, args.runs)
    finally:
        if temporary:
            shutil.rmtree(home.parent, ignore_errors=True)
    report(result)
    print(f"load average at the end: {os.getloadavg()}")
    write_json(args.json, "steady", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
