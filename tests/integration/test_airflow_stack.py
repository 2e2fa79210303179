"""The long-lived local Airflow of `rpm up --airflow`: up on loopback only, DAGs unpaused, a real scheduled
run of rpm_pipeline through scheduler + executor + API server, a killed scheduler restarted by the supervisor,
and nothing left behind after stop."""

from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import socket
import time
import urllib.error
import urllib.parse
from datetime import UTC, datetime
from pathlib import Path

import psutil
import pytest

from core.settings import Settings
from rpmctl.services import airflow_stack, procs
from rpmctl.services.restarts import restarts
from rpmctl.views.ops import ops_status
from tests.conftest import free_port

pytestmark = pytest.mark.integration

WAIT_S = 240.0


def env_pids(home: Path) -> set[int]:
    """Processes whose environment still shows this AIRFLOW_HOME (retitled ones, e.g. the API server, don't)."""
    needle = f"AIRFLOW_HOME={home}".encode()
    found = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    found.add(int(entry.name))
        except OSError:
            continue
    return found


def listening_addresses(pids: set[int]) -> set[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]]:
    """(address, port) of every TCP socket these processes listen on, from /proc/net/tcp{,6}."""
    inodes = set()
    for pid in pids:
        try:
            for fd in os.scandir(f"/proc/{pid}/fd"):
                link = os.readlink(fd.path)
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
        except OSError:
            continue
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] != "0A" or fields[9] not in inodes:  # 0A = LISTEN
                    continue
                addr_hex, port_hex = fields[1].split(":")
                raw = bytes.fromhex(addr_hex)  # 32-bit words in host (little-endian) order
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                addr = ipaddress.ip_address(raw)
                found.add((getattr(addr, "ipv4_mapped", None) or addr, int(port_hex, 16)))
    return found


