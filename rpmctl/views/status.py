"""`rpm status`: is each component running, and how often has its supervisor had to bring it back?"""

from __future__ import annotations

from rpmctl.views.table import table


def render_status(st: dict) -> str:
    """``st``: what `rpm status --json` prints (services.status plus ``airflow``)."""
    components = {**st["components"], **st["airflow"].get("components", {})}
    rows = [[name, c["pid"], "up" if c["pid"] else "DOWN", c["restarts_24h"], (c["last_restart"] or "")[:19],
             c["last_error"] or c["last_reason"]]
            for name, c in components.items()
            if c["pid"] or c["restarts_24h"] or not name.startswith("airflow-") or st["airflow"]["running"]]
    lines = [table(["component", "pid", "state", "restarts 24h", "last restart (UTC)", "why"], rows,
                   right=[False, True, False, True, False, False])]
    watchdog = st["watchdog_pid"]
    lines.append(f"watchdog: {f'up (pid {watchdog}), restarts what crashes' if watchdog else 'not running'}")
    ingest = st.get("ingest") or {}
    if ingest:
        lines.append(f"ingest: {'connected' if ingest.get('connected') and st['ingest_pid'] else 'not connected'}"
                     f"; received {ingest.get('received')}, landed {ingest.get('landed')}, acked {ingest.get('acked')}")
    lines.append(f"clinician service: {st['service_url']}")
    if st["airflow"]["running"]:
        lines.append(f"airflow: {st['airflow']['url']}")
    return "\n".join(lines)
