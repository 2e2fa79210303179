"""`rpm up --airflow`: the long-lived local Airflow (scheduler, DAG processor, API server, triggerer).

What `airflow standalone` runs, started by a small supervisor of our own instead of standalone itself,
because standalone (measured, Airflow 3.3):

- always starts two task-log servers bound to 0.0.0.0/[::] on the fixed ports 8793 and 8794: reachable
  off-host, and a second stack on the machine (the tests while `make up` runs) collides with them. With the
  LocalExecutor the API server reads task logs from local files, so we start the components with
  ``--skip-serve-logs`` and the only listener is the API on 127.0.0.1;
- stops its components only on KeyboardInterrupt: launched with SIGINT ignored (a background job of a
  non-interactive shell inherits that) it ignores the stop and stays up over its dead components.

The supervisor restarts a component that exits (a `kill -9` of the scheduler), after a back-off of 1 s
doubling to 60 s (restarts.Backoff), ends what the dead component left running (a scheduler's LocalExecutor
workers), and appends the restart to run/restarts.jsonl; `rpm status` shows it. It does not stop the stack
for one component any more: only `stop` does.

The supervisor and every component share one process group (own session). `stop` asks the supervisor
(SIGINT), which stops each component gracefully (the scheduler lets a running task finish), then escalates
with SIGTERM and SIGKILL to the group and every descendant (task runners lead groups of their own), and
waits until none is left, so nothing is orphaned. Metadata is SQLite under AIRFLOW_HOME; LocalExecutor.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psutil

from core import keys
from core.settings import Settings
from rpmctl.services import procs
from rpmctl.services.airflow_run import airflow_env
from rpmctl.services.restarts import Backoff, describe_exit, record, restart_summary, restarts_of

NAME = "airflow"
HOST = "127.0.0.1"
DAG_IDS = ("rpm_pipeline", "rpm_daily")
ADMIN = "admin"
HEALTH = "/api/v2/monitor/health"
COMPONENTS: dict[str, list[str]] = {
    "scheduler": ["scheduler", "--skip-serve-logs"],
    "dag-processor": ["dag-processor"],
    "api-server": ["api-server"],
    "triggerer": ["triggerer", "--skip-serve-logs"],
}
# Both DAGs are linear with max_active_runs=1 and DuckDB takes one writer: two task slots are plenty,
# and the LocalExecutor forks one worker process per slot up front.
PARALLELISM = 2
# The LocalExecutor, its workers forked after the tasks' heavy imports (pipeline/executor.py).
EXECUTOR = "pipeline.executor.PreloadedLocalExecutor"
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback never goes via a proxy


def url(s: Settings) -> str:
    return f"http://{HOST}:{s.airflow_port}"


def password_file(s: Settings) -> Path:
    """Where Airflow's simple auth manager keeps its users' passwords (its default name)."""
    return Path(s.airflow_home) / "simple_auth_manager_passwords.json.generated"


def stack_env(s: Settings) -> dict[str, str]:
    """Environment of every component: loopback API, a small executor, the simple auth manager's admin."""
    return {
        **airflow_env(s),
        "AIRFLOW__CORE__EXECUTOR": EXECUTOR,
        "AIRFLOW__CORE__PARALLELISM": str(PARALLELISM),
        "AIRFLOW__API__HOST": HOST,
        "AIRFLOW__API__PORT": str(s.airflow_port),
        "AIRFLOW__API__WORKERS": "1",
        # Task processes reach the API through this URL; its default assumes localhost:8080.
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{url(s)}/execution/",
        "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
        # A task's successor is queued on the scheduler's next loop, which sleeps this long when idle (1 s by
        # default): paid between every two of rpm_pipeline's tasks, on the path to a clinician's screen.
        "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "0.25",
        "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",  # would listen on 0.0.0.0:8974
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "AIRFLOW__CORE__AUTH_MANAGER":
            "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN}:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(password_file(s)),
        # Signs UI/API logins and the tokens tasks use on the execution API; the generated default is 24 bytes.
        "AIRFLOW__API_AUTH__JWT_SECRET": _jwt_secret(s),
        # Metrics over StatsD to `rpm metrics` (pipeline/statsd.py), with DAG and task ids as InfluxDB-style tags
        # (labels there) rather than inside the legacy per-DAG / per-task metric names.
        **({"AIRFLOW__METRICS__STATSD_ON": "True",
            "AIRFLOW__METRICS__STATSD_HOST": HOST if s.metrics_bind in ("0.0.0.0", "::") else s.metrics_bind,
            "AIRFLOW__METRICS__STATSD_PORT": str(s.metrics_statsd_port),
            "AIRFLOW__METRICS__STATSD_PREFIX": "airflow",
            "AIRFLOW__METRICS__STATSD_INFLUXDB_ENABLED": "True",
            "AIRFLOW__METRICS__LEGACY_NAMES_ON": "False"} if s.metrics_port and s.metrics_statsd_port else {}),
    }


