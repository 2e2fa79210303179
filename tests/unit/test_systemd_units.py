"""deploy/systemd/: the unit set a single server installs is accepted by systemd, hardened, restarts what
crashes, and runs commands that exist.

systemd-analyze checks the units offline (nothing is started). It needs every ExecStart binary to exist, so the
units are checked as a copy with the install paths (/opt/rpm/.venv, /var/lib/rpm, /etc/rpm) pointed at this
checkout and a temporary folder. A missing systemd-analyze fails the test on Linux — the platform the units are
for, where it comes with the `systemd` package — rather than skipping it, so a broken unit never passes
unnoticed; only a platform without systemd at all skips."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from core.settings import Settings
from rpmctl.cli import build_parser
from rpmctl.services.airflow_stack import COMPONENTS, ONE_SHOTS

UNITS = Path(__file__).resolve().parents[2] / "deploy" / "systemd"
VENV_BIN = "/opt/rpm/.venv/bin/"
STATE = "/var/lib/rpm"
ENV_FILE = "/etc/rpm/rpm.env"
LONG_RUNNING = {"rpm-broker.service", "rpm-ingest.service", "rpm-service.service", "rpm-metrics.service",
                *(f"rpm-airflow-{c}.service" for c in COMPONENTS)}
HARDENING = {"User": "rpm", "Group": "rpm", "EnvironmentFile": ENV_FILE, "NoNewPrivileges": "yes",
             "ProtectSystem": "strict", "ReadWritePaths": STATE, "PrivateTmp": "yes", "ProtectHome": "yes",
             "PrivateDevices": "yes", "CapabilityBoundingSet": "", "UMask": "0077"}


def systemd_analyze() -> str:
    if not sys.platform.startswith("linux"):
        pytest.skip("systemd units are checked on Linux only")
    found = shutil.which("systemd-analyze") or shutil.which("systemd-analyze", path="/usr/bin:/bin")
    assert found, "systemd-analyze is missing: apt-get install systemd (it checks deploy/systemd's units)"
    return found


def parse(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Sections -> (key, value) in order; keys may repeat (Wants=, SystemCallFilter=)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
        else:
            assert current is not None, f"{path.name}: {line!r} outside a section"
            key, _, value = line.partition("=")
            current.append((key, value))
    return sections


def values(unit: dict, section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def installed_copy(tmp_path: Path) -> list[Path]:
    """The units with their install paths pointed at this checkout's virtualenv and a temporary state folder."""
    state = tmp_path / "state"
    (state / "run").mkdir(parents=True)
    env_file = tmp_path / "rpm.env"
    shutil.copyfile(UNITS / "rpm.env", env_file)
    out = []
    for unit in sorted([*UNITS.glob("*.service"), *UNITS.glob("*.target"), *UNITS.glob("*.timer")]):
        text = (unit.read_text().replace(VENV_BIN, f"{Path(sys.executable).parent}/")
                .replace(STATE, str(state)).replace(ENV_FILE, str(env_file)))
        (tmp_path / unit.name).write_text(text)
        out.append(tmp_path / unit.name)
    return out


def test_systemd_analyze_verify_accepts_every_unit_without_a_warning(tmp_path: Path):
    tool = systemd_analyze()
    units = installed_copy(tmp_path)
    done = subprocess.run([tool, "verify", "--man=no", *map(str, units)], capture_output=True, text=True,
                          timeout=120)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


def test_every_service_is_rated_ok_by_systemd_analyze_security(tmp_path: Path):
    tool = systemd_analyze()
    for unit in installed_copy(tmp_path):
        if unit.suffix != ".service":
            continue
        # --threshold is on systemd's 0-100 scale: 20 is an overall exposure of 2.0 ("OK" goes up to 3.9).
        done = subprocess.run([tool, "security", "--offline=yes", "--threshold=20", "--no-pager", str(unit)],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{unit.name}:\n{done.stdout[-3000:]}{done.stderr}"


def test_each_component_restarts_on_failure_runs_hardened_as_rpm_and_belongs_to_rpm_target():
    services = {p.name: parse(p) for p in UNITS.glob("*.service")}
    assert LONG_RUNNING <= set(services), "a component without its unit"
    target = parse(UNITS / "rpm.target")
    assert set(" ".join(values(target, "Unit", "Wants")).split()) >= LONG_RUNNING
    for name, unit in services.items():
        for key, wanted in HARDENING.items():
            assert values(unit, "Service", key) == [wanted], f"{name}: {key}"
        assert values(unit, "Unit", "PartOf") == ["rpm.target"], name
        if name in LONG_RUNNING:
            assert values(unit, "Service", "Restart") == ["on-failure"], name
            assert values(unit, "Service", "RestartSec"), name
            assert values(unit, "Unit", "StartLimitIntervalSec") and values(unit, "Unit", "StartLimitBurst"), name
            assert values(unit, "Install", "WantedBy") == ["rpm.target"], name


def test_every_command_a_unit_runs_exists():
    airflow_units = set()
    for path in UNITS.glob("*.service"):
        [exec_start] = values(parse(path), "Service", "ExecStart")
        argv = exec_start.split()
        if argv[0] == f"{VENV_BIN}rpm":
            assert build_parser().parse_args(argv[1:]).fn, path.name  # an unknown command raises
        elif argv[0] == f"{VENV_BIN}python":
            assert argv[1:3] == ["-m", "rpmctl.services.airflow_stack"], path.name
            assert argv[3] in (*COMPONENTS, *ONE_SHOTS), path.name
            airflow_units.add(argv[3])
        else:
            assert argv[:2] == ["/usr/sbin/mosquitto", "-c"] and argv[2] == f"{STATE}/broker/mosquitto.conf"
            assert Settings(home=Path(STATE)).broker_dir / "mosquitto.conf" == Path(argv[2])
    assert airflow_units == {*COMPONENTS, *ONE_SHOTS}  # one unit per Airflow component, none left over


def test_the_environment_file_holds_only_real_settings():
    env, suggested = {}, set()
    for line in (UNITS / "rpm.env").read_text().splitlines():
        key, _, value = line.removeprefix("#").partition("=")
        if line.startswith("#RPM_"):
            suggested.add(key)
        elif line.strip() and not line.startswith("#"):
            env[key] = value
    known = {f"RPM_{f.upper()}" for f in Settings.model_fields}
    assert {k for k in env if k.startswith("RPM_")} | suggested <= known
    s = Settings.from_env(env)
    assert (str(s.home), s.run_as, env["HOME"]) == (STATE, "rpm", STATE)


def test_a_daily_timer_cleans_airflow_metadata():
    timer = parse(UNITS / "rpm-airflow-clean.timer")
    assert values(timer, "Timer", "OnCalendar") == ["daily"] and values(timer, "Timer", "Persistent") == ["yes"]
    assert "rpm-airflow-clean.timer" in " ".join(values(parse(UNITS / "rpm.target"), "Unit", "Wants")).split()
    service = parse(UNITS / "rpm-airflow-clean.service")  # the timer's unit of the same name
    assert values(service, "Service", "Type") == ["oneshot"]
    assert values(service, "Service", "ExecStart")[0].endswith("-m rpmctl.services.airflow_stack clean")
