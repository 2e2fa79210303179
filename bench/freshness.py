"""Freshness of the long-lived stack: a device's publish -> the reading visible to a clinician's query.

Issue 15 item 6, target p95 <= 45 s (issue 6 asked for 2 minutes). The run records (warehouse/ops.py) only see received -> loaded; a
clinician sees a reading once a serving snapshot containing it is published. So this script runs the whole
stack as a user does (`rpm up --airflow` in an isolated RPM_HOME, the scheduled rpm_pipeline DAG), publishes
probe readings with unique ``measured_at`` over MQTT, and polls the clinician path
(``ClinicianSession.patient``, what `rpm clinician --as C patient P` runs) until each probe shows up.
Afterwards it splits every probe's latency into the budget's parts from the warehouse (received_at,
loaded_at, run_id), the landing folder (when the segment was sealed) and Airflow's REST API (when each task
of the run started and ended):

    publish -> received (ingest) -> sealed (segment_max_age_s) -> run due (the seal's asset event, or the
    schedule) -> its first task starts (at once, or after the run in flight: max_active_runs=1) -> loaded
    (claim, decode, validate, load) -> snapshot published (alerts, record, publish) -> seen (the clinician's
    poll)

    python -m bench.freshness [--minutes M] [--interval S] [--schedule-minutes K] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.common import bench_home, free_port, parser, percentile, print_table, summary_ms, write_json
from core.settings import Settings

RPM = str(Path(sys.executable).with_name("rpm"))
PATIENT = "pt-fresh-1"
CLINICIAN = "dr-fresh"
DAG = "rpm_pipeline"
# One metric per device: mart_latest_vitals keeps one row per (patient, metric), so each latest row belongs
# to exactly one probe device and the probes of a device arrive in measured_at order.
DEVICES: dict[str, tuple[str, str]] = {  # device id -> (kind, metric)
    "fresh-bp-1": ("bp", "blood_pressure"),
    "fresh-ox-1": ("ox", "spo2"),
    "fresh-th-1": ("thermo", "body_temperature"),
}
TARGET_P95_S = 45.0  # issue 15 item 6 (issue 6 asked for 120 s with the schedule alone)
TASKS = ("claim", "decode_normalise", "validate", "load", "evaluate_alerts", "record_run", "publish_snapshot",
         "publish_telehealth")
BUDGET = (  # (label, start field, end field) of Probe: consecutive, so the parts add up to publish -> visible
    ("publish -> received by ingest", "published_at", "received_at"),
    ("received -> segment sealed", "received_at", "sealed_at"),
    ("sealed -> run due (seal event or schedule)", "sealed_at", "run_due_at"),
    ("run due -> its claim task starts", "run_due_at", "claim_started_at"),
    ("claim starts -> loaded (claim..load)", "claim_started_at", "loaded_at"),
    ("loaded -> snapshot published", "loaded_at", "snapshot_at"),
    ("snapshot published -> seen by poll", "snapshot_at", "visible_at"),
)


@dataclass
class Probe:
    """One probe reading and when (epoch seconds) it passed each stage; None where not (yet) known."""

    seq: int
    device_id: str
    metric: str
    measured_at: str  # RFC 3339 with milliseconds: unique per device, hence a unique reading_id
    published_at: float
    acked_at: float | None = None
    visible_at: float | None = None
    received_at: float | None = None
    sealed_at: float | None = None
    loaded_at: float | None = None
    run_id: str | None = None
    run_due_at: float | None = None
    claim_started_at: float | None = None
    snapshot_at: float | None = None

    def span(self, start: str, end: str) -> float | None:
        a, b = getattr(self, start), getattr(self, end)
        return None if a is None or b is None else b - a


@dataclass
class Outcome:
    """What the probe phase observed; Airflow's runs and the warehouse's records are attached afterwards."""

    probes: list[Probe] = field(default_factory=list)
    window: tuple[float, float] = (0.0, 0.0)
    poll_seconds: list[float] = field(default_factory=list)
    warmup_s: float = 0.0
    stack_up_s: float = 0.0
    dag_runs: list[dict] = field(default_factory=list)
    run_records: list[dict] = field(default_factory=list)
    quarantined: int = 0
    last_progress: float = 0.0
    stack_cpu_s: float = 0.0  # CPU the Airflow stack used during the probe window
    load_avg: tuple[float, float] = (0.0, 0.0)  # 1-minute load average at the window's start and end


# --- the stack, driven through the `rpm` command as a user would ----------------------------------------

def rpm(s: Settings, *args: str, timeout: float = 600) -> str:
    """Run the `rpm` console script with these settings; its stdout (never printed: `up` shows a password)."""
    proc = subprocess.run([RPM, *args], env={**os.environ, **s.as_env()}, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        detail = (proc.stderr.strip() or proc.stdout.strip())[-2000:]  # `--json` errors go to stdout
        raise RuntimeError(f"rpm {' '.join(args[:2])} exited {proc.returncode}: {detail}")
    return proc.stdout


def provision(s: Settings, devices: int) -> dict[str, str]:
    """A patient, their clinician on the care team and ``devices`` probe devices; returns device -> password.

    Done before `rpm up`: registry commands write the clinical file, which the DAG's tasks hold while running.
    """
    rpm(s, "init")
    rpm(s, "patients", "add", PATIENT, "--tz", "UTC", "--conditions", "hypertension,copd")
    rpm(s, "careteam", "add", CLINICIAN, "--patient", PATIENT, "--name", "Freshness Probe", "--role", "nurse")
    return {device: json.loads(rpm(s, "devices", "add", device, "--patient", PATIENT, "--kind", kind,
                                   "--json"))["password"]
            for device, (kind, _) in list(DEVICES.items())[:devices]}


def start_stack(s: Settings) -> float:
    """`rpm up --airflow`: broker, ingest and Airflow healthy, DAGs unpaused; returns the seconds it took."""
    t0 = time.monotonic()
    info = json.loads(rpm(s, "up", "--airflow", "--json"))
    dags = info["airflow"]["dags"]
    if dags.get(DAG) != "unpaused":
        raise RuntimeError(f"{DAG} is not running: {dags.get(DAG)}")
    return time.monotonic() - t0


@contextmanager
def shielded() -> Iterator[None]:
    """A second Ctrl-C (or SIGTERM) must not interrupt the teardown that the first one started."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _terminate(signum: int, _frame: object) -> None:
    """SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so the stack is stopped on the way out."""
    raise SystemExit(128 + signum)


