"""The pipeline's steps as the DAG's tasks run them — each with its own warehouse connection, as separate task
processes would — for tests that drive a batch through claim, stage, validate and load. Results come back as
the dicts the tasks hand to XCom; ``sizes`` shrinks the chunks (pipeline.Sizes) without touching the code."""

from __future__ import annotations

from core.settings import Settings
from pipeline import Sizes
from pipeline import stage as stage_step
from pipeline import validate as validate_step
from warehouse import ledger
from warehouse import load as load_step
from warehouse.db import clinical
from warehouse.ledger import Batch

SIZES = Sizes()


def claim_segments(s: Settings) -> Batch:
    with clinical(s) as con:
        return ledger.claim_segments(con, s.landing_dir, s.pipeline_max_segments)


def stage_batch(s: Settings, batch: Batch, sizes: Sizes = SIZES) -> dict:
    with clinical(s) as con:
        return stage_step.stage_batch(con, s, batch, sizes.stage_messages).to_xcom()


def validate_batch(s: Settings, batch: Batch, sizes: Sizes = SIZES) -> dict:
    with clinical(s) as con:
        return validate_step.validate_batch(con, s, batch, sizes.validate_rows).to_xcom()


def load_batch(s: Settings, batch: Batch, run_id: str, sizes: Sizes = SIZES) -> dict:
    with clinical(s) as con:
        return load_step.load_batch(con, batch, run_id, sizes.load_items).to_xcom()
