"""Alert evaluation on dense series: evaluate_alerts per reading across profiles and sizes, in real pipeline runs.

    python -m bench.alerts                                         # 30,000 readings of each profile (quick)
    python -m bench.alerts --size 300000 --size 1000000            # the issue's sizes
    python -m bench.alerts --profile cgm --size 10500000           # a year of CGM for 100 patients

For each profile and size, in a fresh RPM_HOME (bench/common.py), encrypted sealed segments are written as the
ingest service writes them and one ``rpm pipeline run`` (a real Airflow run, bench/pipeline.py) takes them all:

- **mixed** — bench/landing.py's device mix, 1,000 readings per patient over 90 days (bench/pipeline.py's
  profile);
- **cgm** — a CGM every 5 minutes uploading an hour at a time (batches of 12), nightly lows and afternoon
  highs; one patient per 105,000 readings (a year of CGM), at least 10;
- **scale** — a scale sending a weight every minute, one message each, to heart-failure patients (10 by
  default, so each series grows with the size), drifting, with a 1.3 kg gain every few days (day and week
  weight-gain alerts).

Reported per run: readings loaded, the data tasks' work seconds and readings/s (Airflow's fixed start-up
excluded, as in bench/pipeline.py), ``evaluate_alerts`` seconds and µs per reading, alert episodes. The scale
profile's baseline is the cgm profile at the same size, measured in the same invocation (the issue's target:
weights at ≥ half the CGM rate). After the runs, a full re-evaluation of the warehouse in this process gives
the evaluation's wall and CPU time per reading without Airflow (CPU time varies less on a shared machine).

**Steady state** (``--then N``, default 5,000): N more readings, the next minutes of *every* patient's series
(the worst case for a look-back: each touched patient has its whole history behind it), and a second run;
its ``evaluate_alerts`` seconds show whether evaluation follows the batch or the history.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from bench.common import Timer, bench_home, machine, parser, print_table, write_json
from bench.landing import BLOCK_RECORDS, register, write_landing
from bench.pipeline import DATA_TASKS, accounting, run_pipeline, task_seconds
from core.keyring import Keyring
from core.landing import SegmentWriter
from core.settings import Settings
from rpmctl import services

PROFILES = ("mixed", "cgm", "scale")
CGM_STEP = timedelta(minutes=5)
CGM_UPLOAD = 12                   # readings per CGM message: an hour
CGM_YEAR = 105_000                # ~ 365 days x 288 readings
SCALE_STEP = timedelta(minutes=1)
MESSAGES_PER_SEGMENT = 6_250      # as bench/landing.py: what a busy fleet lands in one 10-second segment


def _iso(ts: datetime) -> str:
    return ts.isoformat(timespec="seconds")


def _glucose(rng: random.Random, k: int) -> int:
    """mg/dL of a series' k-th reading: a daily curve with meals, a low (< 70, some < 54) from 02:00 to 04:00
    one night in four, a high (> 250) from 13:00 to 15:00 one day in five. Days and hours count from the
    series' start, so every run of a size sees the same values and the same alerts."""
    day, hour = divmod(k * CGM_STEP.total_seconds() / 3600, 24)
    value = 135 + 45 * math.sin((hour - 9) / 24 * 2 * math.pi) + rng.gauss(0, 12)
    if day % 4 == 0 and 2 <= hour < 4:
        value = 62 - 10 * math.sin((hour - 2) / 2 * math.pi) + rng.gauss(0, 3)
    if day % 5 == 0 and 13 <= hour < 15:
        value = 270 + rng.gauss(0, 15)
    return max(40, min(400, round(value)))


def _weight(rng: random.Random, base: float, minute: int) -> float:
    """kg: a slow drift, scale noise, and +1.3 kg for 12 hours every ~3.5 days (fluid retention)."""
    value = base + 1.5 * math.sin(minute / (60 * 24 * 20) * 2 * math.pi) + rng.gauss(0, 0.08)
    if minute % 5_000 < 720:
        value += 1.3
    return round(value, 2)


class Segments:
    """Encrypted sealed segments, as the ingest service writes them."""

    def __init__(self, s: Settings, prefix: str, received_at: datetime) -> None:
        self.s, self.prefix, self.received_at = s, prefix, received_at
        self.keyring = Keyring.load(s, "landing")
        self.writer: SegmentWriter | None = None
        self.counts = {"messages": 0, "items": 0, "segments": 0}

    def land(self, device_id: str, payload: dict, items: int) -> None:
        if self.writer is None or self.writer.records >= MESSAGES_PER_SEGMENT:
            self.seal()
            self.writer = SegmentWriter(self.s.landing_dir, f"{self.prefix}-{self.counts['segments']:06d}",
                                        keyring=self.keyring)  # type: ignore[arg-type]
            self.counts["segments"] += 1
        self.writer.append(f"rpm/v1/devices/{device_id}/vitals", json.dumps(payload).encode(), self.received_at)
        if self.writer.records % BLOCK_RECORDS == 0:
            self.writer.flush_block()
        self.counts["messages"] += 1
        self.counts["items"] += items

    def seal(self) -> None:
        if self.writer is not None:
            self.writer.seal()
            self.writer = None