def _jwt_secret(s: Settings) -> str:
    path = Path(s.secrets_dir) / "airflow-jwt.secret"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        keys.write_private(path, secrets.token_urlsafe(64).encode())
    return keys.read_secret(path)


def admin_login(s: Settings) -> dict[str, str]:
    """The UI/API admin login, created on first use.

    Written by us (0600) before the API server starts, rather than letting Airflow generate it: Airflow
    writes the file world-readable and prints the password into the log.
    """
    path = password_file(s)
    try:
        passwords = json.loads(path.read_text().strip() or "{}")
    except FileNotFoundError:
        passwords = {}
    if ADMIN not in passwords:
        passwords[ADMIN] = keys.new_password()
        keys.write_private(path, (json.dumps(passwords) + "\n").encode())
    else:
        os.chmod(path, 0o600)
    return {"username": ADMIN, "password": passwords[ADMIN], "password_file": str(path)}


# --- REST API -----------------------------------------------------------------------------------------

def api(s: Settings, method: str, path: str, body: Any = None, token: str | None = None,
        timeout: float = 10.0, idempotent: bool | None = None) -> Any:
    """One call to the Airflow REST API on loopback; JSON in and out. Raises urllib's HTTPError.

    Idempotent calls (not POST, unless the caller says so) are retried for a while on a 5xx or a read that
    timed out: the API server answers 500 when its SQLite metadata DB is momentarily locked by the scheduler,
    and on a loaded 2-core machine a single answer has taken longer than ``timeout`` (CI, while the scheduler
    ran a task).
    """
    idempotent = method != "POST" if idempotent is None else idempotent
    deadline = time.monotonic() + (max(15.0, 3 * timeout) if idempotent else 0)
    while True:
        try:
            return _api_once(s, method, path, body, token, timeout)
        except urllib.error.HTTPError as exc:
            if exc.code < 500 or time.monotonic() > deadline:
                raise
        except (TimeoutError, urllib.error.URLError) as exc:
            timed_out = isinstance(exc, TimeoutError) or isinstance(getattr(exc, "reason", None), TimeoutError)
            if not timed_out or time.monotonic() > deadline:
                raise
        time.sleep(0.5)


def _api_once(s: Settings, method: str, path: str, body: Any, token: str | None, timeout: float) -> Any:
    headers = {"Accept": "application/json"}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url(s) + path, data=data, method=method, headers=headers)
    with _NO_PROXY.open(req, timeout=timeout) as resp:
        raw = resp.read()
    return json.loads(raw) if raw else None


