"""Provisioning: a device's login is issued once; changing its enrollment does not cut a connected device
off (its password stays unless a new one is asked for)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from core.settings import Settings
from rpmctl.admin.devices import ProvisioningError, provision
from rpmctl.services import broker
from warehouse.db import clinical
from warehouse.registry import upsert_patient


@pytest.fixture
def patient(settings: Settings) -> str:
    settings.home.mkdir(parents=True, exist_ok=True)
    with clinical(settings) as con:
        upsert_patient(con, "pt-1")
    return "pt-1"


def test_an_existing_device_keeps_its_password_unless_a_new_one_is_asked_for(settings: Settings, patient) -> None:
    first = provision(settings, "bp-1", patient, kind="bp")
    assert first["password"]
    issued = broker.logins(settings)["bp-1"]
    since = datetime.now(UTC) - timedelta(days=3)
    again = provision(settings, "bp-1", patient, since=since)  # back-dating its enrollment
    assert again["password"] is None and broker.logins(settings)["bp-1"] == issued
    assert again["enrolled_since"] == since.isoformat()
    renewed = provision(settings, "bp-1", patient, new_password=True)
    assert renewed["password"] and renewed["password"] != first["password"]
    assert broker.logins(settings)["bp-1"] != issued


@pytest.mark.parametrize("device", ["rpm-ingest-2", "rpm-ingest", "rpm-ingest-b"])
def test_an_ingest_client_id_is_never_a_device_id(settings: Settings, patient, device: str) -> None:
    with pytest.raises(ProvisioningError, match="reserved for the ingest service"):
        provision(settings, device, patient, kind="bp")


def test_an_enrollment_in_the_future_is_refused(settings: Settings, patient) -> None:
    with pytest.raises(ProvisioningError, match="cannot start in the future"):
        provision(settings, "bp-1", patient, kind="bp", since=datetime(9999, 12, 31, tzinfo=UTC))
    assert "bp-1" not in broker.logins(settings)