def write_series(s: Settings, profile: str, patients: int, count: int, start: datetime, prefix: str,
                 first: int = 0) -> dict[str, int]:
    """Readings ``first`` .. ``first + count - 1`` of every patient's series, reading k measured at
    ``start + k * step``: a later call with a larger ``first`` continues the series (the steady state)."""
    segments = Segments(s, prefix, datetime.now(UTC))
    step = CGM_STEP if profile == "cgm" else SCALE_STEP
    for p in range(patients):
        rng = random.Random(p * 1_000_003 + first)
        base = 70 + (p * 7) % 50
        ks = range(first, first + count)
        if profile == "cgm":
            device = f"glu-{p:05d}"
            for i in range(0, count, CGM_UPLOAD):
                segments.land(device, {"readings": [
                    {"msg_id": f"c{p}-{k}", "metric": "blood_glucose", "unit": "mg/dL", "source": "cgm",
                     "value": _glucose(rng, k), "measured_at": _iso(start + k * step)}
                    for k in ks[i:i + CGM_UPLOAD]]}, len(ks[i:i + CGM_UPLOAD]))
        else:
            device = f"scale-{p:05d}"
            for k in ks:
                segments.land(device, {"msg_id": f"w{p}-{k}", "metric": "body_weight", "unit": "kg",
                                       "value": _weight(rng, base, k), "measured_at": _iso(start + k * step)}, 1)
    segments.seal()
    return segments.counts