def stop_stack(s: Settings) -> None:
    """`rpm down`: Airflow first (its tasks may be writing the warehouse), then ingest and the broker."""
    with shielded():
        try:
            rpm(s, "down", "--json", timeout=240)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            print(f"warning: rpm down: {exc}", file=sys.stderr)


# --- Airflow's view of the runs ------------------------------------------------------------------------

def epoch(value: Any) -> float | None:
    """An Airflow or DuckDB timestamp (ISO text or datetime) as epoch seconds."""
    if value is None:
        return None
    ts = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return (ts if ts.tzinfo else ts.replace(tzinfo=UTC)).timestamp()


def dag_runs(s: Settings, jwt: str, dag_id: str = DAG) -> list[dict]:
    from rpmctl.services.airflow_stack import api

    return api(s, "GET", f"/api/v2/dags/{dag_id}/dagRuns?order_by=run_after&limit=100", token=jwt)["dag_runs"]


def task_instances(s: Settings, jwt: str, run_id: str) -> dict[str, dict]:
    from urllib.parse import quote

    from rpmctl.services.airflow_stack import api

    tis = api(s, "GET", f"/api/v2/dags/{DAG}/dagRuns/{quote(run_id, safe='')}/taskInstances",
              token=jwt)["task_instances"]
    return {ti["task_id"]: ti for ti in tis}


def wait_first_run(s: Settings, timeout: float) -> float:
    """Wait until the stack's first scheduled rpm_pipeline run has ended (cold imports, first snapshot), so
    the probes measure the steady state; returns the seconds waited. Polls with a deadline, no fixed sleep."""
    from rpmctl.services.airflow_stack import token

    t0 = time.monotonic()
    jwt = token(s)
    while time.monotonic() - t0 < timeout:
        if any(r["state"] in ("success", "failed") for r in dag_runs(s, jwt)):
            return time.monotonic() - t0
        time.sleep(2.0)
    print(f"warning: no {DAG} run ended within {timeout:.0f}s of start; probing anyway", file=sys.stderr)
    return time.monotonic() - t0


