"""Accounts of the clinician service: passwords, second factor, lockout, sessions — on a controlled clock."""

from __future__ import annotations

import itertools
import os
import sqlite3
import stat
import threading
import time
from collections import Counter

import pyotp
import pytest

from core.settings import Settings
from service.accounts import AccountError, Accounts, LoginFailed, TotpRequired

PASSWORD = "correct horse battery staple"


class Clock:
    def __init__(self, t: float = 1_800_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def accounts(tmp_path, clock) -> Accounts:
    s = Settings.from_env({}, home=tmp_path / "var", session_idle_minutes=15, login_max_failures=5,
                          login_lockout_minutes=15)
    return Accounts(s, now=clock)


def code(uri: str, at: float) -> str:
    return pyotp.parse_uri(uri).at(at)  # type: ignore[union-attr]


def test_a_clinician_logs_in_with_the_right_password_only(accounts):
    accounts.add("dr-lee", "clinician", PASSWORD, clinician_id="dr-lee")
    assert accounts.authenticate("dr-lee", PASSWORD).clinician_id == "dr-lee"
    with pytest.raises(LoginFailed) as wrong:
        accounts.authenticate("dr-lee", PASSWORD + "x")
    with pytest.raises(LoginFailed) as unknown:
        accounts.authenticate("dr-nobody", PASSWORD)
    # One message whatever the cause: a caller cannot tell an unknown name from a wrong password.
    assert str(wrong.value) == str(unknown.value)
    assert (wrong.value.reason, unknown.value.reason) == ("wrong password", "unknown account")


@pytest.mark.parametrize(("role", "clinician_id", "password", "says"), [
    ("clinician", None, PASSWORD, "tied to a clinician"),
    ("admin", "dr-lee", PASSWORD, "only a clinician account"),
    ("superuser", None, PASSWORD, "unknown role"),
    ("auditor", None, "short", "at least 12"),
    ("auditor", None, PASSWORD + "\n", "control characters"),
])
def test_bad_accounts_are_refused_with_the_reason(accounts, role, clinician_id, password, says):
    with pytest.raises(AccountError, match=says):
        accounts.add("someone", role, password, clinician_id=clinician_id)
    assert accounts.list() == []


def test_an_account_name_is_an_id_and_unique(accounts):
    with pytest.raises(ValueError, match="account id"):
        accounts.add("../root", "auditor", PASSWORD)
    accounts.add("audit-1", "auditor", PASSWORD)
    with pytest.raises(AccountError, match="already exists"):
        accounts.add("audit-1", "auditor", PASSWORD)


def test_an_admin_always_has_a_second_factor_and_codes_are_single_use(accounts, clock):
    user, uri = accounts.add("root-admin", "admin", PASSWORD)
    assert user.totp and uri and uri.startswith("otpauth://totp/")
    with pytest.raises(TotpRequired):
        accounts.authenticate("root-admin", PASSWORD)
    with pytest.raises(LoginFailed):
        accounts.authenticate("root-admin", PASSWORD, "000000" if code(uri, clock.t) != "000000" else "111111")
    assert accounts.authenticate("root-admin", PASSWORD, code(uri, clock.t)).role == "admin"
    with pytest.raises(LoginFailed, match="invalid") as replay:  # the same code again: replayed
        accounts.authenticate("root-admin", PASSWORD, code(uri, clock.t))
    assert replay.value.reason == "wrong or reused TOTP code"
    clock.t += 30
    assert accounts.authenticate("root-admin", PASSWORD, code(uri, clock.t))
    clock.t += 60  # a phone whose clock is one step behind still works
    assert accounts.authenticate("root-admin", PASSWORD, code(uri, clock.t - 30))
    with pytest.raises(LoginFailed):  # full-width digits: a wrong code, not a crash
        accounts.authenticate("root-admin", PASSWORD, "\uff11\uff12\uff13\uff14\uff15\uff16")


def test_repeated_failures_lock_the_account_even_against_the_right_password(accounts, clock):
    accounts.add("dr-lee", "clinician", PASSWORD, clinician_id="dr-lee")
    for _ in range(5):
        with pytest.raises(LoginFailed):
            accounts.authenticate("dr-lee", "guess-" + str(clock.t))
    assert accounts.get("dr-lee").locked
    with pytest.raises(LoginFailed) as locked:
        accounts.authenticate("dr-lee", PASSWORD)
    assert locked.value.reason == "account locked"
    clock.t += 15 * 60 + 1
    assert accounts.authenticate("dr-lee", PASSWORD)
    # A success resets the count: four more failures do not lock it.
    for _ in range(4):
        with pytest.raises(LoginFailed):
            accounts.authenticate("dr-lee", "nope-nope-nope")
    assert accounts.authenticate("dr-lee", PASSWORD)


def test_a_reset_password_clears_the_lock_and_ends_sessions(accounts):
    user, _ = accounts.add("dr-lee", "clinician", PASSWORD, clinician_id="dr-lee")
    token, _ = accounts.start_session(user, "api")
    for _ in range(5):
        with pytest.raises(LoginFailed):
            accounts.authenticate("dr-lee", "wrong password!")
    accounts.reset_password("dr-lee", "another long passphrase")
    assert accounts.session(token, "api") is None
    assert accounts.authenticate("dr-lee", "another long passphrase")
    with pytest.raises(LoginFailed):
        accounts.authenticate("dr-lee", PASSWORD)


def test_sessions_end_after_the_idle_limit_and_activity_extends_them(accounts, clock):
    user, _ = accounts.add("dr-lee", "clinician", PASSWORD, clinician_id="dr-lee")
    token, session = accounts.start_session(user, "web")
    assert session.expires_at == clock.t + 15 * 60
    clock.t += 14 * 60
    assert accounts.session(token, "web") is not None  # used: the 15 minutes start again
    clock.t += 14 * 60
    assert accounts.session(token, "web").username == "dr-lee"  # type: ignore[union-attr]
    clock.t += 15 * 60 + 1
    assert accounts.session(token, "web") is None
    clock.t -= 60  # and it stays gone: expiry deleted it
    assert accounts.session(token, "web") is None


def test_a_token_works_only_for_its_kind_and_until_logout_or_disable(accounts):
    user, _ = accounts.add("dr-lee", "clinician", PASSWORD, clinician_id="dr-lee")
    api_token, _ = accounts.start_session(user, "api")
    web_token, _ = accounts.start_session(user, "web")
    assert accounts.session(api_token, "web") is None  # a bearer token is no cookie, and vice versa
    assert accounts.session(web_token, "api") is None
    assert accounts.end_session(api_token) and accounts.session(api_token, "api") is None
    accounts.set_disabled("dr-lee")
    assert accounts.session(web_token, "web") is None
    with pytest.raises(LoginFailed) as disabled:
        accounts.authenticate("dr-lee", PASSWORD)
    assert disabled.value.reason == "account disabled"


def test_the_store_is_private_and_holds_no_usable_secret(accounts, clock):
    user, uri = accounts.add("root-admin", "admin", PASSWORD)
    token, _ = accounts.start_session(user, "api")
    files = sorted(accounts.path.parent.glob("accounts.sqlite*"))  # the database and, in WAL mode, its log
    data = b"".join(f.read_bytes() for f in files)
    secret = pyotp.parse_uri(uri).secret  # type: ignore[union-attr]
    assert PASSWORD.encode() not in data and token.encode() not in data and secret.encode() not in data
    assert {f.name: stat.S_IMODE(os.stat(f).st_mode) for f in files} == {f.name: 0o600 for f in files}
    assert accounts.session(token, "api").role == "admin"  # type: ignore[union-attr]


def test_key_rotation_reseals_every_second_factor_and_a_running_service_follows(accounts, clock):
    """`rpm keys rotate` re-seals the TOTP secrets under a new key and retires the old one; the service's
    Accounts, loaded before the rotation, still checks codes (it reloads the keyring)."""
    _, uri = accounts.add("ops-admin", "admin", PASSWORD)
    rotating = Accounts(accounts.s, now=clock)  # the CLI's own instance, while the service keeps `accounts`
    old = set(rotating.keyring.keys)
    done = rotating.rotate_key()
    assert done["secrets"] == 1 and done["active"] not in old
    assert set(Accounts(accounts.s).keyring.keys) == {done["active"]}  # the old key is gone from the file
    assert accounts.authenticate("ops-admin", PASSWORD, code(uri, clock.t)).role == "admin"


def _settings(tmp_path, **overrides) -> Settings:
    return Settings.from_env({}, home=tmp_path / "var", **{"session_idle_minutes": 15, "login_max_failures": 5,
                                                            "login_lockout_minutes": 15, **overrides})


def _attempts(accounts: Accounts, logins: list[tuple[str, str]],
              threads: int) -> tuple[list[str], list[threading.Thread]]:
    """Each (name, password) tried once, ``threads`` at a time (started, not awaited): the list the outcome of
    each lands in (LoginFailed's reason), and the threads."""
    outcomes: list[str] = []
    todo = iter(logins)
    lock = threading.Lock()

    def work() -> None:
        while True:
            with lock:
                login = next(todo, None)
            if login is None:
                return
            try:
                accounts.authenticate(*login)
                outcome = "ok"
            except LoginFailed as exc:
                outcome = exc.reason
            except Exception as exc:  # any other failure, reported by its type
                outcome = f"error: {type(exc).__name__}: {exc}"
            with lock:
                outcomes.append(outcome)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for w in workers:
        w.start()
    return outcomes, workers


def test_a_flood_of_failed_logins_does_not_stall_sessions_and_every_failure_counts_once(tmp_path):
    """Hostile review F3: anonymous logins (unknown names) and wrong passwords from many threads, while a
    logged-in clinician keeps working. The password check holds no lock on the file, so every one of the
    clinician's requests is answered (none waits out the busy timeout), and each wrong password is counted
    exactly once."""
    ticks = itertools.count()
    accounts = Accounts(_settings(tmp_path, login_max_failures=100),
                        now=lambda: 1_800_000_000.0 + next(ticks),  # a second per call: every lookup touches
                        # the flood's own writes may queue on a loaded machine; the clinician's reads must not
                        busy_timeout_s=10.0, verify_wait_s=120)
    user, _ = accounts.add("dr-lee", "clinician", PASSWORD, clinician_id="dr-lee")
    token, _ = accounts.start_session(user, "api")
    logins = [("ghost", "xxxxxxxxxxxx"), ("dr-lee", "not the password")] * 12
    outcomes, workers = _attempts(accounts, logins, threads=12)
    answered, slowest = 0, 0.0
    while any(w.is_alive() for w in workers):
        started = time.monotonic()
        assert accounts.session(token, "api") is not None
        slowest = max(slowest, time.monotonic() - started)
        answered += 1
    for w in workers:
        w.join()
    assert Counter(outcomes) == {"unknown account": 12, "wrong password": 12}
    assert answered > 0 and slowest < 2.0
    with sqlite3.connect(accounts.path) as db:
        assert db.execute("SELECT failures FROM users WHERE username = 'dr-lee'").fetchone() == (12,)


def test_concurrent_wrong_passwords_lock_the_account_after_exactly_the_limit(tmp_path, clock):
    accounts = Accounts(_settings(tmp_path), now=clock, verify_wait_s=120)
    accounts.add("dr-lee", "clinician", PASSWORD, clinician_id="dr-lee")
    outcomes, workers = _attempts(accounts, [("dr-lee", f"guess number {i}") for i in range(8)], threads=8)
    for w in workers:
        w.join()
    # Five failures lock it; the attempts checked meanwhile find it locked and are not counted.
    assert Counter(outcomes) == {"wrong password": 5, "account locked": 3}
    assert accounts.get("dr-lee").locked


def test_a_session_lookup_is_answered_while_another_process_holds_the_write_lock(tmp_path, clock):
    """A busy file (another writer past the busy timeout) skips the session's touch instead of failing."""
    accounts = Accounts(_settings(tmp_path), now=clock, busy_timeout_s=0.2)
    user, _ = accounts.add("dr-lee", "clinician", PASSWORD, clinician_id="dr-lee")
    token, _ = accounts.start_session(user, "web")
    clock.t += 60
    other = sqlite3.connect(accounts.path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        session = accounts.session(token, "web")
        assert session is not None and session.username == "dr-lee"
        other.execute("ROLLBACK")
    finally:
        other.close()
    assert accounts.session(token, "web").expires_at == clock.t + 15 * 60  # type: ignore[union-attr]
