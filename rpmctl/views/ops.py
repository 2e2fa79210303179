"""`rpm ops status`: is the pipeline healthy? Last runs, ingest state and backlog, with a verdict.

- failing: the last pipeline run failed, no run has succeeded while data waits, or the audit log does not
  verify (a record edited, removed or reordered anywhere, or the end not matching the authenticated head:
  every PHI read is refused until it is resolved);
- degraded: the broker or ingest service is down (devices' readings queue in the broker or on the device),
  ingest is not connected, the newest landed data waits longer than three schedule intervals, or the last
  successful run is older than that, or an unreadable landing segment waits in landing/rejected/ (its
  messages reach nobody until the cause is fixed and it is replayed: ``rpm landing replay``);
- quarantine: a run of the last hour (or the last run) whose share of quarantined items is above
  RPM_QUARANTINE_WARN is degraded, above RPM_QUARANTINE_FAIL failing (a device sending garbage, a broken app
  release, a wrong unit), named with its validation report;
- Airflow, once `rpm up --airflow` started it (until `rpm down`): a scheduler, DAG processor or triggerer
  without a recent heartbeat is degraded (no run is scheduled or parsed), naming which and since when;
  rpm_daily's last run failed: failing (housekeeping and the telehealth reports stopped);
- healthy otherwise.
"""

from __future__ import annotations

import json
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

from core.settings import Settings
from pipeline.validation_report import report_path
from rpmctl.errors import printable
from rpmctl.services import INGEST, airflow_stack, broker, ingest_status, procs
from rpmctl.services.restarts import restart_summary
from rpmctl.services.supervisor import supervision_problems
from rpmctl.views.table import table
from warehouse.accounting import accounting
from warehouse.audit import AuditLog
from warehouse.ops import Gate, quarantine_gate, runs_quarantine_since


