"""Authenticated encryption (AES-256-GCM) with named, rotatable keys kept outside every data folder.

A keyring file (``secrets/<purpose>.keyring.json``, mode 0600) holds the active key id and every key still
needed to decrypt. Each sealed value carries the id of the key that sealed it, and its associated data binds
it to where it lives (segment name and record number, audit sequence number), so a record moved, reordered
or swapped between files fails authentication instead of decrypting.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from core.keys import read_secret, write_private
from core.settings import Settings

NONCE_BYTES = 12


class DecryptError(ValueError):
    """Wrong key, unknown key id, or the data was altered."""


def new_key_id() -> str:
    return "k" + datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")


@dataclass
class Keyring:
    path: Path
    active: str
    keys: dict[str, bytes]
    # One cipher object per key: building it costs about as much as sealing one landing record.
    _ciphers: dict[str, AESGCM] = field(default_factory=dict, repr=False, compare=False)

    def _cipher(self, kid: str) -> AESGCM:
        cipher = self._ciphers.get(kid)
        if cipher is None:
            cipher = self._ciphers[kid] = AESGCM(self.keys[kid])
        return cipher

    @classmethod
    def load(cls, s: Settings, purpose: str) -> Keyring:
        """The keyring for ``purpose`` ("landing", "audit"), created with one fresh key on first use."""
        path = Path(s.secrets_dir) / f"{purpose}.keyring.json"
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with _locked(path):
            if not path.exists():
                kid = new_key_id()
                ring = cls(path, kid, {kid: secrets.token_bytes(32)})
                ring._save()
                return ring
            doc = json.loads(read_secret(path))
        return cls(path, doc["active"], {k: bytes.fromhex(v) for k, v in doc["keys"].items()})

    def _save(self) -> None:
        doc = {"active": self.active, "keys": {k: v.hex() for k, v in self.keys.items()}}
        write_private(self.path, json.dumps(doc, indent=1).encode())

    def add_active(self) -> str:
        """Add a fresh key and make it the one new data is sealed with; old keys still decrypt."""
        with _locked(self.path):
            kid = new_key_id()
            self.keys[kid] = secrets.token_bytes(32)
            self.active = kid
            self._save()
        return kid

    def retire(self, kids: set[str]) -> None:
        with _locked(self.path):
            for kid in kids - {self.active}:
                self.keys.pop(kid, None)
                self._ciphers.pop(kid, None)
            self._save()

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        """key id | 0x00 | nonce | ciphertext+tag."""
        nonce = secrets.token_bytes(NONCE_BYTES)
        ct = self._cipher(self.active).encrypt(nonce, plaintext, aad)
        return self.active.encode() + b"\x00" + nonce + ct

    def open(self, sealed: bytes, aad: bytes) -> bytes:
        kid, sep, rest = sealed.partition(b"\x00")
        name = kid.decode(errors="replace")
        if not sep or name not in self.keys:
            raise DecryptError(f"unknown key id {kid[:40]!r}")
        try:
            return self._cipher(name).decrypt(rest[:NONCE_BYTES], rest[NONCE_BYTES:], aad)
        except InvalidTag as exc:
            raise DecryptError("authentication failed: wrong key or altered data") from exc

    def derive(self, kid: str, salt: bytes, info: bytes) -> bytes:
        """A 256-bit subkey of key ``kid`` (HKDF-SHA256): one per landing segment, so a segment may number its
        nonces instead of drawing them at random, and no key seals enough data to reach the AES-GCM bounds."""
        key = self.keys.get(kid)
        if key is None:
            raise DecryptError(f"unknown key id {kid[:40]!r}")
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(key)

    @staticmethod
    def key_id_of(sealed: bytes) -> str:
        return sealed.partition(b"\x00")[0].decode(errors="replace")


class _locked:
    """An exclusive advisory lock beside ``path`` (keyring updates from several processes)."""

    def __init__(self, path: Path):
        self.lock_path = path.with_name(f".{path.name}.lock")

    def __enter__(self) -> None:
        self.fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