def wait_runs_idle(s: Settings, timeout: float) -> None:
    """Let the run in flight when the last probe became visible finish, so its task times are complete."""
    from rpmctl.services.airflow_stack import token

    jwt = token(s)
    deadline = time.monotonic() + timeout
    while any(r["state"] in ("queued", "running") for r in dag_runs(s, jwt)):
        if time.monotonic() > deadline:
            print(f"warning: a {DAG} run was still in flight after {timeout:.0f}s", file=sys.stderr)
            return
        time.sleep(1.0)


def collect_runs(s: Settings, since: float, until: float) -> list[dict]:
    """rpm_pipeline runs that overlap the probe window, each with its task instances (rpm_daily noted too)."""
    from rpmctl.services.airflow_stack import token

    jwt = token(s)
    runs = []
    for dag_id in (DAG, "rpm_daily"):
        for r in dag_runs(s, jwt, dag_id):
            start, end = epoch(r.get("start_date")), epoch(r.get("end_date"))
            if start is None or start > until or (end is not None and end < since):
                continue
            tis = task_instances(s, jwt, r["dag_run_id"]) if dag_id == DAG else {}
            runs.append({"dag_id": dag_id, "run_id": r["dag_run_id"], "run_type": r.get("run_type"),
                         "state": r.get("state"), "run_after": epoch(r.get("run_after")),
                         "queued_at": epoch(r.get("queued_at")), "start": start, "end": end,
                         "tasks": {t: _ti(ti) for t, ti in tis.items()}})
    return runs


def _ti(ti: dict) -> dict:
    return {"state": ti.get("state"), "queued": epoch(ti.get("queued_when")),
            "start": epoch(ti.get("start_date")), "end": epoch(ti.get("end_date")),
            "try_number": ti.get("try_number")}


def stack_cpu_seconds(s: Settings) -> float:
    """CPU time (user + system) the Airflow stack has used so far, its finished task runners included.

    Each live process's own time plus what it collected from the children it reaped (cutime, cstime): every
    task runner is reaped by a stack process, so each process is counted once.
    """
    from rpmctl.services.airflow_stack import processes

    ticks = 0
    for pid in processes(s):
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        ticks += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime (stat fields 14-17)
    return ticks / os.sysconf("SC_CLK_TCK")


# --- probes and the clinician's view -------------------------------------------------------------------

def payload(metric: str, measured_at: str, seq: int) -> bytes:
    """A contract-v1 reading in the normal range (no alert noise), identified by msg_id and measured_at."""
    values: dict[str, Any] = {
        "blood_pressure": {"unit": "mm[Hg]", "values": {"systolic": 118 + seq % 7, "diastolic": 76}},
        "spo2": {"unit": "%", "value": 96 + seq % 3},
        "body_temperature": {"unit": "Cel", "value": 36.6 + (seq % 3) / 10},
    }[metric]
    return json.dumps({"msg_id": f"fresh-{seq}", "metric": metric, "measured_at": measured_at,
                       **values}).encode()


class Devices:
    """The probe devices' MQTT sessions; publishes one probe at a time and waits for the broker's PUBACK."""

    def __init__(self, s: Settings, passwords: dict[str, str]):
        from rpmctl.tools.publish import DevicePublisher

        self.publishers = {d: DevicePublisher(s, d, pw) for d, pw in passwords.items()}

    def publish(self, seq: int) -> Probe:
        device_id = list(self.publishers)[seq % len(self.publishers)]
        metric = DEVICES[device_id][1]
        now = datetime.now(UTC)
        probe = Probe(seq, device_id, metric, now.isoformat(timespec="milliseconds"), now.timestamp())
        pub = self.publishers[device_id]
        pub.publish(payload(metric, probe.measured_at, seq))
        pub.wait_all()
        probe.acked_at = time.time()
        return probe

    def close(self) -> None:
        for pub in self.publishers.values():
            pub.close()


