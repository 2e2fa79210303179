"""Device provisioning: enrol a device to a patient and give it a broker login limited to its own topics."""

from __future__ import annotations

import time
from datetime import datetime

from rpmctl import broker, keys, procs
from rpmctl.settings import Settings
from transforms.topics import events_topic, status_topic, valid_device_id, vitals_topic
from warehouse.db import clinical
from warehouse.registry import PATIENT_ID_RE, enroll


class ProvisioningError(ValueError):
    pass


def provision(s: Settings, device_id: str, patient_id: str, *, kind: str | None = None,
              since: datetime | None = None) -> dict:
    """Enrol ``device_id`` to ``patient_id`` and (re)issue its broker password.

    Returns what the device needs to publish. The password is shown once: only its hash is stored.
    """
    if not valid_device_id(device_id):
        raise ProvisioningError(f"invalid device id {device_id!r}: use 1-64 of A-Z a-z 0-9 . _ - "
                                "(it becomes the device's broker login and topic segment)")
    if device_id == s.ingest_username:
        raise ProvisioningError(f"{device_id!r} is reserved for the ingest service")
    if not PATIENT_ID_RE.fullmatch(patient_id):
        raise ProvisioningError(f"invalid patient id {patient_id!r}: use 1-64 of A-Z a-z 0-9 . _ -")
    with clinical(s) as con:
        try:
            enrollment = enroll(con, device_id, patient_id, kind=kind, valid_from=since)
        except ValueError as exc:
            raise ProvisioningError(str(exc)) from exc
    password = keys.new_password()
    if not broker.passwd_path(s).exists():
        broker.prepare(s)
    broker.set_login(s, device_id, password)
    if procs.read_pid(s, broker.NAME):
        wait_for_login(s, device_id, password)
    return {
        "device_id": device_id,
        "patient_id": patient_id,
        "enrolled_since": enrollment.valid_from.isoformat(),
        "host": s.broker_host,
        "port": s.broker_tls_port,
        "tls": True,
        "ca_file": str(s.ca_cert),
        "ports": {"mqtts": s.broker_tls_port, "mqtt_loopback": s.broker_port},
        "username": device_id,
        "password": password,
        "topic": events_topic(device_id) if kind == "app" else vitals_topic(device_id),
        "status_topic": None if kind == "app" else status_topic(device_id),
        "qos": 1,
        "mqtt_version": "5",
    }


def wait_for_login(s: Settings, username: str, password: str, timeout: float = 10.0) -> None:
    """Block until the running broker accepts the new credentials (it reloads them on SIGHUP)."""
    from ingest.service import make_client

    deadline = time.monotonic() + timeout
    while True:
        client = make_client(f"provision-check-{username}", username, password)
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
