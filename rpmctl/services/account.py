"""The service account: started as root, rpm does its work as an unprivileged account that owns the state.

When root runs a command that touches the state folder, the state is handed to ``RPM_RUN_AS`` (created at
setup like Mosquitto's account: a system account with no login shell) and the process gives up root before
it does anything else. Every file written afterwards — keys, the warehouse and its snapshots, landing
segments, the audit log, the accounts database, logs — and every service it starts (broker, ingest, the
clinician service, Airflow) then belong to that account, so another local account reads no key and no PHI.

Modes: the state folder is 0711 (anyone may reach ``pki/``, whose public certificates clients verify the
service with, and list nothing), ``pki/`` 0755 with its certificates 0644; every other folder 0700 and every
other file 0600.

The broker runs as the service account too: the commands and the daily DAG that change its logins or rotate
its log signal it (SIGHUP), which the kernel allows only between processes of one account.
"""

from __future__ import annotations

import errno
import grp
import os
import pwd
import shutil
import stat
import subprocess
import sys
import sysconfig
from pathlib import Path

from core.identity import remember_caller
from core.settings import INSIDE_HOME, Settings
from rpmctl.errors import UserError

NOLOGIN = "/usr/sbin/nologin"
PUBLIC_DIR_MODE, PUBLIC_FILE_MODE, HOME_MODE = 0o755, 0o644, 0o711


def wanted(s: Settings) -> bool:
    """Root, told to run as another account."""
    return os.geteuid() == 0 and s.run_as != "root"


def ensure_account(name: str) -> pwd.struct_passwd:
    """The system account ``name``, created when missing (idempotent; needs root)."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    useradd = shutil.which("useradd") or "/usr/sbin/useradd"
    done = subprocess.run([useradd, "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
                           "--shell", NOLOGIN if Path(NOLOGIN).exists() else "/bin/false", name],
                          capture_output=True, text=True)
    if done.returncode != 0 and done.returncode != 9:  # 9: created meanwhile by a concurrent command
        raise UserError(f"cannot create the service account {name!r} (RPM_RUN_AS): "
                        f"{done.stderr.strip() or f'useradd exited {done.returncode}'}")
    return pwd.getpwnam(name)


def _may(st: os.stat_result, account: pwd.struct_passwd, groups: set[int], bits: int) -> bool:
    """Whether the mode lets ``account`` do ``bits`` (a combination of 4, 2, 1) to a file with this stat."""
    if st.st_uid == account.pw_uid:
        shift = 6
    elif st.st_gid in groups:
        shift = 3
    else:
        shift = 0
    return (st.st_mode >> shift) & bits == bits


def _reaches(path: Path, account: pwd.struct_passwd, groups: set[int], bits: int) -> bool:
    """Whether ``account`` can traverse every folder down to ``path`` and do ``bits`` to it (mode bits only)."""
    try:
        path = path.resolve()
        for folder in reversed(path.parents):
            if not _may(folder.stat(), account, groups, 1):
                return False
        return _may(path.stat(), account, groups, bits)
    except FileNotFoundError:
        return True  # nothing there yet: created later, by the account itself or as the state's parent
    except OSError:
        return False


def unreachable(s: Settings, account: pwd.struct_passwd) -> str | None:
    """What keeps the account from running rpm, if anything: the interpreter, its libraries or this code
    (an install in a private home), or a folder above the state that it cannot traverse."""
    import rpmctl
    from rpmctl.services.airflow_run import dags_folder

    groups = {account.pw_gid, *(g.gr_gid for g in grp.getgrall() if account.pw_name in g.gr_mem)}
    paths = sysconfig.get_paths()
    code = [Path(os.path.realpath(sys.executable)),
            *(Path(paths[k]) for k in ("stdlib", "platstdlib", "purelib", "platlib")),
            Path(rpmctl.__file__).parent, dags_folder()]
    for path in code:
        if not _reaches(path, account, groups, 5):
            return f"cannot read {path}: install rpm where other accounts can read it"
    for folder in _roots(s):
        if not _reaches(folder.parent, account, groups, 1):
            return f"cannot traverse {folder.parent} to reach {folder}: chmod o+x it"
    return None


def _roots(s: Settings) -> list[Path]:
    """The state folder and the configured folders outside it (e.g. RPM_LANDING_DIR on another disk)."""
    home = Path(s.home)
    roots = [home]
    for name in INSIDE_HOME:
        folder = Path(getattr(s, name))
        if not any(folder == r or r in folder.parents for r in roots):
            roots.append(folder)
    return roots


def _owned_elsewhere(s: Settings, account: pwd.struct_passwd) -> bool:
    """Whether some part of the state belongs to another account (checked on the folders and the keys, not
    on every segment: cheap enough for every command)."""
    checked = [*_roots(s), *(Path(getattr(s, n)) for n in INSIDE_HOME), Path(s.home) / "audit"]
    for folder in list(checked):
        if folder.is_dir() and folder in (Path(s.secrets_dir), Path(s.home), Path(s.pki_dir)):
            checked.extend(folder.iterdir())
    for path in checked:
        try:
            if path.lstat().st_uid != account.pw_uid:
                return True
        except FileNotFoundError:
            continue
    return False


def _running_elsewhere(s: Settings, account: pwd.struct_passwd) -> list[str]:
    """Services of this state (by their pid files) that run as another account: once the state is handed
    over, the service account could neither stop nor signal them."""
    import psutil

    out = []
    for pid_file in sorted(Path(s.run_dir).glob("*.pid")):
        try:
            proc = psutil.Process(int(pid_file.read_text().strip()))
            if proc.status() != psutil.STATUS_ZOMBIE and proc.uids().real != account.pw_uid:
                out.append(f"{pid_file.stem} (pid {proc.pid})")
        except (OSError, ValueError, psutil.Error):
            continue
    return out


def make_roots(s: Settings) -> None:
    """Create the state folder (and configured folders outside it) as root, whose parents may be root's; a
    missing parent is made 0755, so the service account can reach what it will own."""
    for folder in _roots(s):
        for parent in reversed(folder.parents):
            if not parent.exists():
                parent.mkdir()
                os.chmod(parent, 0o755)
        folder.mkdir(exist_ok=True, mode=0o700)


def hand_over(s: Settings, account: pwd.struct_passwd) -> None:
    """Give the state to ``account`` with its modes (a no-op once it owns it)."""
    roots = _roots(s)
    if not _owned_elsewhere(s, account):
        return
    running = _running_elsewhere(s, account)
    if running:
        raise UserError(f"{', '.join(running)} run as another account than {account.pw_name} (RPM_RUN_AS): stop "
                        "them first with `RPM_RUN_AS=root rpm down`, then start again")
    for top in roots:
        if top.is_dir():
            _give_tree(s, top, account)


def _mode(s: Settings, path: Path, st: os.stat_result) -> int:
    if path == Path(s.home):
        return HOME_MODE
    if path == Path(s.pki_dir):
        return PUBLIC_DIR_MODE
    if path.parent == Path(s.pki_dir) and path.suffix == ".crt":
        return PUBLIC_FILE_MODE
    return 0o700 if stat.S_ISDIR(st.st_mode) else (stat.S_IMODE(st.st_mode) & 0o100) | 0o600


def _give_tree(s: Settings, top: Path, account: pwd.struct_passwd) -> None:
    """chown -R and the modes, by file descriptor, never through a symlink: the account may already control
    parts of the tree, and must not be able to redirect root's chown or chmod elsewhere by swapping one."""
    def give(fd: int, path: Path) -> None:
        os.fchown(fd, account.pw_uid, account.pw_gid)
        os.fchmod(fd, _mode(s, path, os.fstat(fd)))

    for folder, folders, files, dir_fd in os.fwalk(top, follow_symlinks=False):
        give(dir_fd, Path(folder))
        for name in folders:  # visited in turn, except a symlink to a folder: itself only
            if stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
                os.chown(name, account.pw_uid, account.pw_gid, dir_fd=dir_fd, follow_symlinks=False)
        for name in files:
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY, dir_fd=dir_fd)
            except OSError as exc:
                if exc.errno == errno.ELOOP:  # a symlink: itself only
                    os.chown(name, account.pw_uid, account.pw_gid, dir_fd=dir_fd, follow_symlinks=False)
                continue  # a socket, or gone meanwhile
            try:
                give(fd, Path(folder) / name)
            finally:
                os.close(fd)