class ClinicianView:
    """The clinician's patient page; says which probes it shows.

    A probe is visible when its metric's latest reading is at least as recent as the probe and the day counts
    include it: only probes produce readings for this patient, so both together identify the probe exactly.
    """

    def __init__(self, s: Settings):
        from warehouse.access import ClinicianSession

        self.session = ClinicianSession(s, CLINICIAN)

    def seen(self) -> dict[str, tuple[datetime | None, int]]:
        """metric -> (latest measured_at, readings in the last two days) as the clinician sees them."""
        page = self.session.patient(PATIENT, days=2)
        latest = {r["metric"]: r["measured_at"] for r in page["latest"]}
        counts: dict[str, int] = {}
        for row in page["daily"]:
            counts[row["metric"]] = counts.get(row["metric"], 0) + int(row["readings"])
        return {m: (latest.get(m), counts.get(m, 0)) for m in {*latest, *counts}}


def mark_visible(probes: list[Probe], seen: dict[str, tuple[datetime | None, int]], at: float) -> None:
    """Stamp ``at`` (when the poll opened the snapshot) on every probe this poll shows for the first time."""
    nth: dict[str, int] = {}
    for p in probes:
        nth[p.metric] = nth.get(p.metric, 0) + 1
        if p.visible_at is not None:
            continue
        latest, count = seen.get(p.metric, (None, 0))
        if latest is not None and latest >= datetime.fromisoformat(p.measured_at) and count >= nth[p.metric]:
            p.visible_at = at


def probe_loop(devices: Devices, view: ClinicianView, args: argparse.Namespace, out: Outcome,
               drain_s: float) -> None:
    """Publish a probe every ~interval s (jittered, so arrivals fall at every phase of the schedule) for
    ``minutes``, polling the clinician's view every ``poll`` s until every probe is seen or ``drain_s``
    passes."""
    rng = random.Random(args.seed)
    start = time.time()
    stop_publishing = start + args.minutes * 60
    next_pub, next_poll = start, start
    while True:
        now = time.time()
        if now >= next_pub and now < stop_publishing:
            out.probes.append(devices.publish(len(out.probes)))
            next_pub = now + args.interval * rng.uniform(0.75, 1.25)
        if now >= next_poll:
            out.poll_seconds.append(_poll(view, out.probes))
            next_poll = now + args.poll
            _progress(out, start)
        pending = [p for p in out.probes if p.visible_at is None]
        if now >= stop_publishing and (not pending or now > stop_publishing + drain_s):
            break
        wake = min(next_poll, next_pub if now < stop_publishing else next_poll)
        time.sleep(max(0.0, wake - time.time()))
    out.window = (start, time.time())


def _poll(view: ClinicianView, probes: list[Probe]) -> float:
    at = time.time()
    mark_visible(probes, view.seen(), at)
    return time.time() - at


def _progress(out: Outcome, start: float) -> None:
    """One line a minute, so a long run shows it is alive."""
    now = time.time()
    if now - out.last_progress >= 60:
        out.last_progress = now
        seen = sum(p.visible_at is not None for p in out.probes)
        print(f"  {(now - start) / 60:4.1f} min: {len(out.probes)} probes published, {seen} visible",
              flush=True)


# --- after the stack stopped: where each probe's time went ---------------------------------------------

def attach_warehouse(s: Settings, out: Outcome) -> None:
    """received_at, loaded_at, run and segment of every probe, the run records and any quarantined probe."""
    from warehouse.db import open_clinical, rows

    con = open_clinical(s, read_only=True)
    try:
        found = rows(con.execute("""SELECT device_id, measured_at, received_at, loaded_at, run_id, segment
                                    FROM readings WHERE list_contains(?, device_id)""", [list(DEVICES)]))
        out.run_records = rows(con.execute("SELECT run_id, state, task_seconds, loaded FROM pipeline_runs"))
        out.quarantined = con.execute("SELECT count(*) FROM quarantine WHERE list_contains(?, device_id)",
                                      [list(DEVICES)]).fetchone()[0]  # type: ignore[index]
    finally:
        con.close()
    by_key = {(r["device_id"], round(epoch(r["measured_at"]) or 0, 3)): r for r in found}
    sealed = Path(s.landing_dir) / "sealed"  # type: ignore[arg-type]
    for p in out.probes:
        r = by_key.get((p.device_id, round(datetime.fromisoformat(p.measured_at).timestamp(), 3)))
        if r is None:
            continue
        p.received_at, p.loaded_at, p.run_id = epoch(r["received_at"]), epoch(r["loaded_at"]), r["run_id"]
        p.sealed_at = _sealed_at(sealed / r["segment"])