def ops_status(s: Settings, now: datetime | None = None) -> dict:
    """The verdict and what it rests on; ``now``: the instant to judge ages at (default: the clock)."""
    from warehouse.ops import last_runs

    reasons: list[str] = []
    failing: list[str] = []
    broker_pid, ingest_pid = procs.read_pid(s, broker.NAME), procs.read_pid(s, INGEST)
    ingest = ingest_status(s) or {}
    if broker_pid is None:
        reasons.append("broker is not running: devices cannot deliver")
    if ingest_pid is None:
        reasons.append("ingest service is not running: readings queue in the broker, nothing lands")
    elif not ingest.get("connected"):
        reasons.append("ingest service is not connected to the broker")
    try:
        runs = last_runs(s, 5)
    except FileNotFoundError:
        runs = []
    acc = accounting(s) if s.clinical_db.exists() else None
    pending = (acc or {}).get("pending", {"sealed_messages": 0, "open_messages": 0})
    budget_s = 3 * s.pipeline_schedule_minutes * 60
    now = now or datetime.now(UTC)
    if runs and runs[0]["state"] == "failed" and runs[0]["failed_task"] != "quality_gate":
        failing.append(f"last run {runs[0]['run_id']} failed in {runs[0]['failed_task']}: {runs[0]['error']}")
    # Each run of the last hour (and the last run, however old) is judged again — the thresholds may have
    # changed since its gate ran: a red batch stays news for an hour, not until the next empty run.
    hour_ago = now - QUARANTINE_WINDOW
    judged = {r["run_id"]: r for r in (runs_quarantine_since(s, hour_ago) if runs else [])}
    if runs:
        judged.setdefault(runs[0]["run_id"], runs[0])
    flagged = [(g, rid) for rid, r in judged.items()
               if (g := quarantine_gate(s, r["quarantined"], r["received"],
                                        f"run {rid} (finished {r['finished_at']:%Y-%m-%d %H:%M} UTC)")).level != "ok"]
    if flagged:
        worst, rid = max(flagged, key=lambda gr: (gr[0].level == "fail", gr[0].rate or 0))
        more = len(flagged) - 1
        _judge(worst, reasons, failing, report_path(s, rid),
               f" (and {more} more run(s) in the last hour above RPM_QUARANTINE_WARN)" if more else "")
    daily = _last_daily(s)
    if daily and daily["state"] == "failed":
        failing.append(f"rpm_daily run {daily['run_id'].removeprefix('rpm_daily:')} failed in "
                       f"{daily['failed_task']}: {daily['error']} (landing purge, retention and telehealth "
                       "reports wait for the next successful run)")
    airflow = airflow_heartbeats(s, now)
    reasons.extend(airflow["problems"])
    reasons.extend(supervision_problems(s))  # a dead watchdog or Airflow supervisor: nothing restarts anything
    restarted = restart_summary(s, now)
    for component, r in sorted(restarted.items()):
        last = datetime.fromisoformat(r["last_restart"])
        if now - last <= RESTART_RECENT or r["restarts_24h"] >= RESTART_LOOP:
            reasons.append(f"{component} restarted by its supervisor at {last:%Y-%m-%d %H:%M:%S} UTC "
                           f"({r['last_reason']}{'; restart failed: ' + r['last_error'] if r.get('last_error') else ''}"
                           f"); {r['restarts_24h']} restart(s) in 24 h — see its log in {s.run_dir}")
    last_ok = next((r for r in runs if r["state"] == "success"), None)
    if pending["sealed_messages"] and last_ok is None:
        failing.append(f"{pending['sealed_messages']} landed message(s) waiting and no successful run yet")
    elif last_ok and pending["sealed_messages"] and (now - last_ok["finished_at"]).total_seconds() > budget_s:
        reasons.append(f"last successful run {(now - last_ok['finished_at']).total_seconds() / 60:.0f} min ago "
                       f"with {pending['sealed_messages']} message(s) waiting")
    rejected = (acc or {}).get("rejected") or {"segments": 0, "messages": 0, "by_reason": {}, "waiting": []}
    for w in rejected["waiting"]:
        where = "in landing/rejected/" if w["in_rejected_dir"] else "MISSING from landing/rejected/"
        reasons.append(f"unreadable landing segment {w['segment']} ({w['records']} message(s)) waits {where}: "
                       f"{w['reason']}: {w['detail']} — fix the cause, then `rpm landing replay {w['segment']}`")
    if ingest.get("updated") and ingest_pid and time.time() - ingest["updated"] > 30:
        reasons.append("ingest status has not been updated for 30 s (stuck?)")
    # The whole chain, not only its tail: a record removed from the middle is as much a failure as a
    # truncated end (every process that finds it refuses PHI reads).
    audit = AuditLog(s).verify()
    if not audit["ok"]:
        failing.append(f"audit log: {audit['problem']} (PHI reads are refused until it is resolved; "
                       "rpm audit verify)")
    verdict = "failing" if failing else "degraded" if reasons else "healthy"
    ingest_running = ingest_pid is not None
    return {"verdict": verdict, "reasons": failing + reasons,
            "broker": {"running": broker_pid is not None, "pid": broker_pid},
            # A dead service's last status file still says what it last saw: connected only while it runs.
            "ingest": {"running": ingest_running, "pid": ingest_pid,
                       **{k: ingest.get(k) for k in ("received", "landed", "acked", "marked", "write_errors",
                                                     "segments_sealed")},
                       "connected": bool(ingest_running and ingest.get("connected"))},
            "airflow": {k: v for k, v in airflow.items() if k != "problems"}, "restarts": restarted,
            "validation_report": str(report_path(s, runs[0]["run_id"])) if runs else None,
            "backlog": pending, "accounting_balanced": (acc or {}).get("balanced"), "rejected": rejected,
            "runs": [{k: r[k] for k in ("run_id", "state", "finished_at", "segments", "received", "loaded",
                                        "quarantined", "duplicates", "received_to_loaded_p95_s",
                                        "measured_to_loaded_p95_s", "failed_task")}
                     | {"rejected_segments": r.get("rejected_segments"), "task_seconds": _object(r["task_seconds"]),
                        "finished_at": r["finished_at"].isoformat() if r["finished_at"] else None}
                     for r in runs]}


