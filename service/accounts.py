"""Accounts and sessions of the clinician service: who may read PHI, proven by a password and (for admins,
optionally for clinicians) a TOTP code.

One SQLite file in the secrets folder (0600, owned by the service account) holds:

* ``users``: argon2id password hashes (argon2-cffi's defaults: 64 MiB, 3 passes), the TOTP secret sealed
  with the ``accounts`` keyring (AES-GCM bound to the user name), the role, the registry clinician id of a
  clinician account, failure count and lock;
* ``sessions``: the SHA-256 of each session token (a stolen database yields no usable token), its CSRF token
  for the dashboard's forms, and when it was last used — a session is over after ``session_idle_minutes``
  without a request.

A login that fails ``login_max_failures`` times in a row locks the account for ``login_lockout_minutes``;
while locked even the right password is refused, and the caller cannot tell a locked account from a wrong
password or an unknown name (no user enumeration). A TOTP code is accepted once (replay refused).

Concurrency: the file is in WAL mode (a read never waits for a write) and no write transaction ever holds
the argon2 work — a login reads the account, verifies the password with no lock held, then records the
outcome in a short transaction that re-reads the account (so the failure count stays exact under
concurrent attempts). At most ``VERIFY_SLOTS`` verifications run at once (each takes 64 MiB and a core for
a few hundred ms): a flood of logins cannot starve the CPU, the memory or the sessions of people at work.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pyotp
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from core.ids import check_id
from core.keyring import Keyring
from core.settings import Settings

ROLES = ("clinician", "admin", "auditor")
MIN_PASSWORD_LENGTH = 12   # NIST SP 800-63B: at least 8, and a verifier may ask for more; a phrase fits
MAX_PASSWORD_LENGTH = 256  # argon2 takes any length, but an unbounded one is a denial-of-service lever
TOTP_ISSUER = "rpm-pipeline"
BUSY_TIMEOUT_S = 10.0      # a write waits this long for another one; every write transaction here is short
TOUCH_EVERY_S = 5.0        # a session's last use is written at most this often (minutes count, not requests)
VERIFY_SLOTS = max(2, os.cpu_count() or 2)   # argon2 verifications at once
VERIFY_WAIT_S = 10.0       # a login waits this long for a slot, then is answered "busy, try again"
UNKNOWN_ACCOUNT = "unknown-account"  # the audit actor of a login under a name that is no account

log = logging.getLogger("rpm.service")

_HASHER = PasswordHasher()
# Verified against when the user does not exist, so both paths cost one argon2 verification (no timing oracle).
_DUMMY_HASH = _HASHER.hash(secrets.token_urlsafe(16))

SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    username        TEXT PRIMARY KEY,
    role            TEXT NOT NULL CHECK (role IN ('clinician', 'admin', 'auditor')),
    clinician_id    TEXT,
    password_hash   TEXT NOT NULL,
    totp_sealed     BLOB,
    totp_last_step  INTEGER NOT NULL DEFAULT 0,
    disabled        INTEGER NOT NULL DEFAULT 0,
    failures        INTEGER NOT NULL DEFAULT 0,
    locked_until    REAL NOT NULL DEFAULT 0,
    created_at      TEXT NOT NULL,
    password_set_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS sessions (
    token_sha256 TEXT PRIMARY KEY,
    username     TEXT NOT NULL REFERENCES users(username),
    kind         TEXT NOT NULL CHECK (kind IN ('api', 'web')),
    csrf         TEXT NOT NULL,
    created_at   REAL NOT NULL,
    last_seen    REAL NOT NULL
);
"""


class AccountError(ValueError):
    """A request about accounts that cannot be done (unknown user, weak password, …): the message says why."""


class LoginFailed(PermissionError):
    """Wrong name, password or code, or a locked or disabled account — deliberately one message for all."""

    def __init__(self, reason: str, username: str):
        super().__init__("invalid username, password or code (or the account is locked)")
        self.reason = reason          # for the audit log only, never shown to the caller
        self.username = username


