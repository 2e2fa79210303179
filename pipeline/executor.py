"""The stack's executor: Airflow's LocalExecutor, with the tasks' heavy imports done once before its workers
are forked.

Under the LocalExecutor (Airflow 3.3, Linux) the scheduler forks a fixed pool of long-lived worker processes
when the executor starts (multiprocessing's fork, inside ``gc.freeze`` so the shared pages stay shared), and
each task instance runs in a process its worker's supervisor forks (``os.fork``; fork+exec only on macOS).
A task that imports pandas, DuckDB and Great Expectations itself pays ~3–7 s before any work (``validate``:
6.75 s of task time for 1.5 s of work under load), on every run. Done here, before the pool is forked, every
task inherits them. Airflow loads this class by its path (``[core] executor``: rpmctl's stack sets it).
"""

from __future__ import annotations

import logging
import multiprocessing
import time

from airflow.executors.local_executor import LocalExecutor

log = logging.getLogger("rpm.pipeline")


class PreloadedLocalExecutor(LocalExecutor):
    """LocalExecutor whose worker processes start with the pipeline's steps imported."""

    def start(self) -> None:
        if multiprocessing.get_start_method() == "fork":  # a spawned worker would import everything anew
            from pipeline.tasks import preload

            began = time.monotonic()
            try:
                preload()
            except Exception:  # a step that cannot be imported fails its task, visibly, not the scheduler
                log.exception("rpm: preloading the steps failed; each task imports them itself")
            else:
                log.info("rpm: steps preloaded for the task processes in %.1f s", time.monotonic() - began)
        super().start()
