"""The one id validator (core/ids.py): what every patient, clinician and device id must look like.

What the registry relies on (and every registry entry point enforces): an id never carries a path (``/``, ``..``), a line break or another control
character (a forged line in `rpm audit show`), or an MQTT wildcard; and the error names what kind of id was
refused and the rule.
"""

from __future__ import annotations

import pytest

from core.ids import InvalidId, check_id, is_valid_id

VALID = ["pt-0001", "p", "0", "dr.lee", "bp_0042", "A" * 64, "x-1.2_3"]
INVALID = [
    "", "a" * 65,                               # length
    "../pt-1", "..", ".", "pt/1", "/etc/passwd", "pt\\1",  # paths
    "pt-1\n", "pt\n1", "pt-1\r", "pt\r\n1", "pt\t1", "pt\x1b[2J", "pt\x00", "pt\u2028x",  # control characters
    "-pt", "_pt", ".pt",                        # must start with a letter or digit
    "pt 1", "pt+1", "pt#1", "$SYS", "pt:1", "pt,1", "pt;1", "pt'1", 'pt"1',  # MQTT specials, separators
    "pté", "рt-1",                              # non-ASCII look-alikes (Cyrillic р)
    None, 42, b"pt-1",                          # not text
]


@pytest.mark.parametrize("value", VALID)
def test_valid_ids_pass_unchanged(value):
    assert is_valid_id(value) is True
    assert check_id("patient", value) == value


@pytest.mark.parametrize("value", INVALID)
def test_invalid_ids_are_refused(value):
    assert is_valid_id(value) is False
    with pytest.raises(InvalidId):
        check_id("patient", value)


def test_the_error_names_the_kind_of_id_and_the_rule_on_one_line():
    with pytest.raises(InvalidId) as exc:
        check_id("clinician", "dr\nforged line")
    message = str(exc.value)
    assert message.startswith("invalid clinician id ")
    assert "\n" not in message and "\\n" in message  # the value is shown escaped, not acted on
    assert "A-Z a-z 0-9 . _ -" in message


def test_invalid_id_is_a_value_error():
    """Callers that already handle bad values (CSV import, the CLI) handle a bad id the same way."""
    assert issubclass(InvalidId, ValueError)


# --- every registry entry point uses it ----------------------------------------------------------------------

@pytest.fixture
def con(settings):
    from warehouse.db import clinical

    with clinical(settings) as c:
        yield c


def _count(con, table: str) -> int:
    return con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


@pytest.mark.parametrize("bad", ["../pt-1", "pt-1\n", "pt/1", ""])
def test_the_registry_refuses_a_malformed_id_and_stores_nothing(con, bad):
    from warehouse import registry

    registry.upsert_patient(con, "pt-1")
    registry.add_clinician(con, "dr-a")
    with pytest.raises(InvalidId, match="patient id"):
        registry.upsert_patient(con, bad)
    with pytest.raises(InvalidId, match="clinician id"):
        registry.add_clinician(con, bad)
    with pytest.raises(InvalidId, match="patient id"):
        registry.assign(con, "dr-a", bad)
    with pytest.raises(InvalidId, match="clinician id"):
        registry.assign(con, bad, "pt-1")
    with pytest.raises(InvalidId, match="patient id"):
        registry.set_threshold(con, bad, "bp_stage2.systolic", 150, "dr-a")
    assert (_count(con, "patients"), _count(con, "clinicians"), _count(con, "care_team"),
            _count(con, "alert_thresholds")) == (1, 1, 0, 0)


def test_the_registry_refuses_someone_it_does_not_hold(con):
    from warehouse import registry

    registry.upsert_patient(con, "pt-1")
    registry.add_clinician(con, "dr-a")
    with pytest.raises(KeyError, match="unknown patient pt-2"):
        registry.set_threshold(con, "pt-2", "bp_stage2.systolic", 150, "dr-a")
    with pytest.raises(KeyError, match="unknown patient pt-2"):
        registry.unassign(con, "dr-a", "pt-2")
    with pytest.raises(KeyError, match="unknown clinician dr-b"):
        registry.unassign(con, "dr-b", "pt-1")
    assert _count(con, "alert_thresholds") == 0


@pytest.mark.parametrize("field", ["mrn", "given_name", "family_name"])
def test_the_registry_refuses_free_text_that_could_forge_terminal_lines(con, field):
    from warehouse import registry

    with pytest.raises(ValueError, match="control characters"):
        registry.upsert_patient(con, "pt-1", **{field: "Ada\n     pt-9  Forged, Line"})
    with pytest.raises(ValueError, match="control characters"):
        registry.add_clinician(con, "dr-a", name="Dr\rX")
    assert (_count(con, "patients"), _count(con, "clinicians")) == (0, 0)
