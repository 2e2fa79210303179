"""Files that name a patient or a device are private: owner-only files (0600) in owner-only folders.

What a practice relies on: another account on the machine reads no identifier from the state folder after a
real `rpm up` and pipeline run — service logs, audit log, warehouse, landing, broker files — nor from what the
CLI writes out for a clinician (billing and report CSVs, FHIR exports), even over a file that was world-readable
before; and the service logs that grow with every connection are rotated when their service starts.
"""

from __future__ import annotations

import os
import signal
import stat
import sys
from pathlib import Path

import pytest

from core.settings import Settings
from rpmctl import services
from rpmctl.services import ingest_status, procs
from rpmctl.tools.publish import wait_until
from rpmctl.tools.simulator import build_fleet, provision_fleet, publish_fleet
from tests.conftest import login_as, rpm

pytestmark = pytest.mark.integration


def _needles(fleet) -> set[bytes]:
    """Identifiers long enough that ciphertext cannot contain one by chance: patient and device ids."""
    ids = {d.device_id for d in fleet.devices} | set(fleet.patients)
    return {i.encode() for i in ids if len(i) >= 6}


def _mrns(s: Settings) -> set[bytes]:
    from warehouse.serving import serving

    with serving(s) as con:
        return {r[0].encode() for r in con.execute("SELECT mrn FROM patients WHERE mrn IS NOT NULL").fetchall()}


def _names_someone(path: Path, needles: set[bytes]) -> bool:
    if any(n in path.name.encode() for n in needles):
        return True
    try:
        data = path.read_bytes()
    except OSError:
        return False
    return any(n in data for n in needles)


def _exposed(home: Path, needles: set[bytes]) -> tuple[list[Path], list[str]]:
    """The files under ``home`` that name someone, and those another account could read, with the reason."""
    named, out = [], []
    for path in sorted(home.rglob("*")):
        st = path.lstat()
        if not stat.S_ISREG(st.st_mode) or not _names_someone(path, needles):
            continue
        named.append(path)
        if st.st_mode & 0o077:
            out.append(f"{path.relative_to(home)}: {stat.filemode(st.st_mode)}")
        for folder in [home, *(p for p in path.parents if home in p.parents)]:
            # Owner only; a service account's group may traverse (x) down to its own folder, never list or read,
            # and anyone may traverse the state folder itself (to pki/, the public certificates).
            if folder.stat().st_mode & (0o066 if folder == home else 0o067):
                out.append(f"{path.relative_to(home)}: folder {folder} is {stat.filemode(folder.stat().st_mode)}")
    return named, out


# Folders whose every file is about patients or devices, in plaintext or encrypted: nobody else may reach them.
PHI_FOLDERS = ("audit", "warehouse", "landing", "run", "broker", "secrets", "backups")


def _reachable_by_others(home: Path) -> list[str]:
    """Files under a PHI folder that another account could open: neither the file nor a folder between the
    state folder and it is owner-only."""
    out = []
    for top in PHI_FOLDERS:
        for path in sorted((home / top).rglob("*")):
            if not path.is_file() or path.is_symlink():
                continue
            chain = [path, *(p for p in path.parents if p == home or home in p.parents)]
            if all(p.stat().st_mode & 0o077 for p in chain):
                out.append(f"{path.relative_to(home)}: {stat.filemode(path.stat().st_mode)} in "
                           + ", ".join(stat.filemode(p.stat().st_mode) for p in chain[1:]))
    return out


