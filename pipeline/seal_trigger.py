"""rpm_pipeline runs when ingest seals a landing segment, not only on its schedule.

A sealed segment is the pipeline's unit of work (the claim takes sealed segments), and waiting for the next
scheduled run was most of the publish -> visible budget (BENCHMARKS.md §3: 31 s p50 / 57 s p95 of ~75 s). So
the DAG is scheduled on an Airflow asset, ``rpm_sealed_segments``, updated by a watcher whose trigger runs in
the triggerer and notices new files in ``landing/sealed/`` — *or* on the time schedule, which stays as the
fallback (a triggerer that is down, a seal it missed). ``max_active_runs=1`` still holds: Airflow defers an
asset-triggered run while one is active and keeps one queued event per asset, so any number of seals during a
run start exactly one run after it.

Readings never pass through the trigger (ARCHITECTURE.md: the ingest service owns delivery); it only sees file
names, and its event carries a count, never a name (segment names carry client ids).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

from airflow.sdk import Asset, AssetOrTimeSchedule, AssetWatcher, DeltaTriggerTimetable
from airflow.triggers.base import BaseEventTrigger, TriggerEvent

from core.landing import SEGMENT_SUFFIX, sealed_dir
from core.settings import Settings

ASSET = "rpm_sealed_segments"
POKE_S = 1.0  # a stat of one directory per second: the seal itself waits RPM_SEGMENT_MAX_AGE_S (10 s)
RESCAN_S = 15.0  # list the folder now and then even if its mtime looks unchanged (coarse timestamps)


def _sealed(directory: str) -> set[str] | None:
    """The sealed segments' names; None when the folder cannot be listed (a file or a symlink loop in its place,
    unreadable): the watch goes on — a trigger that raises is restarted by the triggerer again and again."""
    try:
        # Ingest renames regular files in: a directory, FIFO or symlink of that name is no sealed segment.
        with os.scandir(directory) as entries:
            return {e.name for e in entries if e.name.endswith(SEGMENT_SUFFIX) and e.is_file(follow_symlinks=False)}
    except FileNotFoundError:  # landing not created yet
        return set()
    except OSError:
        return None


def _mtime(directory: str) -> int | None:
    try:
        return os.stat(directory).st_mtime_ns
    except OSError:
        return None


class SealedSegmentTrigger(BaseEventTrigger):
    """Fires each time new sealed segments appear in ``sealed_dir``; the event holds how many."""

    def __init__(self, sealed_dir: str, poke_interval: float = POKE_S, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sealed_dir = sealed_dir
        self.poke_interval = poke_interval

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (f"{__name__}.SealedSegmentTrigger", {"sealed_dir": self.sealed_dir, "poke_interval": self.poke_interval})

    async def run(self) -> AsyncIterator[TriggerEvent]:
        # What is sealed when the watch starts is left to the schedule: a restarted triggerer must not start
        # a run for segments a run may already have taken.
        # (Listed before the first await: the baseline is taken as soon as the triggerer starts the watch.)
        stamp = _mtime(self.sealed_dir)
        seen = _sealed(self.sealed_dir) or set()
        listed = time.monotonic()
        unlistable = False
        while True:
            await asyncio.sleep(self.poke_interval)
            now = _mtime(self.sealed_dir)
            if now == stamp and time.monotonic() - listed < RESCAN_S:
                continue
            stamp = now  # taken before the listing: a seal after it changes the mtime again
            current = await asyncio.to_thread(_sealed, self.sealed_dir)
            listed = time.monotonic()
            if current is None:  # said once, not at every look; the schedule still runs the pipeline
                if not unlistable:
                    self.log.warning("cannot list %s: watching on, rpm_pipeline runs on its schedule meanwhile",
                                     self.sealed_dir)
                unlistable = True
                continue
            unlistable = False
            new = current - seen
            seen = current  # purged or rejected segments leave the set too
            if new:
                yield TriggerEvent({"sealed": len(new)})


def schedule(s: Settings | None = None) -> AssetOrTimeSchedule:
    """rpm_pipeline's schedule: a new sealed segment, or every RPM_PIPELINE_SCHEDULE_MINUTES (the fallback);
    read when Airflow parses the DAG."""
    s = s or Settings.from_env()
    watcher = AssetWatcher(name="rpm_sealed_segment_watcher",
                           trigger=SealedSegmentTrigger(str(sealed_dir(Path(s.landing_dir)))))
    return AssetOrTimeSchedule(timetable=DeltaTriggerTimetable(timedelta(minutes=s.pipeline_schedule_minutes)),
                               assets=[Asset(ASSET, watchers=[watcher])])
