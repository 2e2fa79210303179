"""Accounts of the clinician service: passwords, second factor, lockout, sessions — on a controlled clock."""

from __future__ import annotations

import os
import stat

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
    data = accounts.path.read_bytes()
    secret = pyotp.parse_uri(uri).secret  # type: ignore[union-attr]
    assert PASSWORD.encode() not in data and token.encode() not in data and secret.encode() not in data
    assert stat.S_IMODE(os.stat(accounts.path).st_mode) == 0o600
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