def _sealed_at(path: Path) -> float | None:
    """When ingest sealed the segment: its rename into sealed/ is the file's last inode change (ctime)."""
    for candidate in (path, path.with_name(path.name + ".seg")):
        try:
            return candidate.stat().st_ctime
        except FileNotFoundError:
            continue
    return None


def attach_runs(out: Outcome) -> None:
    """Each probe's run: when its claim task started and when its snapshot was published."""
    by_id = {r["run_id"]: r for r in out.dag_runs if r["dag_id"] == DAG}
    for p in out.probes:
        run = by_id.get(p.run_id or "", {})
        tasks = run.get("tasks", {})
        p.run_due_at = run.get("run_after")
        p.claim_started_at = tasks.get("claim", {}).get("start")
        p.snapshot_at = tasks.get("publish_snapshot", {}).get("end")


# --- report --------------------------------------------------------------------------------------------

def seconds_row(label: str, samples: Sequence[float | None]) -> list[Any]:
    """label, count, p50, p95, max, mean in seconds (summary_ms does the statistics)."""
    xs = [x for x in samples if x is not None]
    if not xs:
        return [label, 0, float("nan"), float("nan"), float("nan"), float("nan")]
    m = summary_ms(xs)
    return [label, m["runs"], m["p50_ms"] / 1000, m["p95_ms"] / 1000, m["max_ms"] / 1000, m["mean_ms"] / 1000]


def freshness_table(out: Outcome, s: Settings, poll_s: float) -> dict[str, Any]:
    probes = out.probes
    rows = [seconds_row(label, [p.span("published_at", end) for p in probes]) for label, end in (
        ("publish -> PUBACK from broker", "acked_at"),
        # received_at: ingest's receipt; its fsync and ack follow within ingest_flush_interval_ms (25 ms)
        ("publish -> landed (ingest received_at)", "received_at"),
        ("publish -> visible to clinician", "visible_at"))]
    print_table(f"Freshness, device publish -> clinician query (schedule {s.pipeline_schedule_minutes} min, "
                f"seal age {s.segment_max_age_s:g} s, {len(probes)} probes, seconds)",
                ["stage", "count", "p50", "p95", "max", "mean"], rows)
    visible = [p.span("published_at", "visible_at") for p in probes]
    p95 = percentile([v for v in visible if v is not None], 95)
    unseen = sum(v is None for v in visible)
    verdict = "met" if unseen == 0 and p95 <= TARGET_P95_S else "NOT met"
    print(f"target p95 <= {TARGET_P95_S:g} s: {verdict} (p95 {p95:.1f} s; {unseen} probe(s) never seen; "
          f"{out.quarantined} quarantined; poll p50 {percentile(out.poll_seconds, 50):.2f} s "
          f"every ~{poll_s:g} s)")
    return {"rows": rows, "p95_s": p95, "unseen": unseen, "target_met": verdict == "met"}


def budget_table(out: Outcome) -> list[list[Any]]:
    rows = [seconds_row(label, [p.span(a, b) for p in out.probes]) for label, a, b in BUDGET]
    rows.append(seconds_row("total publish -> visible", [p.span("published_at", "visible_at")
                                                         for p in out.probes]))
    print_table("Where each probe's time went (seconds; parts add up to the total)",
                ["part", "count", "p50", "p95", "max", "mean"], rows)
    return rows


