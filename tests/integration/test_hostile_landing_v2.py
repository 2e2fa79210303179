"""Landing v2 files crafted by hand in landing/sealed/ — block heads with huge counts or lengths, dictionary
indexes out of range, a trailer that disagrees, empty blocks, an enormous or garbage header, bytes appended, a
copy under another name, a sparse file of gigabytes — beside a good segment: one real `rpm pipeline run`
succeeds, loads the good readings, and sets every crafted file aside in landing/rejected/ with its reason;
the accounting stays balanced and counts no phantom messages."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from datetime import UTC, datetime, timedelta

import pytest

from core.keyring import Keyring
from core.landing import (
    _FRAME,
    _HEAD,
    _PREFIX,
    SegmentWriter,
    _block_aad,
    _encode_block,
    _nonce,
    _seal_trailer,
    _subkey_cipher,
    list_rejected,
    rejection_of,
    sealed_dir,
)
from core.settings import Settings
from tests.conftest import rpm, rpm_json
from tests.integration.test_poison_and_replay import add_device, hr_batch, publish, readings

pytestmark = pytest.mark.integration


def crafted(ring: Keyring, name: str, blocks: list[tuple[int, bytes]], trailer: tuple[int, int] | None = None,
            header_name: str | None = None) -> bytes:
    """A v2 segment sealed under the real landing key, with whatever block counts and plaintexts it is given
    (what a bug in the writer, or a holder of the key, could put there)."""
    import hashlib

    header = {"rpm_landing": 2, "segment": header_name or name, "created_at": "2026-11-27T12:00:00.000000Z",
              "encoding": "aesgcm-hkdf-v2", "key_id": ring.active, "salt": "11" * 16}
    hb = json.dumps(header, separators=(",", ":")).encode()
    cipher = _subkey_cipher(ring, ring.active, bytes.fromhex(header["salt"]), hb)
    out, first, chain = [_HEAD.pack(_PREFIX, len(hb)), hb], 0, hashlib.sha256()
    for i, (count, plain) in enumerate(blocks):
        body = cipher.encrypt(_nonce(i), plain, _block_aad((header_name or name).encode(), i, first, count))
        chain.update(body[-16:])
        out += [_FRAME.pack(b"B", count, len(body)), body]
        first += count
    records, nblocks = trailer or (first, len(blocks))
    out.append(_seal_trailer(cipher, (header_name or name).encode(), records, nblocks, chain.digest()))
    return b"".join(out)


def test_crafted_v2_segments_are_set_aside_by_a_real_run(stack: Settings):
    s = stack
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=6)
    password = add_device(s, "bp-good", "pt-good", since=start - timedelta(days=1))
    publish(s, "bp-good", password, [hr_batch("bp-good", "g1", start, 5)])
    ring = Keyring.load(s, "landing")
    sealed = sealed_dir(s.landing_dir)  # type: ignore[arg-type]
    one = _encode_block([1], [0], [0], [b'{"metric":"heart_rate"}'], ["rpm/v1/devices/bp-good/vitals"], [])
    files = {
        "aa-topicix-000001": crafted(ring, "aa-topicix-000001", [(1, _encode_block(
            [1], [9], [0], [b"{}"], ["rpm/v1/devices/bp-good/vitals"], []))]),
        "aa-markix-000001": crafted(ring, "aa-markix-000001", [(1, _encode_block(
            [1], [0], [5], [b"{}"], ["rpm/v1/devices/bp-good/vitals"], []))]),
        "aa-hugecount-000001": crafted(ring, "aa-hugecount-000001", [(2**32 - 1, one)]),
        "aa-emptyblock-000001": crafted(ring, "aa-emptyblock-000001", [(0, b"")]),
        "aa-trailer-000001": crafted(ring, "aa-trailer-000001", [(1, one)], trailer=(7, 1)),
        "aa-appended-000001": crafted(ring, "aa-appended-000001", [(1, one)]) + b"\x00" * 100,
        "aa-renamed-000001": crafted(ring, "aa-renamed-000001", [(1, one)], header_name="aa-original-000001"),
        "aa-garbage-000001": _PREFIX + os.urandom(4096),
        "aa-hugeheader-000001": _PREFIX + struct.pack("<I", 2**32 - 1) + b"{" * 1000,
        "aa-bigheader-000001": _PREFIX + struct.pack("<I", 60_000) + b"[" * 60_000,
        "aa-blocklen-000001": crafted(ring, "aa-blocklen-000001", [])[:-(9 + 12 + 48 + 16)]
        + _FRAME.pack(b"B", 2**31, 2**32 - 1) + b"x" * 64,
    }
    for name, data in files.items():
        (sealed / f"{name}.seg").write_bytes(data)
    with open(sealed / "aa-sparse-000001.seg", "wb") as f:  # takes no disk, 4 GB if read whole
        f.write(files["aa-trailer-000001"][:200])
        f.truncate(4 << 30)
    writer = SegmentWriter(s.landing_dir, "bb-good-000001", keyring=ring)  # type: ignore[arg-type]
    writer.append("rpm/v1/devices/bp-good/vitals",
                  json.dumps(hr_batch("bp-good", "w", start + timedelta(hours=1), 1)).encode(), datetime.now(UTC))
    shutil.copy(writer.seal(), sealed / "zz-copy-000001.seg")  # a good segment copied under another name
    publish(s, "bp-good", password, [hr_batch("bp-good", "g2", start + timedelta(hours=2), 5)])

    proc = rpm(s, "pipeline", "run", timeout=600)
    assert re.fullmatch(r"rpm_pipeline \S+: success \((\w+ success, ){8}\w+ success\)",
                        proc.stdout.splitlines()[0]), proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr

    assert readings(s) == {("pt-good", "bp-good", f"{tag}-{i}") for tag in ("g1", "g2") for i in range(5)} | {
        ("pt-good", "bp-good", "w-0")}
    rejected = {p.stem: rejection_of(p) for p in list_rejected(s.landing_dir)}  # type: ignore[arg-type]
    expected = {*files, "aa-sparse-000001", "zz-copy-000001"}
    assert set(rejected) == expected, sorted(rejected)
    assert all(r.reason != "unknown" and r.detail for r in rejected.values())
    assert rejected["aa-sparse-000001"].reason == "bad_record" and "larger than" in rejected["aa-sparse-000001"].detail
    assert rejected["zz-copy-000001"].reason == "bad_header"
    acc = rpm_json(s, "accounting")
    assert acc["balanced"] is True and (acc["received"], acc["loaded"]) == (11, 11)
    assert acc["rejected"]["segments"] == len(expected)
    assert acc["rejected"]["messages"] < 100, acc["rejected"]  # no phantom billions from planted heads