class LoginBusy(RuntimeError):
    """Too many logins at once: no slot for the password check within ``VERIFY_WAIT_S`` (nothing counted)."""

    def __init__(self) -> None:
        super().__init__("too many logins at once: try again in a few seconds")


class TotpRequired(LoginFailed):
    """Password right, but this account needs a TOTP code and none was given."""

    def __init__(self, username: str):
        PermissionError.__init__(self, "this account needs a TOTP code from its authenticator app")
        self.reason = "totp required"
        self.username = username


@dataclass(frozen=True)
class User:
    username: str
    role: str
    clinician_id: str | None
    totp: bool
    disabled: bool
    locked: bool
    created_at: str

    def as_dict(self) -> dict:
        return {"username": self.username, "role": self.role, "clinician_id": self.clinician_id,
                "totp": self.totp, "disabled": self.disabled, "locked": self.locked,
                "created_at": self.created_at}


@dataclass(frozen=True)
class Session:
    username: str
    role: str
    clinician_id: str | None
    kind: str
    csrf: str
    expires_at: float

    @property
    def actor(self) -> str:
        """Who the audit log names: the account (a clinician's account id is its registry clinician id)."""
        return self.username


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def check_password(password: str) -> str:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise AccountError(f"a password needs at least {MIN_PASSWORD_LENGTH} characters")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise AccountError(f"a password has at most {MAX_PASSWORD_LENGTH} characters")
    if not password.isprintable():
        raise AccountError("a password may not contain control characters")
    return password


def _refusal(row: sqlite3.Row | None, username: str, now: float) -> LoginFailed | None:
    """Why this account may not log in whatever the password (none, locked, disabled), or None."""
    if row is None:
        return LoginFailed("unknown account", username)
    if row["locked_until"] > now:
        return LoginFailed("account locked", username)
    if row["disabled"]:
        return LoginFailed("account disabled", username)
    return None


