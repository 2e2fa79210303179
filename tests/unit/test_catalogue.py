"""The telehealth catalogue: what the simulator and the registry send is in it (reports stay meaningful), free
text is not, and a practice's additions are checked where they are configured."""

from __future__ import annotations

import pytest

from core.settings import Settings, SettingsError
from rpmctl.tools.simulator import FIRMWARE, MODULES
from transforms import catalogue
from transforms.events import MODALITIES
from warehouse.registry import CONDITIONS


def test_the_simulators_modules_surveys_and_firmware_are_catalogued():
    listed = catalogue.listed()
    assert {m for ms in MODULES.values() for m in ms} <= listed["module"]
    assert "phq-2" in listed["survey"]  # the simulator's survey
    assert all(set(versions) <= catalogue.FIRMWARE[kind] for kind, versions in FIRMWARE.items())
    assert listed["modality"] == set(MODALITIES)


def test_every_registry_condition_is_a_care_programme():
    assert {c: catalogue.PROGRAMME_OF.get(c) for c in CONDITIONS} == {c: c for c in CONDITIONS}
    assert set(catalogue.PROGRAMME_OF.values()) | {catalogue.OTHER} == set(catalogue.PROGRAMMES)


@pytest.mark.parametrize("text", ['=HYPERLINK("http://x","Jane Roe")', "2.4.1 Jane", "Jane-1950-01-01", "1",
                                  "2.4.1-beta", "+1.2", " 2.4.1", "2.4.1\n",
                                  # shaped like version numbers: SSN, phone, birth date, IP address
                                  "123.45.6789", "555.867.5309", "1950.01.01", "10.20.30.40"])
def test_firmware_that_is_not_a_released_version_is_not_catalogued(text):
    firmware = {(field, value) for field, value, _ in catalogue.rows() if field.startswith("firmware:")}
    assert not [kind for kind in catalogue.FIRMWARE if (f"firmware:{kind}", text) in firmware]


def test_firmware_is_catalogued_for_its_own_device_kind_only():
    stored = {(field, value): as_ for field, value, as_ in catalogue.rows() if field.startswith("firmware:")}
    assert stored[("firmware:bp", "2.4.1")] == "2.4.1"
    assert ("firmware:scale", "2.4.1") not in stored  # a cuff's release on a scale: "other"


def test_built_in_values_are_slugs():
    assert all(catalogue.SLUG_RE.fullmatch(v) for f in ("module", "survey") for v in catalogue.listed()[f])


def test_a_practice_adds_modules_and_surveys_with_a_setting():
    s = Settings.from_env({"RPM_TELEHEALTH_CATALOGUE_EXTRA": "module:heart-healthy-eating,survey:ipaq"})
    listed = catalogue.listed(s.telehealth_catalogue_extra)
    assert "heart-healthy-eating" in listed["module"] and "ipaq" in listed["survey"]
    assert listed["module"] - catalogue.EDUCATION_MODULES == {"heart-healthy-eating"}


@pytest.mark.parametrize("value", ['module:=HYPERLINK("x")', "module:Jane Roe", "firmware:9.9", "module:",
                                   "heart-healthy-eating", "module:a;survey:b"])
def test_an_addition_that_is_not_a_slug_is_refused_where_it_is_configured(value):
    with pytest.raises(SettingsError, match="RPM_TELEHEALTH_CATALOGUE_EXTRA"):
        Settings.from_env({"RPM_TELEHEALTH_CATALOGUE_EXTRA": value})
    with pytest.raises(ValueError, match="catalogue entry"):
        catalogue.listed(value)