def _object(value: object) -> object:
    """A JSON column (stored as text) as the object it holds, for --json."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return None
    return value


def _judge(gate: Gate, reasons: list[str], failing: list[str], report: Path | None, more: str = "") -> None:
    if gate.level == "ok":
        return
    where = f" — validation report {report}" if report is not None and report.exists() else ""
    (failing if gate.level == "fail" else reasons).append(gate.message + more + where)


def _last_daily(s: Settings) -> dict | None:
    from warehouse.ops import DAILY_DAG, last_runs

    try:
        daily = last_runs(s, 1, dag_id=DAILY_DAG)
    except FileNotFoundError:
        return None
    return daily[0] if daily else None


QUARANTINE_WINDOW = timedelta(hours=1)  # how long a batch above the thresholds keeps the verdict down
# A supervisor's restart is news for this long; more restarts than RESTART_LOOP in 24 h is a crash loop.
RESTART_RECENT = timedelta(minutes=15)
RESTART_LOOP = 5

# Airflow's own liveness rule (scheduler_health_check_threshold is 30 s): a component whose heartbeat is older
# than this is not scheduling, parsing or triggering anything.
HEARTBEAT_STALE_S = 60.0
_COMPONENTS = (("scheduler", "SchedulerJob", "latest_scheduler_heartbeat"),
               ("dag_processor", "DagProcessorJob", "latest_dag_processor_heartbeat"),
               ("triggerer", "TriggererJob", "latest_triggerer_heartbeat"))


def airflow_heartbeats(s: Settings, now: datetime) -> dict:
    """Each Airflow component's last heartbeat, when this state folder's Airflow is meant to run (`rpm up
    --airflow` until `rpm down`): from the API server's health endpoint, or — the API server down too —
    straight from the metadata database's job table. ``problems`` names every component not alive."""
    expected = bool(s.airflow_url) or airflow_stack.wanted(s)
    out: dict = {"expected": expected, "running": procs.read_pid(s, airflow_stack.NAME) is not None,
                 "heartbeats": {}, "source": None, "problems": []}
    if not expected:
        return out
    health = _remote_health(s.airflow_url) if s.airflow_url else airflow_stack.health(s)
    if s.airflow_url:
        out["running"] = health is not None  # another host's Airflow: up when its API server answers
    if health:
        out["source"] = "api"
        beats = {name: (part.get(key) if isinstance(part := health.get(name), dict) else None)
                 for name, _, key in _COMPONENTS}
    else:
        out["source"] = "metadata"
        beats = _job_heartbeats(s)
        out["problems"].append("Airflow API server is not answering (UI and `rpm airflow` are down)")
    for name, _, _ in _COMPONENTS:
        when = _instant(beats.get(name))
        out["heartbeats"][name] = when.isoformat() if when else None
        label = name.replace("_", " ")
        if when is None:
            out["problems"].append(f"Airflow {label} is not alive: no heartbeat recorded")
        elif when - now > timedelta(minutes=5):
            out["problems"].append(f"Airflow {label}'s last heartbeat is in the future ({when:%Y-%m-%d %H:%M:%S} "
                                   "UTC): a clock is wrong, its liveness cannot be judged")
        elif (age := (now - when).total_seconds()) > HEARTBEAT_STALE_S:
            out["problems"].append(f"Airflow {label} is not alive: last heartbeat {when:%Y-%m-%d %H:%M:%S} UTC "
                                   f"({age / 60:.0f} min ago)")
    return out


def _instant(value: object) -> datetime | None:
    """A heartbeat as an aware instant; anything else (a number, "yesterday", garbage) is no heartbeat."""
    if not isinstance(value, str):
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        return None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when  # the metadata database stores UTC