def trigger(s: Settings, dag_id: str, jwt: str, timeout: float = 30.0) -> dict:
    """Start a run of ``dag_id`` now. Safe to retry: the run id is chosen here, so a POST answered 500 (the
    SQLite metadata DB locked under load) is sent again, and one that did commit is found by its id."""
    run_id = f"manual__{datetime.now(UTC).isoformat()}"
    path = f"/api/v2/dags/{dag_id}/dagRuns"
    deadline = time.monotonic() + timeout
    while True:
        try:
            return api(s, "POST", path, {"dag_run_id": run_id, "logical_date": None}, token=jwt)
        except urllib.error.HTTPError as exc:
            if exc.code == 409:  # an earlier attempt committed after all
                return api(s, "GET", f"{path}/{urllib.parse.quote(run_id, safe='')}", token=jwt)
            if exc.code < 500 or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def token(s: Settings, timeout: float = 10.0) -> str:
    """A JWT for the REST API, from the simple auth manager's login endpoint (a login creates nothing: one whose
    answer timed out is sent again, as a loaded machine needed once)."""
    login = admin_login(s)
    return api(s, "POST", "/auth/token", {"username": login["username"], "password": login["password"]},
               timeout=timeout, idempotent=True)["access_token"]


def health(s: Settings) -> dict | None:
    try:  # one quick try: callers poll, and a stack that does not answer is reported as such
        return _api_once(s, "GET", HEALTH, None, None, 2.0)
    except (OSError, ValueError):
        return None


def _healthy_since(s: Settings, started: datetime) -> bool:
    """Every component reports healthy with a heartbeat from this start (not one left over in the DB)."""
    h = health(s)
    if not h:
        return False
    for component, beat in (("scheduler", "latest_scheduler_heartbeat"),
                            ("triggerer", "latest_triggerer_heartbeat"),
                            ("dag_processor", "latest_dag_processor_heartbeat")):
        info = h.get(component) or {}
        if info.get("status") != "healthy" or not info.get(beat):
            return False
        if datetime.fromisoformat(info[beat]) < started:
            return False
    return h.get("metadatabase", {}).get("status") == "healthy"


def _unpause(s: Settings, jwt: str, timeout: float) -> dict[str, str]:
    """Unpause our DAGs once the DAG processor has registered them; report any that never appear."""
    deadline = time.monotonic() + timeout
    result: dict[str, str] = {}
    pending = list(DAG_IDS)
    while pending:
        for dag_id in list(pending):
            try:
                api(s, "PATCH", f"/api/v2/dags/{dag_id}", {"is_paused": False}, token=jwt)
            except urllib.error.HTTPError as exc:
                # 404: not registered yet. 5xx: the API server's SQLite was busy (seen under load). Retry both.
                if exc.code != 404 and exc.code < 500:
                    raise
                continue
            result[dag_id] = "unpaused"
            pending.remove(dag_id)
        if pending and time.monotonic() > deadline:
            errors = api(s, "GET", "/api/v2/importErrors", token=jwt).get("import_errors", [])
            reasons = "; ".join(f"{e.get('filename')}: {_last_line(e.get('stack_trace'))}" for e in errors)
            for dag_id in pending:
                result[dag_id] = f"not registered ({reasons or 'no import error reported'})"
            break
        if pending:
            time.sleep(1.0)
    return result


def _last_line(text: str | None) -> str:
    lines = (text or "").strip().splitlines()
    return lines[-1] if lines else ""


# --- lifecycle ----------------------------------------------------------------------------------------

def start(s: Settings, timeout: float = 180.0) -> dict:
    """Start the stack in the background, wait until it is healthy and unpause rpm_pipeline and rpm_daily.

    Returns the UI URL, the admin login, the pid, the log file and each DAG's state. Idempotent.
    """
    env = stack_env(s)
    login = admin_login(s)
    already = procs.read_pid(s, NAME)
    if already is None:
        _end_stack(s, 30.0)  # what a dead supervisor (kill -9) left running would hold the port
        if procs.port_open(HOST, s.airflow_port):
            # Its health answers would pass for ours.
            raise procs.StartError(f"{HOST}:{s.airflow_port} is already in use: set RPM_AIRFLOW_PORT")
        # Migrating first also writes airflow.cfg once: components started together would each write one
        # with its own generated secrets (fernet key, API secret key).
        subprocess.run([str(Path(sys.executable).with_name("airflow")), "db", "migrate"],
                       env={**os.environ, **env}, check=True, stdout=subprocess.DEVNULL, timeout=timeout)
        started = datetime.now(UTC)
        procs.start(s, NAME, [sys.executable, "-m", "rpmctl.services.airflow_stack"], env=env)
        wanted_file(s).touch(mode=0o600)
        _wait_healthy(s, started, timeout)
    try:
        dags = _unpause(s, token(s), timeout=60.0)
    except BaseException:
        if already is None:
            stop(s)
        raise
    return {"pid": procs.read_pid(s, NAME), "already_running": already is not None, "url": url(s),
            "username": login["username"], "password": login["password"],
            "password_file": login["password_file"], "dags": dags, "log": str(procs.log_file(s, NAME))}