def outward_address() -> str | None:
    """This host's address on its default route (no packet is sent), or None without one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("192.0.2.255", 9))
        except OSError:
            return None
        addr = sock.getsockname()[0]
    return None if ipaddress.ip_address(addr).is_loopback else addr


def wait_for(predicate, what: str, timeout: float = WAIT_S, interval: float = 1.0):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f}s waiting for {what}"
        time.sleep(interval)
    return value


def scheduler_heartbeat(s: Settings) -> datetime | None:
    beat = ((airflow_stack.health(s) or {}).get("scheduler") or {}).get("latest_scheduler_heartbeat")
    return datetime.fromisoformat(beat) if beat else None


def land_garbage(s: Settings, n: int, name: str = "garbage-0001") -> None:
    """``n`` unreadable messages from an unregistered device, landed and sealed as the ingest service would."""
    from core.keyring import Keyring
    from core.landing import SegmentWriter

    writer = SegmentWriter(s.landing_dir, name, keyring=Keyring.load(s, "landing"))
    for i in range(n):
        writer.append("rpm/v1/devices/ghost-1/vitals", b"not json %d" % i, datetime.now(UTC))
    writer.seal()


def task_log(s: Settings, jwt: str, run_path: str, task_id: str) -> str:
    """A task's first attempt's log through the REST API, as the UI shows it."""
    body = airflow_stack.api(s, "GET", f"{run_path}/taskInstances/{task_id}/logs/1", token=jwt)
    content = body.get("content") if isinstance(body, dict) else body
    return "\n".join(str(line.get("event", line)) if isinstance(line, dict) else str(line) for line in content or [])


def dag_runs(s: Settings, jwt: str) -> list[dict]:
    return airflow_stack.api(s, "GET", "/api/v2/dags/rpm_pipeline/dagRuns?limit=100", token=jwt)["dag_runs"]


def a_seal_starts_a_run_and_seals_during_it_queue_one_more(s: Settings, jwt: str) -> None:
    """The schedule is hourly, so only the seal can start the next run; three more seals while it runs start
    one run after it (max_active_runs=1), not three, and never two at once."""
    before = {r["dag_run_id"] for r in dag_runs(s, jwt)}
    sealed_at = time.monotonic()
    land_garbage(s, 1, "garbage-0002")
    first = wait_for(lambda: next((r for r in dag_runs(s, jwt) if r["dag_run_id"] not in before), None),
                     "a run started by the sealed segment", 120, 0.5)
    started_s = time.monotonic() - sealed_at
    assert first["run_type"] == "asset_triggered", first
    for i in range(3):
        land_garbage(s, 1, f"garbage-{i + 3:04d}")
    active_max = 0

    def settled() -> list[dict] | None:
        nonlocal active_max
        new = [r for r in dag_runs(s, jwt) if r["dag_run_id"] not in before]
        active_max = max(active_max, sum(r["state"] in ("queued", "running") for r in new))
        # Settled: the first run and the one its seals queued have ended, and nothing else is queued.
        done = len(new) >= 2 and all(r["state"] in ("success", "failed") for r in new)
        return new if done else None

    new = wait_for(settled, "the seal's run and the one queued behind it to end", WAIT_S, 0.5)
    assert active_max == 1  # never a second run queued or running beside the first
    assert len(new) == 2 and {r["run_type"] for r in new} == {"asset_triggered"}, new
    print(f"a sealed segment started a run after {started_s:.1f}s; three seals during it queued one more")


def kill_the_scheduler_and_see_it_restarted(s: Settings) -> set[int]:
    """kill -9 the scheduler: the supervisor restarts it (the stack stays up), records it, ends the workers the
    dead one left behind, and the new one heartbeats. Returns the pids involved."""
    before = airflow_stack.component_pids(s)["scheduler"]
    workers = {p.pid for p in psutil.Process(before).children(recursive=True)}
    assert workers, "the LocalExecutor forks its workers up front"
    killed_at = datetime.now(UTC)
    os.kill(before, signal.SIGKILL)
    entry = wait_for(lambda: next((r for r in restarts(s) if r["component"] == "airflow-scheduler"
                                   and r["pid_before"] == before), None), "the scheduler's restart", 30, 0.2)
    assert (entry["supervisor"], entry["signal"], entry["attempt"], entry["backoff_s"]) == (
        "airflow", "SIGKILL", 1, 1.0)
    after = entry["pid_after"]
    assert airflow_stack.component_pids(s)["scheduler"] == after and airflow_stack.is_running(after)
    wait_for(lambda: not any(airflow_stack.is_running(p) for p in workers), "the dead scheduler's workers to end",
             15, 0.2)
    wait_for(lambda: (beat := scheduler_heartbeat(s)) is not None and beat > killed_at,
             "the restarted scheduler's heartbeat", 120, 0.5)
    shown = airflow_stack.status(s)["components"]["airflow-scheduler"]
    assert (shown["pid"], shown["restarts_24h"], shown["last_reason"]) == (after, 1, "killed by SIGKILL")
    assert airflow_stack.status(s)["running"]
    return {before, after, *workers}


def test_airflow_stack_runs_rpm_pipeline_on_loopback_and_stops_cleanly(
        settings: Settings, airflow_db_template: Path) -> None:
    # Hourly: the scheduler creates one run on unpause and none while the test runs; a run of every minute
    # would be in flight at the stop, which then waits for it (~60 s).
    s = settings.replace(airflow_port=free_port(), pipeline_schedule_minutes=60)
    seen: set[int] = set()
    home = Path(s.airflow_home)  # type: ignore[arg-type]
    home.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(airflow_db_template, home / "airflow.db")
    try:
        t0 = time.monotonic()
        up = airflow_stack.start(s, timeout=WAIT_S)  # returns once /api/v2/monitor/health is all healthy
        started_s = time.monotonic() - t0
        assert up["url"] == f"http://127.0.0.1:{s.airflow_port}"
        assert up["dags"] == {"rpm_pipeline": "unpaused", "rpm_daily": "unpaused"}, up["dags"]
        assert up["username"] == "admin" and up["password"]
        assert oct(Path(up["password_file"]).stat().st_mode & 0o777) == "0o600"

        # Loopback only: no component of the stack listens anywhere else (standalone's log servers would).
        seen = airflow_stack.processes(s) | env_pids(home)
        listeners = listening_addresses(seen)
        assert (ipaddress.ip_address("127.0.0.1"), s.airflow_port) in listeners
        assert all(addr.is_loopback for addr, _ in listeners), listeners
        if (outward := outward_address()) is not None:
            assert not procs.port_open(outward, s.airflow_port)

        jwt = airflow_stack.token(s)
        with pytest.raises(urllib.error.HTTPError) as denied:
            airflow_stack.api(s, "GET", "/api/v2/dags/rpm_pipeline")
        assert denied.value.code == 401
        dag = airflow_stack.api(s, "GET", "/api/v2/dags/rpm_pipeline", token=jwt)
        assert dag["is_paused"] is False

        # An all-bad batch: every message is quarantined. The run loads and publishes, then its quality gate
        # fails it — red in Airflow's own grid — and `rpm ops status` names the run and the rate.
        # The scheduled run created on unpause may claim the batch before the manual one: whichever does, fails.
        land_garbage(s, 3)
        run = airflow_stack.trigger(s, "rpm_pipeline", jwt)
        path = f"/api/v2/dags/rpm_pipeline/dagRuns/{urllib.parse.quote(run['dag_run_id'], safe='')}"
        wait_for(lambda: airflow_stack.api(s, "GET", path, token=jwt)["state"] in ("success", "failed"),
                 f"run {run['dag_run_id']} to finish")
        [failed] = airflow_stack.api(s, "GET", "/api/v2/dags/rpm_pipeline/dagRuns?state=failed",
                                     token=jwt)["dag_runs"]
        path = f"/api/v2/dags/rpm_pipeline/dagRuns/{urllib.parse.quote(failed['dag_run_id'], safe='')}"
        tis = {ti["task_id"]: ti["state"] for ti in
               airflow_stack.api(s, "GET", f"{path}/taskInstances", token=jwt)["task_instances"]}
        if {t for t, st in tis.items() if st != "success"} != {"quality_gate"}:
            pytest.fail(f"rpm_pipeline {failed['dag_run_id']}: {tis}\n"
                        + procs.tail(procs.log_file(s, airflow_stack.NAME), 40))
        # Each task's one INFO line is in its log as the UI shows it (counts and rule names only).
        load_log = task_log(s, jwt, path, "load")
        assert "rpm load: loaded=0 quarantined=3 duplicates=0" in load_log, load_log[-2000:]
        assert "rpm validate:" in task_log(s, jwt, path, "validate")
        verdict = ops_status(s)
        assert verdict["verdict"] == "failing"
        # (A later scheduled run with nothing to claim may be the last one by now: the hour still counts.)
        assert any("quarantined 3 of 3 received (100.0%), above RPM_QUARANTINE_FAIL" in r
                   for r in verdict["reasons"]), verdict["reasons"]
        seen |= airflow_stack.processes(s) | env_pids(home)  # task runners come and go
        status = airflow_stack.status(s)
        assert status["running"] and status["last_runs"]
        assert run["dag_run_id"] in {r["dag_run_id"] for r in status["last_runs"]}
        print(f"airflow stack healthy after {started_s:.1f}s; the all-bad batch's run failed its gate after "
              f"{time.monotonic() - t0:.1f}s")
        wait_for(lambda: all(r["state"] in ("success", "failed") for r in dag_runs(s, jwt)),
                 "every run so far to end")
        a_seal_starts_a_run_and_seals_during_it_queue_one_more(s, jwt)

        t1 = time.monotonic()
        seen |= kill_the_scheduler_and_see_it_restarted(s)
        assert any(r.startswith("airflow-scheduler restarted by its supervisor") and "SIGKILL" in r
                   for r in ops_status(s)["reasons"])
        print(f"killed scheduler restarted and heartbeating after {time.monotonic() - t1:.1f}s")
    finally:
        t1 = time.monotonic()
        stopped = airflow_stack.stop(s, timeout=60)
        print(f"stopped in {time.monotonic() - t1:.1f}s")
    assert stopped
    survivors = {pid for pid in seen | env_pids(home) if airflow_stack.is_running(pid)}
    assert survivors == set(), f"processes of this stack survived stop: {survivors}"
    assert not procs.port_open("127.0.0.1", s.airflow_port)
    assert airflow_stack.status(s)["running"] is False