@pytest.fixture(autouse=True)
def login_umask():
    """What a login shell gives (files 0644 unless the code says otherwise), set before the stack starts."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_after_up_and_a_pipeline_run_nothing_that_names_someone_is_readable_by_others(stack, tmp_path):
    s = stack
    services.up(s)  # everything `rpm up` starts: the clinician service and the metrics exporter write too
    fleet = build_fleet(patients=3, days=2, seed=11)
    provision_fleet(s, fleet, days=2)
    sent = publish_fleet(s, fleet)
    wait_until(lambda: (ingest_status(s) or {}).get("landed", 0) >= sent["published"], 30, what="landing")
    rpm(s, "pipeline", "run")
    login_as(s, "dr-lee")  # the clinician's session goes to the service started by `rpm up`
    rpm(s, "clinician", "--as", "dr-lee", "patients")  # an audited read: the audit folder exists now

    # What the CLI writes for a clinician, into the working directory, over files that were world-readable.
    out = tmp_path / "out"
    out.mkdir()
    targets = {"billing.csv": ("clinician", "--as", "dr-lee", "billing", "--csv"),
               "connectivity.csv": ("reports", "connectivity", "--csv"),
               "bundle.json": ("clinician", "--as", "dr-lee", "export-fhir", "pt-0001", "--out")}
    for name, command in targets.items():
        (out / name).write_text("old\n")
        os.chmod(out / name, 0o644)
        rpm(s, *command, str(out / name))
    for name in targets:
        mode = (out / name).stat().st_mode
        assert stat.S_IMODE(mode) == 0o600, (name, stat.filemode(mode))
        assert (out / name).read_text() != "old\n"

    needles = _needles(fleet) | _mrns(s)
    named, exposed = _exposed(Path(s.home), needles)
    assert Path(s.broker_dir) / "passwd" in named  # type: ignore[arg-type]  # the walk sees identifiers
    assert exposed == []
    assert _reachable_by_others(Path(s.home)) == []
    for folder in (s.run_dir, Path(s.home) / "audit"):
        assert stat.S_IMODE(Path(folder).stat().st_mode) == 0o700, folder  # type: ignore[arg-type]
    for log in Path(s.run_dir).glob("*.log"):  # type: ignore[arg-type]
        assert stat.S_IMODE(log.stat().st_mode) == 0o600, log


DUMMY = [sys.executable, "-c", "import signal; print('started', flush=True); signal.pause()"]


def _start_dummy(s: Settings, **kw) -> int:
    log = procs.log_file(s, "dummy")
    return procs.start(s, "dummy", DUMMY, ready=lambda: log.exists() and b"started" in log.read_bytes(), **kw)


def test_a_service_log_over_the_limit_is_rotated_when_the_service_starts(settings):
    s = settings
    run_dir = Path(s.run_dir)  # type: ignore[arg-type]
    run_dir.mkdir(parents=True)
    os.chmod(run_dir, 0o755)  # as an older version left it
    log = procs.log_file(s, "dummy")
    log.write_bytes(b"device bp-0042 connected from 192.0.2.7\n" * 100)
    os.chmod(log, 0o644)
    for n in (1, 2, 3):
        log.with_name(f"dummy.log.{n}").write_bytes(f"generation {n}\n".encode())
    current = log.read_bytes()

    _start_dummy(s, log_max_bytes=1000)
    try:
        assert log.read_bytes() == b"started\n"
        assert log.with_name("dummy.log.1").read_bytes() == current
        assert log.with_name("dummy.log.2").read_bytes() == b"generation 1\n"
        assert log.with_name("dummy.log.3").read_bytes() == b"generation 2\n"
        assert not log.with_name("dummy.log.4").exists()  # procs.LOG_KEEP old logs are kept
        assert stat.S_IMODE(log.stat().st_mode) == 0o600
        assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700
    finally:
        assert procs.stop(s, "dummy", sig=signal.SIGTERM, timeout=10)


def test_a_service_log_under_the_limit_keeps_growing_and_becomes_private(settings):
    s = settings
    Path(s.run_dir).mkdir(parents=True)  # type: ignore[arg-type]
    log = procs.log_file(s, "dummy")
    log.write_bytes(b"earlier run\n")
    os.chmod(log, 0o644)
    _start_dummy(s)
    try:
        assert log.read_bytes() == b"earlier run\nstarted\n"
        assert not log.with_name("dummy.log.1").exists()
        assert stat.S_IMODE(log.stat().st_mode) == 0o600
    finally:
        procs.stop(s, "dummy", timeout=10)


def test_a_fresh_run_folder_and_log_are_private_from_the_start(settings):
    s = settings
    _start_dummy(s)
    try:
        assert stat.S_IMODE(Path(s.run_dir).stat().st_mode) == 0o700  # type: ignore[arg-type]
        assert stat.S_IMODE(procs.log_file(s, "dummy").stat().st_mode) == 0o600
    finally:
        procs.stop(s, "dummy", timeout=10)
