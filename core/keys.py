"""Local secrets, generated at setup into git-ignored folders: warehouse key, service logins, a local CA.

Keys live in ``secrets_dir`` (mode 0700), never inside the warehouse or landing folders, never in a database
and never in a log line. Generating is idempotent: existing secrets are kept.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import ipaddress
import os
import secrets
import socket
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from core.settings import Settings

# Mosquitto 2's password file format "$7$": PBKDF2-HMAC-SHA512, 101 iterations, 12-byte salt.
MOSQUITTO_PBKDF2_ITERATIONS = 101


class ExposedSecret(PermissionError):
    """A key or secret file someone else could have read or planted: refused rather than used."""


def write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Atomically write a secret readable by its owner only (never through a planted file or symlink)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)  # a stale temp file (a crash) or a planted link: removed, never written through
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def read_secret(path: Path) -> str:
    """A secret file's text, if only this account could have read or written it: owned by us, mode 0600 or
    narrower, not a symlink. Anything else raises ExposedSecret naming the file (a key another account can
    read is compromised: fix its mode and rotate)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ExposedSecret(f"{path} is a symlink: refusing to read a secret through it") from None
        raise
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if st.st_uid != os.geteuid():
            raise ExposedSecret(f"{path} belongs to uid {st.st_uid}, not to this account: refusing to use it")
        if st.st_mode & 0o077:
            raise ExposedSecret(f"{path} is readable or writable by others (mode {stat.S_IMODE(st.st_mode):04o}): "
                                "run chmod 600 on it, then rotate the key (rpm keys rotate)")
        return f.read().decode().strip()


def check_state_folder(s: Settings) -> None:
    """The state folder and its private folders belong to this account, are not symlinks and cannot be
    written by others: otherwise its keys could be planted or swapped, and root would write where another
    user controls. Raises ExposedSecret naming the first problem."""
    me = os.geteuid()
    private = [s.home, s.secrets_dir, s.landing_dir, s.warehouse_dir, s.run_dir, s.home / "audit"]
    for folder in private:
        try:
            st = folder.lstat()
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(st.st_mode) and folder != s.home:
            raise ExposedSecret(f"{folder} is a symlink: the state folder's parts must be real folders")
        st = folder.stat()
        if st.st_uid != me:
            raise ExposedSecret(f"{folder} belongs to uid {st.st_uid}, not to this account (uid {me}): "
                                "run rpm as the account that owns the state, or fix RPM_HOME")
        if st.st_mode & 0o022:
            raise ExposedSecret(f"{folder} can be written by others (mode {stat.S_IMODE(st.st_mode):04o}): "
                                "run chmod go-w on it")


def new_password() -> str:
    return secrets.token_urlsafe(24)