def _wait_healthy(s: Settings, started: datetime, timeout: float) -> None:
    """Wait for the health endpoint (the supervisor restarts a component that exits meanwhile); a stack
    not healthy by ``timeout`` is stopped."""
    log = procs.log_file(s, NAME)
    deadline = time.monotonic() + timeout
    while not _healthy_since(s, started):
        if procs.read_pid(s, NAME) is None:
            raise procs.StartError(f"airflow exited while starting; see {log}:\n{procs.tail(log)}")
        if time.monotonic() > deadline:
            stop(s)
            raise procs.StartError(f"airflow not healthy after {timeout:.0f}s; see {log}:\n{procs.tail(log)}")
        time.sleep(0.5)


def wanted_file(s: Settings) -> Path:
    return Path(s.run_dir) / "airflow.wanted"


def wanted(s: Settings) -> bool:
    """Whether this state folder's Airflow is meant to run: `rpm up --airflow` started it and no `rpm down`
    stopped it since (a crashed stack is still wanted: `rpm ops status` reports it)."""
    return wanted_file(s).exists()


def stop(s: Settings, timeout: float = 60.0) -> bool:
    """Stop the whole stack: SIGINT (the supervisor stops each component), then SIGTERM and SIGKILL to
    every process left in its group or below it. Returns False when nothing was running."""
    wanted_file(s).unlink(missing_ok=True)
    return _end_stack(s, timeout)


def restart(s: Settings) -> int | None:
    """The watchdog's start for a stack whose supervisor died: end what it left running, start it again;
    the stack stays wanted even when this attempt fails (the watchdog tries again after its back-off)."""
    try:
        return start(s)["pid"]
    finally:
        wanted_file(s).touch(mode=0o600)


