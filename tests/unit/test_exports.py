"""Files written for the user (warehouse/exports.py): billing and report CSVs, FHIR bundles.

The hostile review's F10: `--csv FILE` opened FILE with O_CREAT|O_TRUNC, so a symlink another local user
planted there made us overwrite the file it pointed at, and a file they created beforehand stayed theirs —
they then read the care team's billing rows. Every export is a new 0600 file of ours, renamed into place.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from warehouse import billing, fhir, reports

NOBODY = 65534
WRITERS: dict[str, Callable[[Path], Path]] = {
    "billing csv": lambda p: billing.write_csv([{"patient_id": "pt-1", "month": "2026-03", "codes": ["99454"],
                                                 "flags": [], "periods": []}], p),
    "report csv": lambda p: reports.write_csv([{"week": "2026-03-02", "people": 12}], p),
    "fhir bundle": lambda p: fhir.write_bundle({"resourceType": "Bundle", "entry": []}, p),
}
writers = pytest.mark.parametrize("write", WRITERS.values(), ids=WRITERS.keys())


def ours_and_private(path: Path) -> None:
    st = os.lstat(path)
    assert stat.S_ISREG(st.st_mode), stat.filemode(st.st_mode)  # not a link any more
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.geteuid()
    assert b"pt-1" in path.read_bytes() or b"Bundle" in path.read_bytes() or b"people" in path.read_bytes()


@writers
def test_a_planted_symlink_is_replaced_not_followed(tmp_path, write):
    victim = tmp_path / "victim.txt"
    victim.write_text("someone else's file\n")
    link = tmp_path / "export"
    link.symlink_to(victim)
    write(link)
    assert victim.read_text() == "someone else's file\n"
    ours_and_private(link)


@writers
def test_a_dangling_symlink_creates_nothing_where_it_points(tmp_path, write):
    link = tmp_path / "export"
    link.symlink_to(tmp_path / "created-through-the-link")
    write(link)
    assert not (tmp_path / "created-through-the-link").exists()
    ours_and_private(link)


@writers
def test_a_file_someone_else_made_beforehand_is_replaced_by_one_of_ours(tmp_path, write):
    """Their file (world-writable, as `umask 000; : > FILE` leaves it): we do not write into it, so they
    cannot read what we wrote through it."""
    theirs = tmp_path / "export"
    theirs.write_text("")
    os.chmod(theirs, 0o666)
    if os.geteuid() == 0:
        os.chown(theirs, NOBODY, NOBODY)
    kept_open = open(theirs, "rb")  # what the other account still holds  # noqa: SIM115
    try:
        write(theirs)
        assert kept_open.read() == b""  # the old file never received the rows
    finally:
        kept_open.close()
    ours_and_private(theirs)


@writers
def test_a_second_export_to_the_same_name_replaces_the_first(tmp_path, write):
    write(tmp_path / "export")
    write(tmp_path / "export")
    ours_and_private(tmp_path / "export")
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no temporary file left behind


@writers
@pytest.mark.parametrize("target", ["link to /dev/null", "folder", "fifo"])
def test_a_path_to_anything_but_a_regular_file_is_refused(tmp_path, write, target):
    """Like `--csv /dev/stdout` (a link to the terminal or a pipe): refused, never replaced. (Never aimed at a
    device itself: a broken writer run as root would replace /dev/null for the whole machine.)"""
    path = tmp_path / target.split()[0]
    if target == "folder":
        path.mkdir()
    elif target == "fifo":
        os.mkfifo(path)  # no reader: opening it for writing would wait forever
    else:
        path.symlink_to("/dev/null")
    before = os.lstat(path)
    with pytest.raises(ValueError, match="not a regular file"):
        write(path)
    after = os.lstat(path)
    assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


@writers
def test_a_missing_folder_is_not_created(tmp_path, write):
    with pytest.raises(FileNotFoundError):
        write(tmp_path / "no" / "such" / "export")
    assert list(tmp_path.iterdir()) == []