def runs_table(out: Outcome) -> list[list[Any]]:
    """Each DAG run overlapping the window: how late its first task began, its duration and its loads."""
    loaded = {r["run_id"]: r.get("loaded") for r in out.run_records}
    probes: dict[str, int] = {}
    for p in out.probes:
        probes[p.run_id or "-"] = probes.get(p.run_id or "-", 0) + 1
    rows = []
    for r in out.dag_runs:
        first = min((t["start"] for t in r["tasks"].values() if t["start"]), default=None)
        retries = sum(max(0, (t["try_number"] or 1) - 1) for t in r["tasks"].values())
        rows.append([r["dag_id"], _clock(r["run_after"]), r["run_type"], r["state"],
                     _gap(r["run_after"], first), _gap(r["start"], r["end"]), retries,
                     probes.get(r["run_id"], 0), loaded.get(r["run_id"], "-")])
    print_table(f"DAG runs during the probe window ({sum(r['dag_id'] == DAG for r in out.dag_runs)} {DAG})",
                ["dag", "due (UTC)", "type", "state", "due -> 1st task (s)", "duration (s)", "retries",
                 "probes", "readings loaded"], rows)
    wall = out.window[1] - out.window[0]
    print(f"Airflow stack CPU over the {wall:.0f} s window: {out.stack_cpu_s:.0f} s "
          f"({100 * out.stack_cpu_s / wall:.0f} % of one core); 1-min load average {out.load_avg[0]:.1f} at "
          f"the start, {out.load_avg[1]:.1f} at the end (machine shared with other jobs)")
    return rows


def _clock(t: float | None) -> str:
    return "-" if t is None else datetime.fromtimestamp(t, UTC).strftime("%H:%M:%S")


def tasks_table(out: Outcome) -> list[list[Any]]:
    """Per task over the window's runs: Airflow's wall time vs the library call's own time (task_seconds)."""
    done = [r for r in out.dag_runs if r["dag_id"] == DAG and r["state"] == "success"]
    fn_seconds: dict[str, list[float]] = {}
    for rec in out.run_records:
        for task, sec in json.loads(rec.get("task_seconds") or "{}").items():
            if sec is not None and rec["run_id"] in {r["run_id"] for r in done}:
                fn_seconds.setdefault(task, []).append(sec)
    rows = []
    for task in TASKS:
        spans, waits = [], []
        for r in done:
            ti = r["tasks"].get(task, {})
            spans.append(_gap(ti.get("start"), ti.get("end")))
            waits.append(_gap(_previous_end(r, task), ti.get("start")))
        fn = fn_seconds.get(task, [])
        rows.append([task, len([x for x in spans if x is not None]), _p(waits, 50), _p(spans, 50),
                     _p(spans, 95), _p(fn, 50) if fn else "-"])
    print_table("Per task over the successful runs (seconds): scheduling gap, Airflow wall time, "
                "library call", ["task", "runs", "gap before start p50", "task wall p50", "task wall p95",
                                 "library call p50"], rows)
    return rows


def _previous_end(run: dict, task: str) -> float | None:
    i = TASKS.index(task)
    return run["start"] if i == 0 else run["tasks"].get(TASKS[i - 1], {}).get("end")


def _gap(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else b - a


def _p(xs: Sequence[float | None], q: float) -> float:
    return percentile([x for x in xs if x is not None], q)


# --- main ----------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = parser("Publish -> clinician-visible freshness of the long-lived stack (scheduled rpm_pipeline). "
               f"--size: probe devices, 1..{len(DEVICES)}.", default_size=len(DEVICES))
    p.add_argument("--minutes", type=float, default=5.0, help="how long to publish probes (default 5)")
    p.add_argument("--interval", type=float, default=12.0, help="mean seconds between probes (default 12)")
    p.add_argument("--schedule-minutes", type=int, default=Settings().pipeline_schedule_minutes,
                   help="RPM_PIPELINE_SCHEDULE_MINUTES of the stack (default: the project's, "
                        f"{Settings().pipeline_schedule_minutes})")
    p.add_argument("--seal-age", type=float, default=Settings().segment_max_age_s,
                   help="RPM_SEGMENT_MAX_AGE_S of ingest (default: the project's)")
    p.add_argument("--poll", type=float, default=1.0, help="seconds between clinician queries (default 1)")
    p.add_argument("--seed", type=int, default=6, help="seed of the probe interval jitter")
    p.add_argument("--keep", action="store_true", help="keep the RPM_HOME folder afterwards (its logs)")
    return p