HEALTH_TIMEOUT_S = 3.0
HEALTH_MAX_BYTES = 64 * 1024


def _remote_health(base: str) -> dict | None:
    """Airflow's health endpoint (public, no login) at ``base`` — compose's API server, for instance. Bounded in
    time as a whole (a server trickling bytes cannot hold the verdict) and in size."""
    deadline = time.monotonic() + HEALTH_TIMEOUT_S
    body = b""
    try:
        with urllib.request.urlopen(f"{base.rstrip('/')}{airflow_stack.HEALTH}", timeout=HEALTH_TIMEOUT_S) as r:
            while chunk := r.read1(4096):
                body += chunk
                if time.monotonic() > deadline or len(body) > HEALTH_MAX_BYTES:
                    return None
        parsed = json.loads(body)
    except (OSError, ValueError):
        return None
    return parsed if isinstance(parsed, dict) else None


def _job_heartbeats(s: Settings) -> dict[str, str | None]:
    """Latest heartbeat per component from the local SQLite metadata database (read-only), if there is one."""
    import sqlite3

    db = Path(s.airflow_home) / "airflow.db"
    if not db.exists():
        return {}
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=2) as con:
            found = dict(con.execute("SELECT job_type, max(latest_heartbeat) FROM job GROUP BY job_type").fetchall())
    except sqlite3.Error:
        return {}
    return {name: found.get(job) for name, job, _ in _COMPONENTS}


def render_ops(st: dict) -> str:
    mark = {"healthy": "HEALTHY", "degraded": "DEGRADED", "failing": "FAILING"}[st["verdict"]]
    # Reasons quote stored text (run ids, restart reasons, errors): escaped, so none can forge a line.
    lines = [f"pipeline: {mark}", *(f"  - {printable(r)}" for r in st["reasons"])]
    i = st["ingest"]
    up_broker = f"up (pid {st['broker']['pid']})" if st["broker"]["running"] else "DOWN"
    up_ingest = f"up (pid {i['pid']})" if i["running"] else "DOWN"
    lines.append(f"broker: {up_broker}; ingest: {up_ingest}"
                 f"{', connected' if i.get('connected') else ''}; landed {i.get('landed')}, acked {i.get('acked')}")
    b = st["backlog"]
    lines.append(f"backlog: {b['sealed_messages']} message(s) in {b.get('sealed_segments', 0)} sealed segment(s), "
                 f"{b['open_messages']} in open segment(s); accounting balanced: {st['accounting_balanced']}")
    if st["rejected"]["segments"]:
        lines.append(f"rejected: {st['rejected']['messages']} message(s) in {st['rejected']['segments']} unreadable "
                     "segment(s) in landing/rejected/ (`rpm landing rejected`)")
    a = st["airflow"]
    if a["expected"]:
        beats = ", ".join(f"{name.replace('_', ' ')} {f'heartbeat {hb[:19]}' if hb else 'no heartbeat'}"
                          for name, hb in a["heartbeats"].items())
        lines.append(f"airflow: {'up' if a['running'] else 'DOWN'}; {beats}")
    if st["restarts"]:
        lines.append(printable("restarts (24 h): " + ", ".join(f"{c} {r['restarts_24h']}"
                                                              for c, r in sorted(st["restarts"].items()))))
    if st.get("validation_report"):
        lines.append(f"last run's validation report: {st['validation_report']}")
    lines.append("last runs:")
    lines.append(table(["finished (UTC)", "state", "run", "loaded", "quarantined", "dup", "rejected",
                        "p95 received->loaded s", "failed task"],
                       ([r["finished_at"][:19].replace("T", " ") if r["finished_at"] else None, r["state"],
                         r["run_id"], r["loaded"],
                         r["quarantined"], r["duplicates"], r.get("rejected_segments"),
                         None if r["received_to_loaded_p95_s"] is None else round(r["received_to_loaded_p95_s"]),
                         r["failed_task"]] for r in st["runs"]), empty="  (none yet)"))
    return "\n".join(lines)
