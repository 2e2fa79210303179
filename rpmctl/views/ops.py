"""`rpm ops status`: is the pipeline healthy? Last runs, ingest state and backlog, with a verdict.

- failing: the last pipeline run failed, no run has succeeded while data waits, or the audit log does not
  verify (a record edited, removed or reordered anywhere, or the end not matching the authenticated head:
  every PHI read is refused until it is resolved);
- degraded: the broker or ingest service is down (devices' readings queue in the broker or on the device),
  ingest is not connected, the newest landed data waits longer than three schedule intervals, or the last
  successful run is older than that, or an unreadable landing segment waits in landing/rejected/ (its
  messages reach nobody until the cause is fixed and it is replayed: ``rpm landing replay``);
- healthy otherwise.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

from core.settings import Settings
from rpmctl.services import INGEST, broker, ingest_status, procs
from rpmctl.views.table import table
from warehouse.accounting import accounting
from warehouse.audit import AuditLog


def ops_status(s: Settings) -> dict:
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
    now = datetime.now(UTC)
    if runs and runs[0]["state"] == "failed":
        failing.append(f"last run {runs[0]['run_id']} failed in {runs[0]['failed_task']}: {runs[0]['error']}")
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
    return {"verdict": verdict, "reasons": failing + reasons,
            "broker": {"running": broker_pid is not None, "pid": broker_pid},
            "ingest": {"running": ingest_pid is not None, "pid": ingest_pid,
                       **{k: ingest.get(k) for k in ("connected", "received", "landed", "acked", "marked",
                                                     "write_errors", "segments_sealed")}},
            "backlog": pending, "accounting_balanced": (acc or {}).get("balanced"), "rejected": rejected,
            "runs": [{k: r[k] for k in ("run_id", "state", "finished_at", "segments", "received", "loaded",
                                        "quarantined", "duplicates", "received_to_loaded_p95_s",
                                        "measured_to_loaded_p95_s", "task_seconds", "failed_task")}
                     | {"rejected_segments": r.get("rejected_segments")} for r in runs]}


def render_ops(st: dict) -> str:
    mark = {"healthy": "HEALTHY", "degraded": "DEGRADED", "failing": "FAILING"}[st["verdict"]]
    lines = [f"pipeline: {mark}", *(f"  - {r}" for r in st["reasons"])]
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
    lines.append("last runs:")
    lines.append(table(["finished (UTC)", "state", "run", "loaded", "quarantined", "dup", "rejected",
                        "p95 received->loaded s", "failed task"],
                       ([f"{r['finished_at']:%Y-%m-%d %H:%M:%S}", r["state"], r["run_id"], r["loaded"],
                         r["quarantined"], r["duplicates"], r.get("rejected_segments"),
                         None if r["received_to_loaded_p95_s"] is None else round(r["received_to_loaded_p95_s"]),
                         r["failed_task"]] for r in st["runs"]), empty="  (none yet)"))
    return "\n".join(lines)
