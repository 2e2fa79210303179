"""Local secrets: Mosquitto password hashes, owner-only key files, the warehouse key and a local CA."""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from core.keys import (
    ExposedSecret,
    check_state_folder,
    ensure_pki,
    mosquitto_hash,
    service_password,
    warehouse_key,
    write_private,
)
from core.settings import Settings


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_mosquitto_hash_is_pbkdf2_sha512_in_the_7_format() -> None:
    entry = mosquitto_hash("s3cret-pw")
    empty, kind, iterations, salt_b64, digest_b64 = entry.split("$")
    assert (empty, kind, iterations) == ("", "7", "101")
    salt = base64.b64decode(salt_b64, validate=True)
    digest = base64.b64decode(digest_b64, validate=True)
    assert len(salt) == 12
    assert digest == hashlib.pbkdf2_hmac("sha512", b"s3cret-pw", salt, 101)
    assert len(digest) == 64


def test_mosquitto_hash_with_a_given_salt_is_reproducible() -> None:
    salt = bytes(range(12))
    assert mosquitto_hash("pw", salt) == mosquitto_hash("pw", salt)
    assert mosquitto_hash("pw", salt) != mosquitto_hash("pw2", salt)
    assert mosquitto_hash("pw", salt).split("$")[3] == base64.b64encode(salt).decode()


def test_fresh_salts_make_equal_passwords_hash_differently() -> None:
    assert mosquitto_hash("same") != mosquitto_hash("same")


def test_write_private_makes_an_owner_only_file(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "k.key"
    write_private(path, b"secret")
    assert path.read_bytes() == b"secret"
    assert _mode(path) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["k.key"]  # no temporary file left behind


def test_write_private_tightens_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "k.key"
    path.write_bytes(b"old")
    path.chmod(0o644)
    write_private(path, b"new")
    assert path.read_bytes() == b"new"
    assert _mode(path) == 0o600


def test_warehouse_key_is_created_once_and_stable(settings: Settings) -> None:
    key = warehouse_key(settings)
    assert len(key) == 64
    assert all(c in "0123456789abcdef" for c in key)
    assert warehouse_key(settings) == key
    assert warehouse_key(Settings(home=settings.home)) == key
    assert _mode(settings.warehouse_key_file) == 0o600
    assert not settings.warehouse_key_file.is_relative_to(settings.warehouse_dir)  # key outside the data


def test_service_password_is_stable(settings: Settings) -> None:
    pw = service_password(settings, "rpm-ingest")
    assert len(pw) >= 24
    assert service_password(settings, "rpm-ingest") == pw
    assert service_password(settings, "other") != pw


def test_ensure_pki_issues_a_server_cert_for_localhost_signed_by_the_ca(settings: Settings) -> None:
    ca_path, srv_path, key_path = ensure_pki(settings)
    ca = x509.load_pem_x509_certificate(ca_path.read_bytes())
    srv = x509.load_pem_x509_certificate(srv_path.read_bytes())

    srv.verify_directly_issued_by(ca)  # raises if the signature or issuer does not match
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    san = srv.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    eku = srv.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku

    assert ca_path == settings.ca_cert
    assert _mode(key_path) == 0o600
    assert _mode(settings.secrets_dir / "ca.key") == 0o600
    assert key_path.parent == settings.secrets_dir  # private keys never in the public pki folder


def test_ensure_pki_keeps_existing_certificates(settings: Settings) -> None:
    first = [p.read_bytes() for p in ensure_pki(settings)]
    second = [p.read_bytes() for p in ensure_pki(settings)]
    assert first == second


# --- keys someone else could have read or planted ----------------------------------------------------------

NOBODY = 65534  # the tests run as root: a file owned by `nobody` stands for another account's


def test_a_key_readable_by_others_is_refused_not_used(settings: Settings) -> None:
    key = warehouse_key(settings)
    settings.warehouse_key_file.chmod(0o644)
    with pytest.raises(ExposedSecret, match="readable or writable by others"):
        warehouse_key(settings)
    settings.warehouse_key_file.chmod(0o600)
    assert warehouse_key(settings) == key


def test_a_key_planted_by_another_account_is_refused(settings: Settings) -> None:
    settings.secrets_dir.mkdir(parents=True)
    write_private(settings.warehouse_key_file, b"a" * 64)
    os.chown(settings.warehouse_key_file, NOBODY, NOBODY)
    with pytest.raises(ExposedSecret, match="belongs to uid 65534"):
        warehouse_key(settings)


def test_a_key_behind_a_symlink_is_refused(settings: Settings, tmp_path: Path) -> None:
    settings.secrets_dir.mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere.key"
    write_private(elsewhere, b"b" * 64)
    settings.warehouse_key_file.symlink_to(elsewhere)
    with pytest.raises(ExposedSecret, match="symlink"):
        warehouse_key(settings)


def test_writing_a_secret_never_writes_through_a_planted_link(settings: Settings, tmp_path: Path) -> None:
    settings.secrets_dir.mkdir(parents=True)
    target = tmp_path / "attacker-reads-this"
    (settings.secrets_dir / ".warehouse.key.tmp").symlink_to(target)
    warehouse_key(settings)
    assert not target.exists()


@pytest.mark.parametrize("part", ["home", "secrets_dir", "warehouse_dir"])
def test_a_state_folder_another_account_owns_or_can_write_is_refused(settings: Settings, part: str) -> None:
    folder = getattr(settings, part)
    folder.mkdir(parents=True, exist_ok=True)
    check_state_folder(settings)  # ours: fine
    os.chown(folder, NOBODY, NOBODY)
    with pytest.raises(ExposedSecret, match="belongs to uid 65534"):
        check_state_folder(settings)
    os.chown(folder, os.geteuid(), os.getegid())
    folder.chmod(0o777)
    with pytest.raises(ExposedSecret, match="can be written by others"):
        check_state_folder(settings)


def test_a_private_part_of_the_state_folder_may_not_be_a_symlink(settings: Settings, tmp_path: Path) -> None:
    settings.home.mkdir(parents=True)
    (tmp_path / "leak").mkdir()
    settings.secrets_dir.symlink_to(tmp_path / "leak")
    with pytest.raises(ExposedSecret, match="is a symlink"):
        check_state_folder(settings)
