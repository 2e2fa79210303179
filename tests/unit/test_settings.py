"""One typed settings object: RPM_* environment overrides, paths derived from RPM_HOME."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.settings import Settings, SettingsError

DERIVED = {"secrets_dir": "secrets", "pki_dir": "pki", "broker_dir": "broker", "landing_dir": "landing",
           "warehouse_dir": "warehouse", "run_dir": "run", "airflow_home": "airflow"}


def test_the_default_home_is_var_in_the_working_directory(tmp_path: Path, monkeypatch) -> None:
    """Not a path computed from where the code is installed: `pip install .` keeps no state in site-packages."""
    monkeypatch.chdir(tmp_path)
    s = Settings.from_env({})
    assert s.home == tmp_path / "var"
    assert s.broker_port == 11883
    assert s.future_skew_s == 300


def test_env_overrides_are_parsed_to_the_field_types(tmp_path: Path) -> None:
    s = Settings.from_env({
        "RPM_HOME": str(tmp_path / "rpm"),
        "RPM_BROKER_PORT": "1883",
        "RPM_BROKER_HOST": "broker.example",
        "RPM_SEGMENT_MAX_AGE_S": "2.5",
        "RPM_FUTURE_SKEW_S": "60",
        "RPM_PIPELINE_MAX_SEGMENTS": "7",
    })
    assert s.home == tmp_path / "rpm"
    assert s.broker_port == 1883 and type(s.broker_port) is int
    assert s.broker_host == "broker.example"
    assert s.segment_max_age_s == 2.5 and type(s.segment_max_age_s) is float
    assert s.future_skew_s == 60 and type(s.future_skew_s) is int
    assert s.pipeline_max_segments == 7


def test_empty_variables_and_other_namespaces_are_ignored() -> None:
    s = Settings.from_env({"RPM_BROKER_PORT": "", "BROKER_PORT": "1", "rpm_broker_port": "2"})
    assert s.broker_port == 11883


def test_from_env_reads_the_process_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RPM_HOME", str(tmp_path))
    monkeypatch.setenv("RPM_INGEST_FLUSH_INTERVAL_MS", "5")
    s = Settings.from_env()
    assert s.home == tmp_path
    assert s.ingest_flush_interval_ms == 5


def test_keyword_overrides_win_over_the_environment(tmp_path: Path) -> None:
    s = Settings.from_env({"RPM_BROKER_PORT": "1883"}, broker_port=2883)
    assert s.broker_port == 2883


def test_derived_paths_follow_home(tmp_path: Path) -> None:
    s = Settings.from_env({"RPM_HOME": str(tmp_path / "h")})
    for name, sub in DERIVED.items():
        assert getattr(s, name) == tmp_path / "h" / sub, name
    assert s.clinical_db == tmp_path / "h" / "warehouse" / "clinical.duckdb"
    assert s.warehouse_key_file == tmp_path / "h" / "secrets" / "warehouse.key"
    assert s.ca_cert == tmp_path / "h" / "pki" / "ca.crt"


def test_explicit_landing_dir_wins_over_home(tmp_path: Path) -> None:
    s = Settings.from_env({"RPM_HOME": str(tmp_path / "h"), "RPM_LANDING_DIR": str(tmp_path / "fast-disk")})
    assert s.landing_dir == tmp_path / "fast-disk"
    assert s.warehouse_dir == tmp_path / "h" / "warehouse"  # the others still follow home


def test_relative_home_is_resolved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    s = Settings.from_env({"RPM_HOME": "rel"})
    assert s.home == tmp_path / "rel"
    assert s.landing_dir == tmp_path / "rel" / "landing"


@pytest.mark.parametrize(("var", "raw"), [
    ("RPM_BROKER_PORT", "eighteen"),
    ("RPM_BROKER_PORT", "1883.5"),
    ("RPM_FUTURE_SKEW_S", "5m"),
    ("RPM_SEGMENT_MAX_AGE_S", "ten"),
])
def test_invalid_number_names_the_variable(var: str, raw: str) -> None:
    with pytest.raises(ValueError, match=var) as exc:
        Settings.from_env({var: raw})
    assert repr(raw) in str(exc.value)


def test_as_env_reproduces_the_settings_in_a_child_process(tmp_path: Path) -> None:
    s = Settings(home=tmp_path, broker_port=1999, landing_dir=tmp_path / "elsewhere", segment_max_age_s=0.5)
    assert Settings.from_env(s.as_env()) == s


def test_every_field_is_documented() -> None:
    described = {var: doc for var, _, doc in Settings.describe()}
    assert set(described) == {f"RPM_{name.upper()}" for name in Settings.model_fields}
    assert all(doc.strip() for doc in described.values())


def test_settings_are_immutable_and_copied_with_replace(tmp_path: Path) -> None:
    s = Settings(home=tmp_path)
    with pytest.raises(ValueError):
        s.broker_port = 1  # type: ignore[misc]
    t = s.replace(broker_port=1999)
    assert (t.broker_port, s.broker_port, t.home) == (1999, 11883, s.home)


def test_an_ingest_client_id_must_carry_the_prefix_device_ids_cannot() -> None:
    with pytest.raises(SettingsError, match="RPM_INGEST_CLIENT_ID='collector-2': .*must start with 'rpm-ingest'"):
        Settings.from_env({"RPM_INGEST_CLIENT_ID": "collector-2"})
    assert Settings.from_env({"RPM_INGEST_CLIENT_ID": "rpm-ingest-2"}).ingest_client_id == "rpm-ingest-2"