class Accounts:
    def __init__(self, s: Settings, now=time.time, *, busy_timeout_s: float = BUSY_TIMEOUT_S,
                 verify_slots: int = VERIFY_SLOTS, verify_wait_s: float = VERIFY_WAIT_S):
        self.s = s
        self.path = Path(s.secrets_dir) / "accounts.sqlite"
        self.now = now
        self.idle_s = s.session_idle_minutes * 60
        self.busy_timeout_s = busy_timeout_s
        self._slots = threading.BoundedSemaphore(verify_slots)
        self.verify_wait_s = verify_wait_s
        self._keyring: Keyring | None = None
        db = self._connect()
        try:
            try:  # persistent: every later connection of any process reads without waiting for a writer
                db.execute("PRAGMA journal_mode = WAL")
            except sqlite3.OperationalError as exc:  # another process holds the file: switched next time
                log.warning("accounts store left in its journal mode for now: %s", exc)
            db.executescript(SCHEMA)
        finally:
            db.close()

    # --- storage ---------------------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not self.path.exists():  # created private: it holds password hashes and sealed TOTP secrets
            self.path.touch(mode=0o600)  # (SQLite gives its -wal and -shm files the same mode)
        db = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None)
        db.row_factory = sqlite3.Row
        return db

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE: a check-and-count is not raced by another writer). Keep it
        short: it holds the file's only write lock."""
        db = self._connect()
        try:
            db.execute("BEGIN IMMEDIATE")
            yield db
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        finally:
            db.close()

    @contextmanager
    def _reader(self) -> Iterator[sqlite3.Connection]:
        """Reads without a write lock (WAL: they neither wait for writers nor hold them up)."""
        db = self._connect()
        try:
            yield db
        finally:
            db.close()

    @property
    def keyring(self) -> Keyring:
        if self._keyring is None:
            self._keyring = Keyring.load(self.s, "accounts")
        return self._keyring

    def _seal_totp(self, username: str, secret: str) -> bytes:
        return self.keyring.seal(secret.encode(), f"totp:{username}".encode())

    def _open_totp(self, username: str, sealed: bytes) -> str:
        if Keyring.key_id_of(sealed) not in self.keyring.keys:  # `rpm keys rotate` ran while we were up
            self._keyring = None
        return self.keyring.open(sealed, f"totp:{username}".encode()).decode()

    def _user(self, row: sqlite3.Row) -> User:
        return User(row["username"], row["role"], row["clinician_id"], row["totp_sealed"] is not None,
                    bool(row["disabled"]), row["locked_until"] > self.now(), row["created_at"])

    def _row(self, db: sqlite3.Connection, username: str) -> sqlite3.Row:
        row = db.execute("SELECT * FROM users WHERE username = ?", [username]).fetchone()
        if row is None:
            raise AccountError(f"no account {username!r}")
        return row

    # --- administration (the CLI, as the service account) -----------------------------------------------
    def rotate_key(self) -> dict:
        """`rpm keys rotate`: a new key seals every TOTP secret, then the old keys are retired (within one
        transaction: an interruption leaves the old keys, which still open everything)."""
        ring = self.keyring
        old = set(ring.keys)
        ring.add_active()
        with self._db() as db:
            rows = db.execute("SELECT username, totp_sealed FROM users WHERE totp_sealed IS NOT NULL").fetchall()
            for username, sealed in rows:
                db.execute("UPDATE users SET totp_sealed = ? WHERE username = ?",
                           [self._seal_totp(username, self._open_totp(username, sealed)), username])
        ring.retire(old)
        return {"secrets": len(rows), "active": ring.active}

    def add(self, username: str, role: str, password: str, *, clinician_id: str | None = None,
            totp: bool = False) -> tuple[User, str | None]:
        """Create an account; returns it and, when it has a second factor, the otpauth:// provisioning URI
        (shown once: the secret is stored sealed)."""
        check_id("account", username)
        if role not in ROLES:
            raise AccountError(f"unknown role {role!r}: one of {', '.join(ROLES)}")
        if role == "clinician" and clinician_id is None:
            raise AccountError("a clinician account is tied to a clinician of the registry")
        if role != "clinician" and clinician_id is not None:
            raise AccountError(f"only a clinician account is tied to a registry clinician, not {role!r}")
        totp = totp or role == "admin"  # administrators always have a second factor
        check_password(password)
        secret = pyotp.random_base32() if totp else None
        with self._db() as db:
            if db.execute("SELECT 1 FROM users WHERE username = ?", [username]).fetchone():
                raise AccountError(f"account {username!r} already exists (rpm users reset-password to change it)")
            db.execute("""INSERT INTO users (username, role, clinician_id, password_hash, totp_sealed,
                                             created_at, password_set_at) VALUES (?, ?, ?, ?, ?, ?, ?)""",
                       [username, role, clinician_id, _HASHER.hash(password),
                        self._seal_totp(username, secret) if secret else None, _now_iso(), _now_iso()])
            user = self._user(self._row(db, username))
        uri = pyotp.TOTP(secret).provisioning_uri(name=username, issuer_name=TOTP_ISSUER) if secret else None
        return user, uri

    def list(self) -> list[User]:
        with self._reader() as db:
            return [self._user(r) for r in db.execute("SELECT * FROM users ORDER BY username")]

    def get(self, username: str) -> User:
        with self._reader() as db:
            return self._user(self._row(db, username))

    def exists(self, username: str) -> bool:
        with self._reader() as db:
            return db.execute("SELECT 1 FROM users WHERE username = ?", [username]).fetchone() is not None

    def name_tag(self, name: str) -> str:
        """A short keyed hash of a name that is no account: an auditor can tell one name retried from many
        names sprayed, without the log holding what was typed (often a password in the wrong field)."""
        ring = self.keyring
        key = hmac.new(ring.keys[ring.active], b"rpm unknown-account name tag", hashlib.sha256).digest()
        return hmac.new(key, name.encode(), hashlib.sha256).hexdigest()[:12]

    def set_disabled(self, username: str, disabled: bool = True) -> User:
        """Disable (or enable) an account; disabling ends its sessions at once."""
        with self._db() as db:
            self._row(db, username)
            db.execute("UPDATE users SET disabled = ? WHERE username = ?", [int(disabled), username])
            if disabled:
                db.execute("DELETE FROM sessions WHERE username = ?", [username])
            return self._user(self._row(db, username))

    def reset_password(self, username: str, password: str, *, new_totp: bool = False) -> str | None:
        """Set a new password, clear the lock and end every session; ``new_totp`` also issues a new second
        factor (returns its provisioning URI)."""
        check_password(password)
        with self._db() as db:
            row = self._row(db, username)
            secret = pyotp.random_base32() if new_totp or (row["role"] == "admin" and not row["totp_sealed"]) \
                else None
            db.execute("""UPDATE users SET password_hash = ?, failures = 0, locked_until = 0, password_set_at = ?
                          WHERE username = ?""", [_HASHER.hash(password), _now_iso(), username])
            if secret:
                db.execute("UPDATE users SET totp_sealed = ?, totp_last_step = 0 WHERE username = ?",
                           [self._seal_totp(username, secret), username])
            db.execute("DELETE FROM sessions WHERE username = ?", [username])
        return pyotp.TOTP(secret).provisioning_uri(name=username, issuer_name=TOTP_ISSUER) if secret else None

    # --- login and sessions (the service) -----------------------------------------------------------------
    def authenticate(self, username: str, password: str, totp: str | None = None) -> User:
        """The account, if the password (and its TOTP code, when it has one) is right and it may log in.
        Raises LoginFailed (one message for every cause) or TotpRequired — after committing the failure
        count, so a refused attempt still counts toward the lock — or LoginBusy (nothing checked)."""
        now = self.now()
        with self._reader() as db:
            row = db.execute("SELECT * FROM users WHERE username = ?", [username]).fetchone()
        # The argon2 work, with no lock on the file: an unknown name costs the same (no timing oracle).
        right = self._verify(row["password_hash"] if row is not None else _DUMMY_HASH, password)
        refused = _refusal(row, username, now)
        if refused is not None:
            raise refused
        if right and row["totp_sealed"] is not None and not totp:
            raise TotpRequired(username)  # not counted: the CLI asks for the code after a right password
        step = self._totp_step(username, row["totp_sealed"], totp, now) if right and totp and \
            row["totp_sealed"] is not None else None
        rehash = _HASHER.hash(password) if right and _HASHER.check_needs_rehash(row["password_hash"]) else None
        with self._db() as db:
            outcome = self._record(db, row, right, step, rehash, now)
        if isinstance(outcome, LoginFailed):
            raise outcome
        return outcome

    def _verify(self, password_hash: str, password: str) -> bool:
        if not self._slots.acquire(timeout=self.verify_wait_s):
            raise LoginBusy()
        try:
            return _verify(password_hash, password)
        finally:
            self._slots.release()

    def _record(self, db: sqlite3.Connection, checked: sqlite3.Row, right: bool, step: int | None,
                rehash: str | None, now: float) -> User | LoginFailed:
        """The outcome of a checked password, against the account as it is now (another login, a lock, a
        reset or a disable may have come in while the password was being verified)."""
        username = checked["username"]
        row = db.execute("SELECT * FROM users WHERE username = ?", [username]).fetchone()
        refused = _refusal(row, username, now)
        if refused is not None:
            return refused
        if (row["password_hash"], row["totp_sealed"]) != (checked["password_hash"], checked["totp_sealed"]):
            return LoginFailed("account changed during the login", username)  # a reset or rotation
        if not right:
            self._failed(db, row, now)
            return LoginFailed("wrong password", username)
        if row["totp_sealed"] is not None:
            if step is None or step <= row["totp_last_step"]:
                self._failed(db, row, now)
                return LoginFailed("wrong or reused TOTP code", username)
            db.execute("UPDATE users SET totp_last_step = ? WHERE username = ?", [step, username])
        db.execute("UPDATE users SET failures = 0, locked_until = 0 WHERE username = ?", [username])
        if rehash is not None:
            db.execute("UPDATE users SET password_hash = ? WHERE username = ?", [rehash, username])
        return self._user(self._row(db, username))

    def _failed(self, db: sqlite3.Connection, row: sqlite3.Row, now: float) -> None:
        failures = row["failures"] + 1
        locked_until = now + self.s.login_lockout_minutes * 60 if failures >= self.s.login_max_failures else 0
        db.execute("UPDATE users SET failures = ?, locked_until = ? WHERE username = ?",
                   [0 if locked_until else failures, locked_until, row["username"]])

    def _totp_step(self, username: str, sealed: bytes, code: str, now: float) -> int | None:
        """The time step a code belongs to (this one or the one either side, for clock drift), or None."""
        totp = pyotp.TOTP(self._open_totp(username, sealed))
        code = code.strip().replace(" ", "")
        for offset in (0, -1, 1):
            at = now + offset * totp.interval
            if secrets.compare_digest(totp.at(at).encode(), code.encode()):
                return int(at // totp.interval)
        return None

    def start_session(self, user: User, kind: str) -> tuple[str, Session]:
        """A new session for an authenticated user: (the token — shown once, stored only hashed — , session)."""
        token = secrets.token_urlsafe(32)
        now = self.now()
        with self._db() as db:
            # Sessions idle past their limit are gone for good (not only refused).
            db.execute("DELETE FROM sessions WHERE last_seen < ?", [now - self.idle_s])
            csrf = secrets.token_urlsafe(32)
            db.execute("""INSERT INTO sessions (token_sha256, username, kind, csrf, created_at, last_seen)
                          VALUES (?, ?, ?, ?, ?, ?)""", [_token_hash(token), user.username, kind, csrf, now, now])
        return token, Session(user.username, user.role, user.clinician_id, kind, csrf, now + self.idle_s)

    def session(self, token: str, kind: str, touch: bool = True) -> Session | None:
        """The live session of a token (and its use now counts as activity), or None: unknown, of the other
        kind, idle too long, or its account disabled since. Never fails for a busy file: the lookup is a
        read, and a touch that cannot be written now is skipped (the next request writes it)."""
        if not token or len(token) > 200:
            return None
        now = self.now()
        digest = _token_hash(token)
        with self._reader() as db:
            row = db.execute("""SELECT s.*, u.role, u.clinician_id, u.disabled FROM sessions s
                                JOIN users u USING (username) WHERE token_sha256 = ?""", [digest]).fetchone()
        if row is None or row["kind"] != kind:
            return None
        if row["disabled"] or row["last_seen"] < now - self.idle_s:
            self._quietly("DELETE FROM sessions WHERE token_sha256 = ?", [digest])
            return None
        last = row["last_seen"]
        # Only a session still live is touched (logout, disable or expiry in between win).
        if touch and now - last >= TOUCH_EVERY_S and self._quietly(
                "UPDATE sessions SET last_seen = ? WHERE token_sha256 = ? AND last_seen >= ?",
                [now, digest, now - self.idle_s]):
            last = now
        return Session(row["username"], row["role"], row["clinician_id"], row["kind"], row["csrf"],
                       last + self.idle_s)

    def _quietly(self, sql: str, params: Sequence[object]) -> bool:
        """One short write that may be skipped when the file stays busy past the timeout (True: written)."""
        try:
            with self._db() as db:
                return db.execute(sql, params).rowcount > 0
        except sqlite3.OperationalError as exc:
            log.warning("accounts store busy, session bookkeeping skipped: %s", exc)
            return False

    def end_session(self, token: str) -> bool:
        with self._db() as db:
            return db.execute("DELETE FROM sessions WHERE token_sha256 = ?", [_token_hash(token)]).rowcount > 0


def _verify(password_hash: str, password: str) -> bool:
    try:
        return _HASHER.verify(password_hash, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False
