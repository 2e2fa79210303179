"""Landing key rotation that was interrupted (SIGKILL mid-way) is finished by the next one, not blocked by it."""

from __future__ import annotations

from core import keys
from core.keyring import Keyring
from core.landing import list_sealed, read_whole_segment, sealed_dir, segment_key_ids
from core.settings import Settings
from rpmctl.admin.rotate import rotate_landing

TOPIC = "rpm/v1/devices/dev-1/vitals"


def test_a_rotation_killed_half_way_is_finished_by_the_next_one(settings: Settings, write_segment,
                                                                 make_reading) -> None:
    segment = write_segment("ingest-1-000001", [(TOPIC, make_reading())])
    ring = Keyring.load(settings, "landing")
    first = ring.active
    # What a `rpm keys rotate` killed during its re-encryption leaves: its new key active and recorded, and a
    # half-written copy in sealed/.rewrite/ (the original is intact: copies replace it atomically).
    added = ring.add_active()
    keys.write_private(settings.secrets_dir / "landing.rotating", added.encode())
    rewrite = sealed_dir(settings.landing_dir) / ".rewrite"
    rewrite.mkdir()
    (rewrite / segment.name).write_bytes(b"half a segment")

    result = rotate_landing(settings)

    assert result["active"] == added, "the interrupted rotation's key is reused, not a new one per attempt"
    assert set(Keyring.load(settings, "landing").keys) == {added} and result["retired"] == [first]
    assert segment_key_ids(segment) == {added} and len(read_whole_segment(segment, Keyring.load(settings,
                                                                                               "landing"))) == 1
    assert not any(rewrite.iterdir()) and not (settings.secrets_dir / "landing.rotating").exists()
    assert list_sealed(settings.landing_dir) == [segment]


def test_each_finished_rotation_adds_exactly_one_key(settings: Settings, write_segment, make_reading) -> None:
    write_segment("ingest-1-000001", [(TOPIC, make_reading())])
    actives = [rotate_landing(settings)["active"] for _ in range(3)]
    assert len(set(actives)) == 3
    assert set(Keyring.load(settings, "landing").keys) == {actives[-1]}
