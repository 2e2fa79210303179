"""Device provisioning: enrol a device to a patient and give it a broker login limited to its own topics."""

from __future__ import annotations

import time
from datetime import datetime

from core import keys
from core.ids import InvalidId, check_id
from core.settings import INGEST_CLIENT_PREFIX, Settings
from core.topics import events_topic, status_topic, vitals_topic
from rpmctl.services import broker, procs
from transforms.vocab import SOURCE_KINDS
from warehouse.admin import enroll_device, operator
from warehouse.db import clinical

KIND_HELP = ", ".join(f"{k.name} ({k.description})" for k in SOURCE_KINDS.values())


class ProvisioningError(ValueError):
    pass


def provision(s: Settings, device_id: str, patient_id: str, *, kind: str | None = None,
              since: datetime | None = None, new_password: bool = False, actor: str | None = None) -> dict:
    """Enrol ``device_id`` to ``patient_id`` and give it a broker login.

    The patient must be in the registry. ``kind`` (SOURCE_KINDS) is required for a new device and decides
    what it may publish: a device's vitals and status topics, or an app's events topic. A new device gets a
    password, shown once (only its hash is stored); an existing device keeps its login — a connected device
    is not cut off by an enrollment change — unless ``new_password`` asks for a new one (then "password" is
    the new one; otherwise it is null). The enrollment is audited under ``actor`` (default: the local
    operator, named by the kernel).
    """
    try:
        check_id("device", device_id)
        check_id("patient", patient_id)
    except InvalidId as exc:
        raise ProvisioningError(str(exc)) from exc
    if device_id == s.ingest_username or device_id.startswith(INGEST_CLIENT_PREFIX):
        raise ProvisioningError(f"{device_id!r} is reserved for the ingest service")
    if kind is not None and kind not in SOURCE_KINDS:
        raise ProvisioningError(f"unknown device kind {kind!r}: one of {KIND_HELP}")
    if since is not None and since.tzinfo is None:
        raise ProvisioningError("the enrollment start needs a UTC offset, e.g. 2026-11-01T00:00:00+00:00")
    with clinical(s) as con:
        if con.execute("SELECT 1 FROM patients WHERE patient_id = ?", [patient_id]).fetchone() is None:
            raise ProvisioningError(f"unknown patient {patient_id!r}: add it first (rpm patients add "
                                    f"{patient_id}, or rpm patients import)")
        known = con.execute("SELECT kind FROM devices WHERE device_id = ?", [device_id]).fetchone()
        kind = kind or (known[0] if known else None)
        if kind not in SOURCE_KINDS:
            raise ProvisioningError(f"device {device_id} needs a kind (--kind): one of {KIND_HELP}")
        if known and known[0] in SOURCE_KINDS and known[0] != kind:
            raise ProvisioningError(f"device {device_id} is registered as {known[0]!r}, not {kind!r}: "
                                    "a device's kind does not change (register the new hardware under a new id)")
    try:
        enrollment = enroll_device(s, actor or operator(), device_id, patient_id, kind=kind,
                                   since=since, publish=False)["enrollment"]
    except ValueError as exc:
        raise ProvisioningError(str(exc)) from exc
    app = SOURCE_KINDS[kind].app
    if not broker.passwd_path(s).exists():
        broker.prepare(s)
    password: str | None = None
    if new_password or device_id not in broker.logins(s):
        password = keys.new_password()
        broker.set_login(s, device_id, password, role="app" if app else "device")
        if procs.read_pid(s, broker.NAME):
            wait_for_login(s, device_id, password)  # connects as the device: only with the new password
    return {
        "device_id": device_id,
        "patient_id": patient_id,
        "kind": kind,
        "enrolled_since": enrollment.valid_from.isoformat(),
        "host": s.broker_host,
        "port": s.broker_tls_port,
        "tls": True,
        "ca_file": str(s.ca_cert),
        "ports": {"mqtts": s.broker_tls_port, "mqtt_loopback": s.broker_port},
        "username": device_id,
        "password": password,
        "client_id": device_id,  # the broker replaces any other client id with the login
        "topic": events_topic(device_id) if app else vitals_topic(device_id),
        "status_topic": None if app else status_topic(device_id),
        "qos": 1,
        "mqtt_version": "5",
    }


def wait_for_login(s: Settings, username: str, password: str, timeout: float = 30.0) -> None:
    """Block until the running broker accepts the new credentials (it reloads them on SIGHUP; on a loaded
    machine that has taken over 10 s, so the deadline is generous: a broker that never does is still an error)."""
    from ingest.service import make_client

    deadline = time.monotonic() + timeout
    while True:
        client = make_client(username, username, password)
        accepted: list[bool] = []
        client.on_connect = lambda c, u, f, rc, p, out=accepted: out.append(not rc.is_failure)
        try:
            client.connect(s.broker_host, s.broker_port, keepalive=5)
            while not accepted and time.monotonic() < deadline:
                client.loop(timeout=0.05)
        except OSError:
            pass
        finally:
            client.disconnect()
        if accepted and accepted[0]:
            return
        if time.monotonic() > deadline:
            raise ProvisioningError(f"broker did not accept the new login for {username} within {timeout}s")
        time.sleep(0.05)