def patients_for(profile: str, size: int, cgm_patients: int, scale_patients: int) -> int:
    if profile == "mixed":
        return max(10, size // 1_000)
    if profile == "cgm":
        return cgm_patients or max(10, round(size / CGM_YEAR))
    return scale_patients


def measure(profile: str, size: int, patients: int, then: int) -> dict[str, Any]:
    with bench_home(f"alerts-{profile}", pipeline_max_segments=100_000) as s:
        services.init(s)
        from warehouse.db import clinical

        with clinical(s):
            pass  # create and migrate the warehouse
        per_patient, next_per_patient = -(-size // patients), -(-then // patients)
        step = CGM_STEP if profile == "cgm" else SCALE_STEP
        # Series end so that the steady-state readings continue them up to half an hour ago.
        start = (datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=30)
                 - (per_patient + next_per_patient) * step)
        register(s, patients, since=min(start, datetime.now(UTC) - timedelta(days=120)) - timedelta(days=1))
        if profile == "scale":
            with clinical(s) as con:
                con.execute("UPDATE patients SET conditions = ['heart_failure']")
        with Timer() as gen:
            if profile == "mixed":
                landed = write_landing(s, size, patients)
            else:
                landed = write_series(s, profile, patients, per_patient, start, "dense")
        print(f"  {profile}: {landed['items']:,} readings, {patients:,} patients, {landed['segments']} "
              f"segments, generated in {gen.seconds:.1f}s", flush=True)
        wall, peak_mb = run_pipeline(s)
        tasks, acc = task_seconds(s), accounting(s)
        with clinical(s, read_only=True) as con:
            episodes, open_alerts = con.execute(
                "SELECT count(*), count(*) FILTER (resolved_at IS NULL) FROM alerts").fetchone()  # type: ignore[misc]
        steady: dict[str, Any] = {}
        if then:
            if profile == "mixed":
                more = write_landing(s, then, patients, seed=8, prefix="bench-next", days=1)
            else:
                more = write_series(s, profile, patients, next_per_patient, start, "next", first=per_patient)
            next_wall, _ = run_pipeline(s)
            next_tasks, next_acc = task_seconds(s), accounting(s)
            steady = {"size": more["items"], "patients": patients, "history_per_patient": per_patient,
                      "tasks_s": next_tasks, "evaluate_alerts_s": next_tasks.get("evaluate_alerts", 0.0),
                      "data_s": sum(next_tasks.get(t, 0.0) for t in DATA_TASKS), "wall_s": next_wall,
                      "balanced": next_acc.get("balanced")}
        # The same evaluation in this process over everything loaded, whole history: wall and CPU seconds (CPU
        # time varies less than wall time on a shared machine).
        from warehouse.alerts import refresh_alerts

        with clinical(s) as con:
            cpu, wall_t = time.process_time(), time.perf_counter()
            refresh_alerts(con, full=True)
            full = {"wall_s": time.perf_counter() - wall_t, "cpu_s": time.process_time() - cpu,
                    "readings": con.execute("SELECT count(*) FROM readings").fetchone()[0]}  # type: ignore[index]
    data_s = sum(tasks.get(t, 0.0) for t in DATA_TASKS)
    loaded = int(acc.get("loaded") or 0)
    alerts_s = tasks.get("evaluate_alerts", 0.0)
    return {"profile": profile, "size": landed["items"], "loaded": loaded, "patients": patients,
            "per_patient": per_patient, "messages": landed["messages"], "tasks_s": tasks, "data_s": data_s,
            "wall_s": wall, "peak_mb": peak_mb, "readings_per_s": loaded / data_s if data_s else float("nan"),
            "evaluate_alerts_s": alerts_s, "alerts_us_per_reading": alerts_s / loaded * 1e6 if loaded else float("nan"),
            "alerts": episodes, "open_alerts": open_alerts, "balanced": acc.get("balanced"), "steady": steady, "full": full}


def report(results: list[dict[str, Any]]) -> None:
    print_table("One rpm_pipeline run per profile and size (data tasks' work seconds; Airflow start-up excluded)",
                ["profile", "readings", "patients", "per patient", "data s", "readings/s", "evaluate_alerts s",
                 "µs per reading", "alerts (open)", "peak MiB", "balanced"],
                [[r["profile"], r["loaded"], r["patients"], r["per_patient"], r["data_s"], r["readings_per_s"],
                  r["evaluate_alerts_s"], r["alerts_us_per_reading"], f"{r['alerts']:,} ({r['open_alerts']:,})",
                  r["peak_mb"],
                  r["balanced"]] for r in results])
    print_table("A full re-evaluation of that warehouse afterwards, in-process (refresh_alerts, whole history)",
                ["profile", "readings", "per patient", "wall s", "CPU s", "wall µs per reading",
                 "CPU µs per reading"],
                [[r["profile"], r["full"]["readings"], r["per_patient"], r["full"]["wall_s"], r["full"]["cpu_s"],
                  r["full"]["wall_s"] / r["full"]["readings"] * 1e6, r["full"]["cpu_s"] / r["full"]["readings"] * 1e6]
                 for r in results])
    by = {(r["profile"], r["size"] // 1000): r for r in results}
    pairs = [(r, by.get(("cgm", r["size"] // 1000))) for r in results if r["profile"] == "scale"]
    if any(cgm for _, cgm in pairs):
        print_table("Weights against the same volume of CGM readings, same invocation (target: ratio ≥ 0.5)",
                    ["readings", "scale readings/s", "cgm readings/s", "ratio", "scale evaluate_alerts s",
                     "cgm evaluate_alerts s"],
                    [[w["size"], w["readings_per_s"], c["readings_per_s"], w["readings_per_s"] / c["readings_per_s"],
                      w["evaluate_alerts_s"], c["evaluate_alerts_s"]] for w, c in pairs if c])
    steady = [r for r in results if r.get("steady")]
    if steady:
        print_table("Steady state: the next run, a few readings for every patient on top of that history",
                    ["profile", "history", "history per patient", "new readings", "patients", "evaluate_alerts s",
                     "data s", "wall s", "balanced"],
                    [[r["profile"], r["loaded"], r["per_patient"], r["steady"]["size"], r["steady"]["patients"],
                      r["steady"]["evaluate_alerts_s"], r["steady"]["data_s"], r["steady"]["wall_s"],
                      r["steady"]["balanced"]] for r in steady])


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0], 30_000, repeat_size=True)
    p.add_argument("--profile", action="append", choices=PROFILES, help="repeatable (default: all three)")
    p.add_argument("--cgm-patients", type=int, default=0,
                   help="CGM patients (default: one per 105,000 readings, at least 10)")
    p.add_argument("--scale-patients", type=int, default=10, help="heart-failure patients weighed every minute")
    p.add_argument("--then", type=int, default=5_000, help="readings of the steady-state run (0: none)")
    args = p.parse_args(argv)
    print(f"machine: {machine()}", flush=True)
    results, failed = [], []
    for size in args.size or [30_000]:
        for profile in args.profile or PROFILES:
            patients = patients_for(profile, size, args.cgm_patients, args.scale_patients)
            print(f"\n{profile}, {size:,} readings", flush=True)
            try:
                results.append(measure(profile, size, patients, args.then))
            except RuntimeError as exc:  # a failed run is a result too: report it, keep the others
                failed.append({"profile": profile, "size": size, "error": str(exc)[-1500:]})
                print(f"  FAILED: {str(exc)[-1500:]}", flush=True)
                continue
            report(results)  # after every run, so a later failure loses nothing
    write_json(args.json, "alerts", {"results": results, "failed": failed})
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
