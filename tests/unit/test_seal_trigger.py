"""The seal trigger fires when ingest seals a segment, and only then; rpm_pipeline is scheduled on it and time.

The trigger runs in Airflow's triggerer (pipeline/seal_trigger.py); here its async generator is driven
directly on a real folder, segments sealed the way core.landing seals them (written in open/, renamed into
sealed/). The stack test (tests/integration/test_airflow_stack.py) shows a seal starting a real run.
"""

from __future__ import annotations

import asyncio
import os
from datetime import UTC, datetime
from pathlib import Path

from core.landing import SegmentWriter, sealed_dir
from core.settings import Settings
from pipeline.seal_trigger import ASSET, SealedSegmentTrigger, schedule

DEADLINE_S = 10.0


def seal(landing: Path, name: str) -> None:
    writer = SegmentWriter(landing, name)
    writer.append("rpm/v1/devices/d-1/vitals", b"{}", datetime.now(UTC))
    writer.seal()


async def next_event(gen, timeout: float = DEADLINE_S):
    return await asyncio.wait_for(gen.__anext__(), timeout)


def test_a_sealed_segment_fires_one_event_that_names_no_segment(tmp_path: Path):
    landing = tmp_path / "landing"
    seal(landing, "before-start")  # already sealed when the watch starts: left to the schedule

    async def scenario() -> list:
        trigger = SealedSegmentTrigger(str(sealed_dir(landing)), poke_interval=0.02)
        gen = trigger.run()
        first = asyncio.ensure_future(gen.__anext__())
        await asyncio.sleep(0)  # yields once: the watch's first step (its baseline listing) runs
        seal(landing, "dev-1-000001")
        events = [await asyncio.wait_for(first, DEADLINE_S)]  # counts 1: the earlier segment is not new
        (sealed_dir(landing) / "before-start.seg").unlink()  # a purge is no seal
        seal(landing, "dev-1-000002")
        seal(landing, "dev-1-000003")
        events.append(await next_event(gen))
        await gen.aclose()
        return events

    events = asyncio.run(scenario())
    assert events[0].payload == {"sealed": 1}
    assert 1 <= events[1].payload["sealed"] <= 2  # the two seals in one look, or the first of two
    assert all("dev-1" not in repr(e.payload) for e in events)  # segment names carry client ids


def test_the_watch_starts_before_landing_exists(tmp_path: Path):
    landing = tmp_path / "landing"

    async def scenario():
        gen = SealedSegmentTrigger(str(sealed_dir(landing)), poke_interval=0.02).run()
        pending = asyncio.ensure_future(gen.__anext__())
        await asyncio.sleep(0)  # yields once: the watch's first step runs
        seal(landing, "dev-2-000001")
        event = await asyncio.wait_for(pending, DEADLINE_S)
        await gen.aclose()
        return event

    assert asyncio.run(scenario()).payload == {"sealed": 1}


def test_rpm_pipeline_runs_on_a_seal_or_on_its_schedule(tmp_path: Path):
    s = Settings(home=tmp_path / "var", pipeline_schedule_minutes=1)
    timetable = schedule(s)
    [asset] = list(timetable.asset_condition.objects)  # type: ignore[attr-defined]
    assert asset.name == ASSET
    [watcher] = asset.watchers
    classpath, kwargs = watcher.trigger.serialize()
    assert classpath == "pipeline.seal_trigger.SealedSegmentTrigger"
    assert kwargs["sealed_dir"] == str(sealed_dir(Path(s.landing_dir)))
    assert timetable.timetable.delta.total_seconds() == 60  # type: ignore[attr-defined]
    os.makedirs(kwargs["sealed_dir"])  # the serialised trigger is what the triggerer rebuilds and runs
    rebuilt = SealedSegmentTrigger(**kwargs)
    assert rebuilt.serialize() == (classpath, kwargs)


def test_only_regular_files_count_and_no_name_reaches_the_event(tmp_path: Path):
    """A directory, a FIFO or a symlink named *.seg is no sealed segment (ingest renames files in); a hostile
    file name (a newline, a terminal escape, SQL) is counted like any other and never copied into the event."""
    landing = tmp_path / "landing"
    sealed = sealed_dir(landing)
    sealed.mkdir(parents=True)

    async def scenario():
        gen = SealedSegmentTrigger(str(sealed), poke_interval=0.02).run()
        pending = asyncio.ensure_future(gen.__anext__())
        await asyncio.sleep(0)  # the baseline listing
        (sealed / "a-dir.seg").mkdir()
        os.mkfifo(sealed / "a-fifo.seg")
        (sealed / "a-link.seg").symlink_to("/dev/zero")
        (sealed / "evil\n\x1b[2J'); DROP TABLE readings;--.seg").write_bytes(b"x")
        event = await asyncio.wait_for(pending, DEADLINE_S)
        await gen.aclose()
        return event

    event = asyncio.run(scenario())
    assert event.payload == {"sealed": 1}


def test_a_sealed_folder_that_cannot_be_listed_never_fails_the_watch(tmp_path: Path):
    """landing/sealed/ replaced by a file (or unreadable, a symlink loop): the trigger must not raise — the
    triggerer would restart it again and again, each time with a traceback — and fires once it is listable."""
    landing = tmp_path / "landing"
    sealed = sealed_dir(landing)
    sealed.parent.mkdir(parents=True)
    sealed.write_text("not a folder")

    async def scenario():
        gen = SealedSegmentTrigger(str(sealed), poke_interval=0.01).run()
        pending = asyncio.ensure_future(gen.__anext__())
        done, _ = await asyncio.wait({pending}, timeout=0.5)  # ~50 looks at a folder that is a file
        assert not done, pending.exception() if done else None
        sealed.unlink()
        seal(landing, "dev-3-000001")
        event = await asyncio.wait_for(pending, DEADLINE_S)
        await gen.aclose()
        return event

    assert asyncio.run(scenario()).payload == {"sealed": 1}