def become(s: Settings, account: pwd.struct_passwd) -> None:
    """Give up root for good (groups, group, user: in that order, while allowed). The environment follows, as
    `runuser` sets it; HOME is the state folder when the account has no home of its own, and the caller's
    XDG folders (root's, out of reach now) are forgotten."""
    remember_caller()  # audit records keep naming the operator who ran the command
    os.initgroups(account.pw_name, account.pw_gid)
    os.setgid(account.pw_gid)
    os.setuid(account.pw_uid)
    home = Path(account.pw_dir)
    own_home = home.is_dir() and home.stat().st_uid == account.pw_uid
    for name in [n for n in os.environ if n.startswith("XDG_")]:
        del os.environ[name]
    os.environ.update(HOME=str(home if own_home else s.home), USER=account.pw_name, LOGNAME=account.pw_name)


def run_as_service_account(s: Settings, setup: bool) -> str | None:
    """Hand the state over and become the service account, when started as root. ``setup``: a command that
    may create the state (and the account). Returns a warning when it must stay root instead: no account
    (and not a setup command), or one that cannot reach the interpreter, the code or the state folder."""
    if not wanted(s):
        return None
    if setup:
        account = ensure_account(s.run_as)
        make_roots(s)
    else:
        try:
            account = pwd.getpwnam(s.run_as)
        except KeyError:
            return (f"running as root: the service account {s.run_as!r} (RPM_RUN_AS) does not exist; "
                    "rpm init or make system creates it")
    blocked = unreachable(s, account)
    if blocked:
        return f"running as root: the service account {account.pw_name!r} (RPM_RUN_AS) {blocked} (or set RPM_RUN_AS=root)"
    hand_over(s, account)
    become(s, account)
    return None