def _end_stack(s: Settings, timeout: float) -> bool:
    """Stop the supervisor and its components (or what a dead supervisor left), leaving ``wanted`` alone."""
    leader = procs.recorded_pid(s, NAME)
    if leader is None or not any(_ours(s, p) for p in {leader} | _tree(leader)):
        procs.pid_file(s, NAME).unlink(missing_ok=True)  # stale: never signal a pid reused by someone else
        return False
    members = _tree(leader)
    for sig, wait in ((signal.SIGINT, timeout), (signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        if sig == signal.SIGINT and is_running(leader):
            os.kill(leader, sig)
        else:  # escalation, or the supervisor died and left its components behind
            _signal_all(leader, members, sig)
        deadline = time.monotonic() + wait
        while True:
            members = {p for p in members | _tree(leader) if is_running(p)}
            if not members or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        if not members:
            break
    procs.read_pid(s, NAME)  # reaps the supervisor if it is our child
    procs.pid_file(s, NAME).unlink(missing_ok=True)
    return True


def status(s: Settings) -> dict:
    """Running or not, the UI URL, each component's pid and restarts, health and the latest rpm_pipeline
    runs."""
    pid = procs.read_pid(s, NAME)
    out: dict[str, Any] = {"running": pid is not None, "pid": pid, "url": url(s), "processes": 0,
                           "health": None, "last_runs": None, "wanted": wanted(s),
                           "supervisor_dead": pid is None and wanted(s)}
    # A component's pid as long as it runs in the stack — also when its supervisor died (kill -9) and left it
    # running unsupervised: shown, not hidden.
    members, restarted = processes(s), restart_summary(s)
    pids = {n: p for n, p in component_pids(s).items() if p in members}
    out["components"] = {f"{SUPERVISOR}-{n}": {"pid": pids.get(n), **restarts_of(restarted, f"{SUPERVISOR}-{n}")}
                         for n in COMPONENTS}
    out["components"][WATCHDOG_NAME] = {"pid": pid, **restarts_of(restarted, WATCHDOG_NAME)}
    if pid is None:
        return out
    out["processes"] = len(members)
    out["health"] = health(s)
    try:
        runs = api(s, "GET", "/api/v2/dags/rpm_pipeline/dagRuns?order_by=-run_after&limit=5", token=token(s))
        out["last_runs"] = [{k: r.get(k) for k in ("dag_run_id", "run_type", "state", "start_date", "end_date")}
                            for r in runs.get("dag_runs", [])]
    except (OSError, ValueError, KeyError):
        pass
    return out


# --- process tree -------------------------------------------------------------------------------------

def processes(s: Settings) -> set[int]:
    """Pids of the running stack: the supervisor's group and every descendant, task runners included.

    (Matching on AIRFLOW_HOME in /proc/<pid>/environ misses components: setproctitle overwrites it.)
    """
    leader = procs.recorded_pid(s, NAME)
    if leader is None:
        return set()
    members = _tree(leader)  # (the group outlives a dead leader: its components, orphaned)
    return members if any(_ours(s, p) for p in {leader} | members) else set()


def _tree(pgid: int) -> set[int]:
    """Live members of process group ``pgid`` and all their descendants (whatever group they moved to)."""
    found: set[int] = set()
    for proc in psutil.process_iter(["pid", "status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(proc.pid) == pgid:
                found.add(proc.pid)
                found |= {c.pid for c in proc.children(recursive=True) if c.status() != psutil.STATUS_ZOMBIE}
        except (psutil.Error, ProcessLookupError):
            continue  # gone while we looked
    return found


def is_running(pid: int) -> bool:
    """Alive and not a zombie (a dead child not yet reaped is gone for our purpose)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _ours(s: Settings, pid: int) -> bool:
    """Whether ``pid`` runs with this stack's AIRFLOW_HOME (every component inherits it)."""
    try:
        return psutil.Process(pid).environ().get("AIRFLOW_HOME") == str(s.airflow_home)
    except psutil.Error:
        return False


def _signal_all(pgid: int, pids: set[int], sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass
    for pid in pids:  # descendants that left the group: task runners lead groups of their own
        try:
            group = os.getpgid(pid)
            if group == pgid:
                continue  # signalled above
            if group == pid:
                os.killpg(group, sig)
            else:
                os.kill(pid, sig)
        except ProcessLookupError:
            pass


# --- supervisor (runs as `python -m rpmctl.services.airflow_stack`, leader of the stack's process group) -------

POLL_S = 1.0
SUPERVISOR = "airflow"  # the restart log's name for this supervisor
WATCHDOG_NAME = f"{SUPERVISOR}-supervisor"  # the restart log's name for the supervisor itself (the watchdog's)


def components_file(s: Settings) -> Path:
    return Path(s.run_dir) / "airflow-components.json"


def component_pids(s: Settings) -> dict[str, int]:
    """Each component's pid, as the running stack's supervisor last wrote it (after every restart)."""
    try:
        pids = json.loads(components_file(s).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(pids, dict):
        return {}
    return {n: p for n, p in pids.items() if type(p) is int and 0 < p <= procs.PID_MAX}


# What grows with every run in Airflow's metadata DB: on the 1-minute schedule 1,440 runs a day, each with its
# task instances and their history, audit-log rows, XComs, and an asset event per sealed segment. Airflow
# never removes them itself, and a scheduler over a large SQLite file slows down (its queries scan them).
METADATA_TABLES = ("asset_event", "dag_run", "job", "log", "task_instance", "task_instance_history", "xcom")
CLEAN_FIRST_S = 300.0  # after the supervisor starts: not while the components start up
CLEAN_EVERY_S = 24 * 3600.0


def clean_argv(s: Settings, now: datetime | None = None) -> list[str]:
    """`airflow db clean` of what is older than RPM_ARTIFACT_RETENTION_DAYS (the task logs' retention, so a
    run's record and its log go together); Airflow keeps each DAG's latest run whatever its age. Small
    batches: each holds SQLite's write lock, which the scheduler waits for."""
    before = (now or datetime.now(UTC)) - timedelta(days=s.artifact_retention_days)
    return [str(Path(sys.executable).with_name("airflow")), "db", "clean", "--clean-before-timestamp",
            before.isoformat(), "--tables", ",".join(METADATA_TABLES), "--batch-size", "1000", "--skip-archive",
            "--yes", "--error-on-cleanup-failure"]


class _MetadataCleaner:
    """The supervisor's daily `airflow db clean` (deploy/systemd runs it from a timer instead), a child process
    of its own so the restarts it tends to are never held up by it."""

    def __init__(self, s: Settings, first_s: float = CLEAN_FIRST_S, every_s: float = CLEAN_EVERY_S) -> None:
        self.s, self.every_s = s, every_s
        self.next_at = time.monotonic() + first_s
        self.proc: subprocess.Popen | None = None

    def tend(self) -> None:
        if self.proc is not None and (code := self.proc.poll()) is not None:
            print(f"rpm airflow supervisor: metadata older than {self.s.artifact_retention_days} days "
                  + ("removed" if code == 0 else f"not removed ({describe_exit(code)}); tried again tomorrow"),
                  flush=True)
            self.proc = None
        if self.proc is None and time.monotonic() >= self.next_at:
            self.next_at = time.monotonic() + self.every_s
            try:
                self.proc = subprocess.Popen(clean_argv(self.s), stdin=subprocess.DEVNULL,
                                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            except OSError as exc:
                print(f"rpm airflow supervisor: metadata clean not started: {exc}", flush=True)


class _Component:
    """One component under the supervisor: its process, its back-off, and its descendants as last seen."""

    def __init__(self, name: str, argv: list[str]) -> None:
        self.name, self.argv = name, argv
        self.backoff = Backoff()
        self.proc = subprocess.Popen(argv)
        self.started = time.monotonic()
        self.down_since: float | None = None  # when its exit was noticed; None while it runs
        self.descendants: set[psutil.Process] = set()

    def respawn(self) -> None:
        self.proc = subprocess.Popen(self.argv)
        self.started, self.down_since, self.descendants = time.monotonic(), None, set()


def supervise() -> int:
    """Run every component, restarting one that exits (after its back-off, recorded in the restart log),
    until asked to stop; then stop them all and wait."""
    s = Settings.from_env()
    airflow = str(Path(sys.executable).with_name("airflow"))
    stop_requested: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        # Set explicitly: an inherited SIG_IGN would also be inherited by every component.
        signal.signal(sig, lambda signum, _frame: stop_requested.append(signum))
    stack = [_Component(name, [airflow, *argv]) for name, argv in COMPONENTS.items()]
    _write_pids(s, stack)
    print(f"rpm airflow supervisor: started {', '.join(f'{c.name}={c.proc.pid}' for c in stack)}", flush=True)
    cleaner = _MetadataCleaner(s)
    while not stop_requested:
        trees = _descendants({c.proc.pid for c in stack})
        for c in stack:
            if not stop_requested:
                _tend(s, c, trees[c.proc.pid], stack)
        cleaner.tend()
        time.sleep(POLL_S)
    for sig, wait in ((signal.SIGINT, 45.0), (signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        alive = [p for p in (*(c.proc for c in stack), cleaner.proc) if p is not None and p.poll() is None]
        if not alive:
            break
        for p in alive:
            p.send_signal(sig)
        deadline = time.monotonic() + wait
        while any(p.poll() is None for p in alive) and time.monotonic() < deadline:
            time.sleep(0.1)
    components_file(s).unlink(missing_ok=True)
    print("rpm airflow supervisor: stopped", flush=True)
    return 0


def _tend(s: Settings, c: _Component, tree: set[psutil.Process], stack: list[_Component]) -> None:
    """Note a component's exit, and restart it once its back-off has passed."""
    now = time.monotonic()
    if c.down_since is None:
        if c.proc.poll() is None:
            c.backoff.stayed_up(now - c.started)
            c.descendants = tree
            return
        c.down_since = now
        print(f"rpm airflow supervisor: {c.name} (pid {c.proc.pid}) {describe_exit(c.proc.returncode)}; "
              f"restarting in {c.backoff.delay():g} s", flush=True)
        # A killed scheduler leaves its LocalExecutor workers (and their task runners) behind, orphaned and
        # idle for good; the restarted scheduler resets their task instances anyway.
        _end(c.descendants)
    if now - c.down_since < c.backoff.delay():
        return
    before, returncode, delay = c.proc.pid, c.proc.returncode, c.backoff.delay()
    error = None
    try:
        c.respawn()
    except OSError as exc:  # e.g. out of processes: tried again after the next back-off
        error = f"{type(exc).__name__}: {exc}"
        c.down_since = time.monotonic()
    c.backoff.restarted()
    record(s, f"{SUPERVISOR}-{c.name}", SUPERVISOR, before, None if error else c.proc.pid, returncode,
           c.backoff.attempt, delay, error)
    _write_pids(s, stack)
    print(f"rpm airflow supervisor: {c.name} " + (f"restart failed: {error}" if error else
                                                   f"restarted as pid {c.proc.pid}"), flush=True)


def _descendants(roots: set[int]) -> dict[int, set[psutil.Process]]:
    """Every live descendant of each root pid, from one pass over the process table."""
    children: dict[int, list[psutil.Process]] = {}
    for proc in psutil.process_iter(["ppid"]):
        children.setdefault(proc.info["ppid"], []).append(proc)
    out = {}
    for root in roots:
        found: set[psutil.Process] = set()
        todo = [root]
        while todo:
            for child in children.get(todo.pop(), []):
                found.add(child)
                todo.append(child.pid)
        out[root] = found
    return out


def _end(leftovers: set[psutil.Process]) -> None:
    """SIGTERM what a dead component left running, SIGKILL what is still there 5 s later. A psutil.Process
    is its pid and start time: a pid reused since is not signalled."""
    running = [p for p in leftovers if p.is_running()]
    for p in running:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _gone, stubborn = psutil.wait_procs(running, timeout=5)
    for p in stubborn:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def _write_pids(s: Settings, stack: list[_Component]) -> None:
    path = components_file(s)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({c.name: c.proc.pid for c in stack}))
    os.replace(tmp, path)


# --- one component in the foreground (deploy/systemd: one unit per component) -------------------------------

def run_component(name: str) -> None:
    """Replace this process with one component, started exactly as the local stack starts it (environment,
    arguments); ``migrate`` upgrades the metadata DB first, ``clean`` removes old runs (clean_argv). What
    deploy/systemd's units run."""
    s = Settings.from_env()
    env = {**os.environ, **stack_env(s)}
    if name == "api-server":
        admin_login(s)  # written 0600 by us before Airflow would write it world-readable
    airflow = str(Path(sys.executable).with_name("airflow"))
    if name == "clean":
        argv = clean_argv(s)
    else:
        argv = [airflow, *(["db", "migrate"] if name == "migrate" else COMPONENTS[name])]
    os.execve(airflow, argv, env)


ONE_SHOTS = ("migrate", "clean")


def main(argv: list[str]) -> int:
    if not argv:
        return supervise()
    if len(argv) != 1 or argv[0] not in (*COMPONENTS, *ONE_SHOTS):
        print(f"usage: python -m rpmctl.services.airflow_stack [{' | '.join((*COMPONENTS, *ONE_SHOTS))}]",
              file=sys.stderr)
        return 2
    run_component(argv[0])
    return 0  # not reached: exec


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
