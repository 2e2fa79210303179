"""The pipeline: the one package that composes transforms, expectations and warehouse.

A reading's way from landing to mart, one step per module, each given its connection, sizes and settings:
claim (warehouse.ledger) -> stage (pipeline/stage.py: landing segments -> transforms -> staging tables)
-> validate (pipeline/validate.py: expectations' GX suites -> verdicts) -> load (warehouse.load) -> alerts
-> record (warehouse.ops + the validation report) -> publish the serving snapshot and the telehealth store.
``pipeline.tasks`` holds the task entry points the DAGs call; ``pipeline.replay`` re-judges quarantine.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sizes:
    """How much each step handles at a time: what bounds a run's memory however large its batch."""
    stage_messages: int = 200_000    # messages decoded and committed per chunk, at most ...
    stage_items: int = 250_000       # ... and about this many items (each held as Python values until staged:
                                     # 10M readings in chunks of 200k messages peaked at 2.17 GB)
    validate_rows: int = 1_000_000   # rows per GX validation (every rule is row-wise: chunks judge as a whole;
                                     # each chunk pays GX's fixed cost per rule group, ~0.5 s in all)
    load_items: int = 1_000_000      # items per load transaction (whole segments)
