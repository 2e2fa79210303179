"""`rpm up` / `rpm down`: the broker, the ingest service and the clinician service as background processes,
and the watchdog that restarts them (rpmctl/services/supervisor.py)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from core import keys
from core.landing import open_dir, sealed_dir
from core.settings import Settings
from rpmctl.services import broker, procs

INGEST = "ingest"
SERVICE = "service"
METRICS = "metrics"


def init(s: Settings) -> None:
    """Create state folders and secrets (idempotent): warehouse key, service logins, local CA, broker files.

    Every folder that holds identifiers is private (0700): landing segment and status file names carry
    client ids, logs carry device ids and addresses."""
    Path(s.home).mkdir(parents=True, exist_ok=True)
    for d in (s.secrets_dir, s.landing_dir, open_dir(s.landing_dir), sealed_dir(s.landing_dir),
              s.warehouse_dir, s.run_dir, s.airflow_home):
        Path(d).mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(d, 0o700)
    keys.warehouse_key(s)
    broker.prepare(s)


def ingest_status(s: Settings, client_id: str | None = None) -> dict | None:
    """The status an ingest instance last wrote (this settings' instance by default)."""
    path = Path(s.run_dir) / f"ingest-{client_id or s.ingest_client_id}.json"
    try:
        st = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None
    return st if isinstance(st, dict) else None


def ingest_statuses(s: Settings) -> dict[str, dict]:
    """Every ingest instance that has written a status into this state folder, by client id — with or without
    a pid file (compose, systemd, a second instance started by hand)."""
    out = {}
    for path in sorted(Path(s.run_dir).glob("ingest-*.json")):
        try:
            st = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        out[st.get("client_id") or path.stem.removeprefix("ingest-")] = st
    return out


def _ingest_connected(s: Settings) -> bool:
    st = ingest_status(s)
    pid = procs.read_pid(s, INGEST)
    # Subscribed, not just connected: a message published before the SUBACK could find no subscriber.
    return bool(st and st.get("connected") and st.get("subscribed") and st.get("pid") == pid)


def up(s: Settings, watchdog: bool = False) -> dict:
    """Start what is not running. ``watchdog``: also the watchdog that restarts a crashed component (`rpm up`
    does; tests that kill and restart components themselves do not)."""
    init(s)
    broker.rotate_log(s)
    broker_pid = broker.start(s)
    ingest_pid = start_ingest(s)
    service_pid = start_service(s)
    metrics_pid = start_metrics(s)
    info = {"broker_pid": broker_pid, "ingest_pid": ingest_pid, "service_pid": service_pid,
            "metrics_pid": metrics_pid, "metrics_url": metrics_url(s) if metrics_pid else None,
            "mqtt_loopback": f"{s.broker_host}:{s.broker_port}", "mqtts": f"0.0.0.0:{s.broker_tls_port}",
            "service_url": service_url(s), "logs": str(s.run_dir)}
    if watchdog:
        from rpmctl.services import supervisor  # not at the top: `python -m` runs it after this package

        info["watchdog_pid"] = supervisor.start(s)  # last: everything it watches is up
    return info


def start_ingest(s: Settings) -> int:
    """The ingest service in the background, returning once it is subscribed: what `rpm ingest` runs."""
    return procs.start(s, INGEST, [sys.executable, "-m", "rpmctl.cli", "ingest"], env=s.as_env(),
                       ready=lambda: _ingest_connected(s))


def service_url(s: Settings) -> str:
    from service.server import url

    return url(s)


def _service_ready(s: Settings) -> bool:
    """The service answers /healthz over TLS with the certificate our CA signed."""
    import ssl
    import urllib.request

    try:
        context = ssl.create_default_context(cafile=str(s.ca_cert))
        host = "127.0.0.1" if s.service_bind in ("0.0.0.0", "::") else s.service_bind
        with urllib.request.urlopen(f"https://{'localhost' if host == '127.0.0.1' else host}:{s.service_port}"
                                    "/healthz", context=context, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def start_service(s: Settings) -> int:
    """The clinician service (dashboard + API) in the background: what `rpm serve` runs."""
    from core.keys import ensure_service_cert

    ensure_service_cert(s)  # before the child starts: it must not race another command creating it
    return procs.start(s, SERVICE, [sys.executable, "-m", "rpmctl.cli", "serve"], env=s.as_env(),
                       ready=lambda: _service_ready(s), timeout=30)


def _metrics_host(s: Settings) -> str:
    """Where a local client reaches the exporter: loopback when it listens on every address."""
    return "127.0.0.1" if s.metrics_bind in ("0.0.0.0", "::") else s.metrics_bind


def metrics_url(s: Settings) -> str:
    return f"http://{_metrics_host(s)}:{s.metrics_port}/metrics"


def start_metrics(s: Settings) -> int | None:
    """The metrics exporter (pipeline, audit log, Airflow's StatsD) in the background: what `rpm metrics`
    runs. None when RPM_METRICS_PORT=0 disables it."""
    if s.metrics_port <= 0:
        return None
    return procs.start(s, METRICS, [sys.executable, "-m", "rpmctl.cli", "metrics"], env=s.as_env(),
                       ready=lambda: procs.port_open(_metrics_host(s), s.metrics_port))


def down(s: Settings) -> dict:
    from rpmctl.services import supervisor

    # The watchdog first, so nothing stopped below is brought back; ingest before the broker: it flushes,
    # acks and seals before the broker goes away.
    return {"watchdog_stopped": supervisor.stop(s), "metrics_stopped": procs.stop(s, METRICS),
            "service_stopped": procs.stop(s, SERVICE),
            "ingest_stopped": procs.stop(s, INGEST), "broker_stopped": broker.stop(s)}


def status(s: Settings) -> dict:
    """Pids, the ingest service's counters, each component's restarts (``components``), and what no
    supervisor watches any more (``supervision_problems``: a dead watchdog or Airflow supervisor)."""
    from rpmctl.services import supervisor
    from rpmctl.services.restarts import restart_summary, restarts_of

    restarted = restart_summary(s)
    components = {c.name: {"pid": procs.read_pid(s, c.proc_name), **restarts_of(restarted, c.name)}
                  for c in supervisor.local_components()}
    return {"broker_pid": components["broker"]["pid"], "ingest_pid": components["ingest"]["pid"],
            "service_pid": components["service"]["pid"], "service_url": service_url(s),
            "metrics_pid": procs.read_pid(s, METRICS),
            "ingest": ingest_status(s), "watchdog_pid": procs.read_pid(s, supervisor.NAME),
            "components": components, "supervision_problems": supervisor.supervision_problems(s)}