def measure(s: Settings, args: argparse.Namespace, out: Outcome) -> None:
    """Everything that needs the stack up: provision, start, warm up, probe, and read Airflow's runs."""
    passwords = provision(s, args.size)
    print(f"starting the stack in {s.home} (`rpm up --airflow`, {DAG} every "
          f"{s.pipeline_schedule_minutes} min)", flush=True)
    out.stack_up_s = start_stack(s)
    out.warmup_s = wait_first_run(s, timeout=s.pipeline_schedule_minutes * 60 + 300)
    print(f"stack healthy after {out.stack_up_s:.0f} s, first run ended {out.warmup_s:.0f} s later; probing "
          f"for {args.minutes:g} min, one probe every ~{args.interval:g} s", flush=True)
    devices = Devices(s, passwords)
    cpu0, load0 = stack_cpu_seconds(s), os.getloadavg()[0]
    try:
        drain_s = max(300.0, 3 * s.pipeline_schedule_minutes * 60)
        probe_loop(devices, ClinicianView(s), args, out, drain_s=drain_s)
    finally:
        devices.close()
    out.stack_cpu_s, out.load_avg = stack_cpu_seconds(s) - cpu0, (load0, os.getloadavg()[0])
    wait_runs_idle(s, timeout=180.0)
    out.dag_runs = collect_runs(s, *out.window)


def source_tree() -> dict[str, Any]:
    """The commit measured and the files modified on top of it: the figures belong to that tree."""
    def git(*argv: str) -> str:
        proc = subprocess.run(["git", *argv], cwd=Path(__file__).resolve().parent.parent, capture_output=True,
                              text=True)
        return proc.stdout if proc.returncode == 0 else ""

    modified = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines()]
    return {"commit": git("rev-parse", "--short", "HEAD").strip(), "modified": modified}


def report(out: Outcome, s: Settings, args: argparse.Namespace) -> dict[str, Any]:
    attach_runs(out)
    fresh = freshness_table(out, s, args.poll)
    budget = budget_table(out)
    runs = runs_table(out)
    tasks = tasks_table(out)
    tree = source_tree()
    print(f"measured on commit {tree['commit']} with {len(tree['modified'])} locally modified file(s)")
    return {"settings": {"pipeline_schedule_minutes": s.pipeline_schedule_minutes,
                         "segment_max_age_s": s.segment_max_age_s, "minutes": args.minutes,
                         "interval_s": args.interval, "poll_s": args.poll, "devices": args.size},
            "stack_up_s": out.stack_up_s, "warmup_s": out.warmup_s, "freshness": fresh, "budget": budget,
            "runs": runs, "tasks": tasks, "quarantined": out.quarantined, "stack_cpu_s": out.stack_cpu_s,
            "window_s": out.window[1] - out.window[0], "load_avg": out.load_avg,
            "poll": summary_ms(out.poll_seconds) if out.poll_seconds else {},
            "source": tree, "probes": [asdict(p) for p in out.probes], "dag_runs": out.dag_runs}


def run(args: argparse.Namespace, on_done: Callable[[dict[str, Any]], None]) -> None:
    out = Outcome()
    # Every listener on a free port: the clinician service and the metrics exporter too (a shared machine may
    # run another stack on the defaults).
    # Run by root, the stack stays root's: this process reads the state's keys too (probes, the clinician).
    run_as = {} if os.geteuid() else {"run_as": "root"}
    with bench_home("freshness", keep=args.keep, airflow_port=free_port(), service_port=free_port(), **run_as,
                    metrics_port=free_port(), metrics_statsd_port=free_port(), segment_max_age_s=args.seal_age,
                    pipeline_schedule_minutes=args.schedule_minutes) as s:
        try:
            measure(s, args, out)
        finally:
            stop_stack(s)
        attach_warehouse(s, out)
        on_done(report(out, s, args))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 1 <= args.size <= len(DEVICES):
        raise SystemExit(f"--size is the number of probe devices: 1..{len(DEVICES)}")
    if args.interval <= 0 or args.poll <= 0 or args.minutes <= 0:
        raise SystemExit("--minutes, --interval and --poll must be positive")
    signal.signal(signal.SIGTERM, _terminate)
    try:
        run(args, lambda results: write_json(args.json, "freshness", results))
    except KeyboardInterrupt:
        print("interrupted: the stack was stopped and its RPM_HOME removed", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
