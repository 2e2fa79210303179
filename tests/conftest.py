"""Shared fixtures: an isolated RPM_HOME on free loopback ports, a real Mosquitto, a real ingest process."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from core.settings import Settings
from rpmctl import services
from rpmctl.services import broker, procs, supervisor
from rpmctl.services.airflow_run import airflow_env

RPM = str(Path(sys.executable).with_name("rpm"))
# The suite runs as root and its commands keep root (the state in temporary folders belongs to root), in this
# process and every command it starts; tests/integration/test_service_account.py sets the service account.
os.environ["RPM_RUN_AS"] = "root"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def airflow_db_template() -> Iterator[Path]:
    """One migrated Airflow metadata DB per session; each test copies it (migrating takes seconds)."""
    home = Path(tempfile.mkdtemp(prefix="rpm-airflow-"))
    s = Settings(home=home / "var")
    subprocess.run([str(Path(sys.executable).with_name("airflow")), "db", "migrate"],
                   env={**os.environ, **airflow_env(s)}, check=True, capture_output=True)
    yield Path(s.airflow_home) / "airflow.db"  # type: ignore[arg-type]
    shutil.rmtree(home, ignore_errors=True)


@contextmanager
def fresh_settings() -> Iterator[Settings]:
    """State in a fresh folder, every listener on a free loopback port; services stopped and state removed
    afterwards."""
    base = Path(tempfile.mkdtemp(prefix="rpm-test-"))
    os.chmod(base, 0o755)  # the broker drops to an unprivileged account and must traverse it
    s = Settings(home=base / "var", broker_port=free_port(), broker_tls_port=free_port(),
                 broker_ingest_port=free_port(), broker_tls_bind="127.0.0.1", segment_max_age_s=1.0,
                 ingest_flush_interval_ms=10, ingest_metrics_port=free_port(), service_port=free_port(),
                 metrics_port=free_port(), metrics_statsd_port=free_port(),
                 run_as="root")
    try:
        yield s
    finally:
        supervisor.stop(s)  # first, or it would restart what is stopped below (a test that ran `rpm up`)
        procs.stop(s, services.METRICS, timeout=10)
        procs.stop(s, services.SERVICE, timeout=10)
        procs.stop(s, services.INGEST, timeout=10)
        broker.stop(s)
        shutil.rmtree(base, ignore_errors=True)


def start_stack(s: Settings, airflow_db: Path) -> Settings:
    """Broker + ingest running in the background, Airflow metadata ready: the part of `rpm up` the pipeline's
    tests use (the clinician service and the metrics exporter are for the modules that test them: each costs
    a process start per fixture)."""
    s.airflow_home.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(airflow_db, s.airflow_home / "airflow.db")
    return start_ingest(s)


def start_ingest(s: Settings) -> Settings:
    """The broker and the ingest service, as `rpm up` starts them."""
    services.init(s)
    broker.rotate_log(s)
    broker.start(s)
    services.start_ingest(s)
    return s


@pytest.fixture
def settings() -> Iterator[Settings]:
    """Settings for one test: state in a fresh folder, every listener on a free loopback port."""
    with fresh_settings() as s:
        yield s


@pytest.fixture
def running_broker(settings: Settings) -> Settings:
    services.init(settings)
    broker.start(settings)
    return settings


@pytest.fixture
def ingest_up(settings: Settings) -> Settings:
    """Broker + ingest running in the background (no Airflow metadata needed)."""
    return start_ingest(settings)


@pytest.fixture
def stack(settings: Settings, airflow_db_template: Path) -> Settings:
    """Broker + ingest running in the background, Airflow metadata ready: what `rpm up` gives a user."""
    return start_stack(settings, airflow_db_template)


def user_env(s: Settings) -> dict[str, str]:
    """The environment of a user of this installation: its settings, and a config folder of its own (where
    `rpm login` keeps the session token)."""
    return {**os.environ, **s.as_env(), "XDG_CONFIG_HOME": str(Path(s.home).parent / "config")}


def rpm(s: Settings, *args: str, check: bool = True, timeout: float = 300,
        input: str | None = None) -> subprocess.CompletedProcess:
    """Run the `rpm` console command as a user would, with this test's settings in its environment."""
    proc = subprocess.run([RPM, *args], env=user_env(s), capture_output=True, text=True, timeout=timeout,
                          input=input)
    if check and proc.returncode != 0:
        run_log = Path(s.run_dir) / "pipeline-run.log"  # type: ignore[arg-type]
        tail = procs.tail(run_log, 80) if args[:2] == ("pipeline", "run") else ""
        raise AssertionError(f"rpm {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}\n{tail}")
    return proc


def rpm_json(s: Settings, *args: str, input: str | None = None) -> dict:
    return json.loads(rpm(s, *args, "--json", input=input).stdout)


PASSWORD = "correct horse battery staple"


def login_as(s: Settings, clinician_id: str, role: str = "clinician") -> None:
    """Create the account if needed (a clinician must be in the registry) and log in as it: what a
    clinician does before `rpm clinician …`."""
    existing = {u["username"] for u in rpm_json(s, "users", "list")}
    if clinician_id not in existing:
        rpm(s, "users", "add", clinician_id, "--role", role, "--password-stdin", input=PASSWORD + "\n")
    rpm(s, "login", "--as", clinician_id, "--password-stdin", input=PASSWORD + "\n")