def mosquitto_hash(password: str, salt: bytes | None = None) -> str:
    """A password-file entry Mosquitto 2 verifies (same as `mosquitto_passwd` writes)."""
    salt = salt or secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, MOSQUITTO_PBKDF2_ITERATIONS)
    return f"$7${MOSQUITTO_PBKDF2_ITERATIONS}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def warehouse_key(s: Settings) -> str:
    """The clinical warehouse's encryption key (hex), created on first use."""
    path = s.warehouse_key_file
    if not path.exists():
        Path(s.secrets_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
        write_private(path, secrets.token_hex(32).encode())
    return read_secret(path)


def warehouse_key_file_next(s: Settings) -> Path:
    """Where `rpm keys rotate` stages the new warehouse key until the re-encrypted file is in place."""
    return s.warehouse_key_file.with_name("warehouse.key.next")


def telehealth_key_file(s: Settings) -> Path:
    """The telehealth store's own key: holding the clinical key does not open it, nor the reverse."""
    return Path(s.secrets_dir) / "telehealth.key"


def telehealth_key_file_next(s: Settings) -> Path:
    """Where `rpm keys rotate` stages the telehealth store's new key until the store is rebuilt under it."""
    return telehealth_key_file(s).with_name("telehealth.key.next")


def telehealth_key(s: Settings) -> str:
    """The telehealth store's encryption key (hex), created on first use like the warehouse key."""
    path = telehealth_key_file(s)
    if not path.exists():
        Path(s.secrets_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
        write_private(path, secrets.token_hex(32).encode())
    return read_secret(path)


def service_password(s: Settings, name: str) -> str:
    """Password of an internal broker login (e.g. the ingest service), created on first use."""
    path = Path(s.secrets_dir) / f"{name}.password"
    if not path.exists():
        write_private(path, new_password().encode())
    return read_secret(path)


def ensure_pki(s: Settings) -> tuple[Path, Path, Path]:
    """A local CA and a broker server certificate signed by it: (ca.crt, server.crt, server.key)."""
    secrets_dir = Path(s.secrets_dir)
    pki = Path(s.pki_dir)
    ca_key_path, ca_crt = secrets_dir / "ca.key", pki / "ca.crt"
    srv_key_path, srv_crt = secrets_dir / "server.key", pki / "server.crt"
    if ca_crt.exists() and srv_crt.exists() and srv_key_path.exists():
        return ca_crt, srv_crt, srv_key_path
    pki.mkdir(parents=True, exist_ok=True)
    os.chmod(pki, 0o755)
    now = datetime.now(UTC)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rpm-pipeline local CA")])
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, encipher_only=False,
                                     decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    srv_key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName("localhost"), x509.DNSName(socket.gethostname()),
                                     x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    srv_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name).public_key(srv_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=825))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    pkcs8, no_encryption = serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    write_private(ca_key_path, ca_key.private_bytes(encoding=pem, format=pkcs8,
                                                    encryption_algorithm=no_encryption))
    write_private(srv_key_path, srv_key.private_bytes(encoding=pem, format=pkcs8,
                                                      encryption_algorithm=no_encryption))
    ca_crt.write_bytes(ca_cert.public_bytes(pem))
    srv_crt.write_bytes(srv_cert.public_bytes(pem))
    os.chmod(ca_crt, 0o644)
    os.chmod(srv_crt, 0o644)
    return ca_crt, srv_crt, srv_key_path


def _load_ca(s: Settings) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    ensure_pki(s)
    ca_cert = x509.load_pem_x509_certificate(s.ca_cert.read_bytes())
    ca_key = serialization.load_pem_private_key(read_secret(Path(s.secrets_dir) / "ca.key").encode(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    return ca_cert, ca_key


def _service_names(s: Settings) -> set[str]:
    names = {"localhost", socket.gethostname(), "127.0.0.1", "::1"}
    if s.service_bind not in ("0.0.0.0", "::", ""):
        names.add(s.service_bind)
    return names


def _cert_names(cert: x509.Certificate) -> set[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {*san.get_values_for_type(x509.DNSName), *(str(ip) for ip in san.get_values_for_type(x509.IPAddress))}


def ensure_service_cert(s: Settings) -> tuple[Path, Path]:
    """The clinician service's HTTPS certificate, signed by the local CA, for localhost, this host and
    ``service_bind``: (pki/service.crt, secrets/service.key). Re-issued when the bind address is not in it
    or it expires within 30 days."""
    crt_path, key_path = Path(s.pki_dir) / "service.crt", Path(s.secrets_dir) / "service.key"
    wanted = _service_names(s)
    now = datetime.now(UTC)
    if crt_path.exists() and key_path.exists():
        cert = x509.load_pem_x509_certificate(crt_path.read_bytes())
        if wanted <= _cert_names(cert) and cert.not_valid_after_utc > now + timedelta(days=30):
            return crt_path, key_path
    ca_cert, ca_key = _load_ca(s)
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for name in sorted(wanted):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            names.append(x509.DNSName(name))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rpm-pipeline clinician service")]))
        .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=397))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    write_private(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
    crt_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    os.chmod(crt_path, 0o644)
    return crt_path, key_path
