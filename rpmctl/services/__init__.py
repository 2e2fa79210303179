"""`rpm up` / `rpm down`: the broker and the ingest service as background processes."""

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
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


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


def up(s: Settings) -> dict:
    init(s)
    broker.rotate_log(s)
    broker_pid = broker.start(s)
    ingest_pid = procs.start(s, INGEST, [sys.executable, "-m", "rpmctl.cli", "ingest"], env=s.as_env(),
                             ready=lambda: _ingest_connected(s))
    service_pid = start_service(s)
    return {"broker_pid": broker_pid, "ingest_pid": ingest_pid, "service_pid": service_pid,
            "mqtt_loopback": f"{s.broker_host}:{s.broker_port}", "mqtts": f"0.0.0.0:{s.broker_tls_port}",
            "service_url": service_url(s), "logs": str(s.run_dir)}


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


def down(s: Settings) -> dict:
    # Ingest first: it flushes, acks and seals before the broker goes away.
    return {"service_stopped": procs.stop(s, SERVICE), "ingest_stopped": procs.stop(s, INGEST),
            "broker_stopped": broker.stop(s)}


def status(s: Settings) -> dict:
    return {"broker_pid": procs.read_pid(s, broker.NAME), "ingest_pid": procs.read_pid(s, INGEST),
            "service_pid": procs.read_pid(s, SERVICE), "service_url": service_url(s),
            "ingest": ingest_status(s)}
