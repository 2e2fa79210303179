"""Started as root, rpm runs as its service account (RPM_RUN_AS) and another local account reads nothing.

What a practice relies on: after root's `rpm up`, a fleet through the broker and a pipeline run, the state
and every process belong to the unprivileged service account; an ordinary local account (``nobody``) can
open no key, no warehouse file or snapshot, no landing segment, no audit record, no accounts database and no
log, can list no folder but the public ``pki/``; its `rpm clinician` is refused without a session, and
`--as` alone reads nothing. The service still answers over HTTPS with a certificate anyone can verify.

The other tests run as root and keep it (tests/conftest.py): this module sets RPM_RUN_AS itself and drives
the real console command as root, then as ``nobody`` (with `runuser`).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from core.settings import Settings
from rpmctl.services import ingest_status
from rpmctl.tools.publish import wait_until
from tests.conftest import free_port

pytestmark = pytest.mark.integration

ACCOUNT = "rpm"
OTHER = "nobody"
SCRIPTS = ("rpm", "airflow")


def _as_other(argv: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["runuser", "-u", OTHER, "--", *argv], capture_output=True, text=True, timeout=120, **kw)


def _launcher(base: Path) -> Path:
    """A venv on the system's Python of this version, in a folder everyone can read, that loads this
    environment's packages: for when this environment's interpreter lives in a private home (pyenv under
    /root), where neither the service account nor another user could run it. Returns its bin/ folder."""
    system_python = Path(f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}")
    if not system_python.exists():
        pytest.fail(f"this interpreter is not runnable by other accounts and there is no {system_python}")
    venv = base / "venv"
    subprocess.run([str(system_python), "-m", "venv", "--without-pip", str(venv)], check=True, capture_output=True)
    [site] = venv.glob("lib/python*/site-packages")
    ours = sysconfig.get_paths()["purelib"]
    (site / "rpm-packages.pth").write_text(f"import site; site.addsitedir({ours!r})\n")
    for name in SCRIPTS:  # the console scripts, pointed at this interpreter
        text = Path(sys.executable).with_name(name).read_text().split("\n", 1)[1]
        (venv / "bin" / name).write_text(f"#!{venv}/bin/python\n{text}")
        os.chmod(venv / "bin" / name, 0o755)
    return venv / "bin"


@pytest.fixture(scope="module")
def bin_dir() -> Iterator[Path]:
    """Where `rpm` is, runnable by every account: this environment's, or a launcher's when it is private."""
    if shutil.which("runuser") is None:
        pytest.fail("needs runuser (util-linux) to run commands as another account")
    if os.geteuid() != 0:
        pytest.fail("needs root: it starts rpm as root and runs commands as another account (make test as root)")
    mine = Path(sys.executable).parent
    if _as_other([str(mine / "python"), "-c", "import rpmctl.cli"]).returncode == 0:
        yield mine
        return
    base = Path(tempfile.mkdtemp(prefix="rpm-launcher-"))
    os.chmod(base, 0o755)
    umask = os.umask(0o022)  # readable by every account, whatever umask an earlier test left this worker with
    try:
        launcher = _launcher(base)
    finally:
        os.umask(umask)
    try:
        yield launcher
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _settings(base: Path, **kw) -> Settings:
    return Settings(home=base / "var", broker_port=free_port(), broker_tls_port=free_port(),
                    broker_ingest_port=free_port(), broker_tls_bind="127.0.0.1", segment_max_age_s=1.0,
                    ingest_flush_interval_ms=10, ingest_metrics_port=free_port(), service_port=free_port(),
                    metrics_port=free_port(), metrics_statsd_port=free_port(), **kw)


def run(bin_dir: Path, s: Settings, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`rpm` started by root with these settings (RPM_RUN_AS among them)."""
    proc = subprocess.run([str(bin_dir / "rpm"), *args], env={**os.environ, **s.as_env()}, capture_output=True,
                          text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"rpm {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def installation(bin_dir: Path) -> Iterator[tuple[Settings, dict]]:
    """Root's `rpm up` with RPM_RUN_AS=rpm, a small fleet through the broker, one pipeline run, one audited
    read: (settings, the run's result)."""
    base = Path(tempfile.mkdtemp(prefix="rpm-svc-"))
    os.chmod(base, 0o755)  # the service account must reach its state folder
    s = _settings(base, run_as=ACCOUNT)
    try:
        run(bin_dir, s, "up")
        sent = json.loads(run(bin_dir, s, "simulate", "--patients", "2", "--days", "2", "--json").stdout)
        wait_until(lambda: (ingest_status(s) or {}).get("landed", 0) >= sent["published"], 60, what="landing")
        result = json.loads(run(bin_dir, s, "pipeline", "run", "--json").stdout)
        run(bin_dir, s, "patients", "list")  # an audited read: the audit log exists
        yield s, result
    finally:
        run(bin_dir, s, "down", check=False)
        shutil.rmtree(base, ignore_errors=True)


def _public(s: Settings, path: Path) -> bool:
    return path == Path(s.pki_dir) or (path.parent == Path(s.pki_dir) and path.suffix == ".crt")


def test_the_state_and_every_service_belong_to_the_service_account(installation, bin_dir):
    s, result = installation
    assert result["state"] == "success", result  # the pipeline ran after the drop
    account = pwd.getpwnam(ACCOUNT)
    home = Path(s.home)
    wrong = []
    for path in [home, *home.rglob("*")]:
        st = path.lstat()
        mode = stat.S_IMODE(st.st_mode)
        if stat.S_ISLNK(st.st_mode):
            continue
        if path == home:
            wanted = 0o711  # anyone may traverse to pki/, list nothing
        elif _public(s, path):
            wanted = 0o755 if path.is_dir() else 0o644
        else:
            wanted = 0o700 if path.is_dir() else 0o600
        if (st.st_uid, st.st_gid, mode) != (account.pw_uid, account.pw_gid, wanted):
            wrong.append(f"{path.relative_to(home)}: uid {st.st_uid} gid {st.st_gid} {mode:04o}, wanted {wanted:04o}")
    assert wrong == []
    for name in ("mosquitto", "ingest", "service", "metrics", "watchdog"):  # and what the watchdog restarts
        proc = psutil.Process(int((Path(s.run_dir) / f"{name}.pid").read_text()))
        # Real, effective and saved ids: root is gone for good, not set aside.
        assert set(proc.uids()) == {account.pw_uid} and set(proc.gids()) == {account.pw_gid}, name
    # What root changed after becoming the service account is still recorded as root's doing.
    records = json.loads(run(bin_dir, s, "audit", "show", "--last", "200", "--json").stdout)
    changes = [r for r in records if r["action"].startswith("registry:")]
    assert changes and {(r["actor"], r["os_user"]) for r in changes} == {("os:root", "root")}


PROBE = """
import json, os, sys
opened, listed = [], []
for p in json.loads(sys.argv[1]):
    try:
        with open(p, "rb") as f:
            f.read(1)
        opened.append(p)
    except OSError as exc:
        assert exc.errno == 13, (p, exc)  # permission denied, not a missing file
for d in json.loads(sys.argv[2]):
    try:
        os.listdir(d)
        listed.append(d)
    except OSError as exc:
        assert exc.errno == 13, (d, exc)
print(json.dumps({"opened": opened, "listed": listed}))
"""


def test_another_account_reads_no_key_and_no_phi_file(installation, bin_dir):
    s, _ = installation
    home = Path(s.home)
    files = sorted(p for p in home.rglob("*") if p.is_file() and not p.is_symlink() and not _public(s, p))
    folders = sorted(p for p in [home, *home.rglob("*")] if p.is_dir() and not _public(s, p))
    names = {str(p.relative_to(home)) for p in files}
    for needed in ("secrets/warehouse.key", "secrets/ca.key", "secrets/service.key", "secrets/audit.mac.key",
                   "secrets/landing.keyring.json", "secrets/accounts.sqlite", "warehouse/clinical.duckdb",
                   "audit/audit.log", "broker/passwd", "run/service.log"):
        assert needed in names, f"{needed} was not written: the probe would prove nothing"
    assert any(n.startswith("warehouse/serving/clinical-") for n in names), "no serving snapshot"
    assert any(n.startswith("landing/sealed/") and n.endswith(".seg") for n in names), "no landing segment"

    probe = _as_other([str(bin_dir / "python"), "-c", PROBE, json.dumps([str(p) for p in files]),
                       json.dumps([str(p) for p in folders])])
    assert probe.returncode == 0, probe.stderr
    assert json.loads(probe.stdout) == {"opened": [], "listed": []}
    # What clients need is public: the CA certificate that signs the service.
    public = _as_other(["cat", str(s.ca_cert)])
    assert public.returncode == 0 and "BEGIN CERTIFICATE" in public.stdout, public.stderr


def test_rpm_clinician_without_a_session_is_refused_and_as_alone_reads_nothing(installation, bin_dir):
    s, _ = installation
    config = Path(s.home).parent / "other-config"  # the other account's own config folder: no session in it
    config.mkdir()
    shutil.chown(config, OTHER)
    audit = Path(s.home) / "audit" / "audit.log"
    before = audit.read_bytes()
    env = ["env", f"RPM_HOME={s.home}", f"RPM_SERVICE_PORT={s.service_port}", f"XDG_CONFIG_HOME={config}"]
    for args in (["clinician", "patients"], ["clinician", "--as", "dr-x", "patients"],
                 ["clinician", "--as", "dr-x", "patient", "pt-0001", "--json"]):
        proc = _as_other([*env, str(bin_dir / "rpm"), *args])
        assert proc.returncode == 4, (args, proc.stdout, proc.stderr)
        assert "run rpm login" in proc.stdout + proc.stderr, (args, proc.stdout, proc.stderr)
        assert "pt-0001" not in proc.stdout
    # The commands that read the state itself are refused outright: the state is not this account's.
    for args in (["patients", "list"], ["accounting"]):
        proc = _as_other([*env, str(bin_dir / "rpm"), *args])
        assert proc.returncode == 2 and "not to this account" in proc.stderr, (args, proc.stderr)
    assert audit.read_bytes() == before  # nothing was read, so nothing was audited
    assert list(config.iterdir()) == []


HEALTH = """
import ssl, sys, urllib.request
context = ssl.create_default_context(cafile=sys.argv[1])
with urllib.request.urlopen(sys.argv[2], context=context, timeout=10) as r:
    print(r.status, r.read().decode())
"""


def test_the_service_answers_every_account_over_https_after_the_drop(installation, bin_dir):
    s, _ = installation
    proc = _as_other([str(bin_dir / "python"), "-c", HEALTH, str(s.ca_cert),
                      f"https://localhost:{s.service_port}/healthz"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("200 ")


def test_root_state_is_handed_over_and_an_unreachable_state_stays_root_with_a_warning(bin_dir):
    account = pwd.getpwnam(ACCOUNT)
    base = Path(tempfile.mkdtemp(prefix="rpm-svc-"))
    try:
        os.chmod(base, 0o755)
        # State made by root (RPM_RUN_AS=root), with a file another account could read: handed over, private.
        s = _settings(base / "open", run_as="root")
        (base / "open").mkdir()
        os.chmod(base / "open", 0o755)  # whatever the umask
        run(bin_dir, s, "init")
        stray = Path(s.warehouse_dir) / "export.csv"
        stray.write_text("pt-0001\n")
        os.chmod(stray, 0o644)
        assert Path(s.home).stat().st_uid == 0
        s = s.replace(run_as=ACCOUNT)
        proc = run(bin_dir, s, "status")
        assert proc.stderr == ""
        for path in [Path(s.home), *Path(s.home).rglob("*")]:
            assert path.lstat().st_uid == account.pw_uid, path
        assert stat.S_IMODE(stray.stat().st_mode) == 0o600
        assert stat.S_IMODE(Path(s.secrets_dir).stat().st_mode) == 0o700

        # A state folder the account cannot reach: the command still works, as root, and says why once.
        hidden = base / "private"
        hidden.mkdir(mode=0o700)
        s = _settings(hidden, run_as=ACCOUNT)
        proc = run(bin_dir, s, "init")
        [warning] = proc.stderr.splitlines()
        assert warning.startswith("warning: running as root:") and str(hidden) in warning, warning
        assert Path(s.home).stat().st_uid == 0
        assert (Path(s.secrets_dir) / "warehouse.key").exists()
    finally:
        shutil.rmtree(base, ignore_errors=True)
