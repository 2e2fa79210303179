"""Shared fixtures: an isolated RPM_HOME on free loopback ports, a real Mosquitto, a real ingest process."""

from __future__ import annotations

import fcntl
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
from tests import rpm_forkserver

RPM = str(Path(sys.executable).with_name("rpm"))
DURATIONS = Path(__file__).with_name("durations.json")
# The suite runs as root and its commands keep root (the state in temporary folders belongs to root), in this
# process and every command it starts; tests/integration/test_service_account.py sets the service account.
os.environ["RPM_RUN_AS"] = "root"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- scheduling: the longest modules first -------------------------------------------------------------------
# `--dist loadscope` keeps a module on one worker and hands modules out in order of their number of tests, so
# the integration modules (few tests, tens of seconds each) went last and the run waited on one worker's tail.
# Handing them out longest first (LPT) by their measured seconds (tests/durations.json, refreshed with
# `pytest --store-durations`) lets the short unit modules fill the gaps instead. A worker is sent its next
# module while it still runs the last test or two of the current one (it needs the next item to end a module):
# one that is busy for a while yet gets the shortest module for that, not a long one another worker would start
# sooner.

BUSY_S = 10.0  # expected seconds of work left above which a worker's next module is the shortest one


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--store-durations", action="store_true",
                     help=f"write each module's seconds (setup, call, teardown) to {DURATIONS.name}")


def module_costs() -> dict[str, float]:
    try:
        return {k: float(v) for k, v in json.loads(DURATIONS.read_text()).items()}
    except (OSError, ValueError, AttributeError):
        return {}


def estimated_cost(module: str, costs: dict[str, float]) -> float:
    """A module's measured seconds; a new one is guessed from its folder (integration and browser modules start
    services: a typical one of theirs, not last in line)."""
    if module in costs:
        return costs[module]
    started = module.startswith(("tests/integration/", "tests/browser/"))
    known = sorted(v for k, v in costs.items() if k.startswith(("tests/integration/", "tests/browser/")) == started)
    return known[len(known) // 2] if known else (30.0 if started else 1.0)


def pytest_xdist_make_scheduler(config: pytest.Config, log):
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    costs = module_costs()

    def cost(scope: str) -> float:
        return estimated_cost(scope.split("::")[0], costs)

    class LongestFirst(LoadScopeScheduling):
        """loadscope, with the work queue in descending order of each module's expected seconds."""

        def _assign_work_unit(self, node) -> None:
            if not getattr(self, "_ordered", False):
                order = sorted(self.workqueue, key=lambda scope: -cost(scope))
                self.workqueue = type(self.workqueue)((scope, self.workqueue[scope]) for scope in order)
                self._ordered = True
            busy_for = sum(cost(scope) * list(unit.values()).count(False) / len(unit)
                           for scope, unit in self.assigned_work.get(node, {}).items())
            if busy_for > BUSY_S and len(self.workqueue) > 1:
                self.workqueue.move_to_end(next(reversed(self.workqueue)), last=False)
            super()._assign_work_unit(node)

    return LongestFirst(config, log)


_module_seconds: dict[str, float] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _module_seconds[report.nodeid.split("::")[0]] = _module_seconds.get(report.nodeid.split("::")[0], 0.0) + (
        report.duration)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """With --store-durations, on the controller (or a run without workers): merge this run's module seconds."""
    if not session.config.getoption("store_durations") or hasattr(session.config, "workerinput"):
        return
    costs = module_costs() | {k: round(v, 1) for k, v in _module_seconds.items()}
    DURATIONS.write_text(json.dumps(dict(sorted(costs.items())), indent=1) + "\n")


@pytest.fixture(scope="session")
def airflow_db_template(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One migrated Airflow metadata DB per test run; each test copies it (migrating takes seconds of CPU).

    Under xdist the workers share it: the first to need it migrates, under a lock in the run's common temporary
    folder, and the others wait for it rather than each migrating one of their own. pytest removes the folder
    with its old runs."""
    worker = hasattr(request.config, "workerinput")
    root = tmp_path_factory.getbasetemp().parent if worker else tmp_path_factory.getbasetemp()
    home = root / "airflow-template"
    s = Settings(home=home / "var")
    db = Path(s.airflow_home) / "airflow.db"  # type: ignore[arg-type]
    with open(root / "airflow-template.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (home / "migrated").exists():
            shutil.rmtree(home, ignore_errors=True)  # a migration that died half-way
            home.mkdir()
            subprocess.run([str(Path(sys.executable).with_name("airflow")), "db", "migrate"],
                           env={**os.environ, **airflow_env(s)}, check=True, capture_output=True)
            (home / "migrated").touch()
    return db


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
    """Run the `rpm` command as a user would, with this test's settings in its environment (in a process
    forked from one that has imported it: tests/rpm_forkserver.py)."""
    proc = rpm_forkserver.SERVER.run(RPM, list(args), user_env(s), input=input, timeout=timeout)
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
