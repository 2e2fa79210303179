"""`rpm status`: is each component running, and how often has its supervisor had to bring it back?"""

from __future__ import annotations

from rpmctl.errors import printable
from rpmctl.views.table import table


def render_status(st: dict) -> str:
    """``st``: what `rpm status --json` prints (services.status plus ``airflow``). Every stored string (restart
    reasons, ingest counters) is shown with control characters escaped: none can forge a line."""
    airflow = st["airflow"]
    components = {**st["components"], **airflow.get("components", {})}
    # Airflow's rows whenever the stack is wanted, running or not: a dead supervisor must not hide them.
    shown = airflow["running"] or airflow.get("wanted")
    rows = [[name, c["pid"], "up" if c["pid"] else "DOWN", c["restarts_24h"], (c["last_restart"] or "")[:19],
             c["last_error"] or c["last_reason"]]
            for name, c in components.items()
            if c["pid"] or c["restarts_24h"] or not name.startswith("airflow-") or shown]
    lines = [table(["component", "pid", "state", "restarts 24h", "last restart (UTC)", "why"], rows,
                   right=[False, True, False, True, False, False])]
    watchdog = st["watchdog_pid"]
    lines.append(f"watchdog: {f'up (pid {watchdog}), restarts what crashes' if watchdog else 'not running'}")
    lines += [f"PROBLEM: {printable(problem)}" for problem in st.get("supervision_problems", [])]
    ingest = st.get("ingest") or {}
    if ingest:
        counts = ", ".join(f"{k} {printable(ingest.get(k))}" for k in ("received", "landed", "acked"))
        lines.append(f"ingest: {'connected' if ingest.get('connected') and st['ingest_pid'] else 'not connected'}"
                     f"; {counts}")
    lines.append(f"clinician service: {printable(st['service_url'])}")
    if airflow["running"]:
        lines.append(f"airflow: {printable(airflow['url'])}")
    return "\n".join(lines)
