"""Running a suite of named rules with Great Expectations on a pandas DataFrame (shared by both streams).

GX cannot validate DuckDB over SQLAlchemy, so batches are pulled into pandas. ``result_format=COMPLETE``
keyed by ``row_key`` returns every failing row of every rule; only those keys are read from the result —
the values GX echoes back (PHI) are never stored or logged.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from dataclasses import dataclass
from functools import cache
from typing import Any

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")  # no usage statistics leave the machine

INDEX_COLUMN = "row_key"
_ROW_NO = "_row_no"  # what GX sees as the index: an integer position, mapped back to row_key afterwards
_CONDITION_COLUMN = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*==")


@dataclass(frozen=True)
class Rule:
    name: str
    protects: str
    expectation: str
    kwargs: dict[str, Any]


def warm() -> None:
    """Import GX and build its context now (≈5 s on a 2-core machine): a fixed start-up cost of the task,
    kept out of the timed validation work."""
    _context()


@cache
def _context() -> Any:
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    asset = ctx.data_sources.add_pandas("rpm").add_dataframe_asset("candidate_rows")
    asset.add_batch_definition_whole_dataframe("batch")
    return ctx


_SUITES: dict[str, Any] = {}


def build_suite(name: str, rules: list[Rule]) -> Any:
    """The GX suite for ``rules`` (built once per process and name)."""
    if name in _SUITES:
        return _SUITES[name]
    import great_expectations as gx
    import great_expectations.expectations as gxe

    suite = gx.ExpectationSuite(name=name)
    for rule in rules:
        cls = getattr(gxe, rule.expectation)
        suite.add_expectation(cls(**rule.kwargs, meta={"rule": rule.name, "protects": rule.protects}))
    _SUITES[name] = _context().suites.add(suite)
    return _SUITES[name]


def columns_of(rules: list[Rule]) -> list[str]:
    """Every column a suite reads (checked columns and those its row conditions name)."""
    cols: dict[str, None] = {}
    for rule in rules:
        for key in ("column", "column_A", "column_B"):
            if key in rule.kwargs:
                cols[rule.kwargs[key]] = None
        for col in _CONDITION_COLUMN.findall(rule.kwargs.get("row_condition", "")):
            cols[col] = None
    return list(cols)


_NULL_CHECKS = ("ExpectColumnValuesToNotBeNull", "ExpectColumnValuesToBeNull")


def null_only_columns(rules: list[Rule]) -> list[str]:
    """Columns of which the suite reads only whether each value is null (no value, set or condition): the
    gate may hand GX a cheap marker for them (1.0 or null) instead of their text."""
    checked = {r.kwargs["column"] for r in rules if r.expectation in _NULL_CHECKS}
    other = {c for r in rules if r.expectation not in _NULL_CHECKS for c in columns_of([r])}
    conditions = {c for r in rules for c in _CONDITION_COLUMN.findall(r.kwargs.get("row_condition", ""))}
    return sorted(checked - other - conditions)


def validation_frame(frame: Any, rules: list[Rule]) -> Any:
    """Only the columns the suite reads, text columns as categoricals, an integer index column.

    GX applies each row condition to the whole frame it is given (a copy per conditional rule): on a
    million rows, copying unused columns and Python string objects was most of the validation time.
    Categoricals hold the same values, so every expectation judges exactly what it judged before."""
    import numpy as np
    import pandas as pd

    # A column the frame lacks stays missing: GX then reports the rule as not evaluable (run_suite raises).
    narrow = frame[[c for c in columns_of(rules) if c in frame.columns]].copy()
    for col in narrow.columns:
        if pd.api.types.infer_dtype(narrow[col], skipna=True) == "string":
            narrow[col] = narrow[col].astype("category")
    narrow[_ROW_NO] = np.arange(len(narrow))
    return narrow


def run_suite(frame: Any, name: str, rules: list[Rule]) -> dict[str, list[str]]:
    """Rules each failing row broke, by row key. Raises if GX could not evaluate a rule (never passes)."""
    if frame.empty:
        return {}
    keys = frame[INDEX_COLUMN].to_numpy()
    batch = (_context().data_sources.get("rpm").get_asset("candidate_rows")
             .get_batch_definition("batch").get_batch(batch_parameters={"dataframe": validation_frame(frame,
                                                                                                   rules)}))
    result = batch.validate(build_suite(name, rules), result_format={
        "result_format": "COMPLETE", "unexpected_index_column_names": [_ROW_NO],
        "return_unexpected_index_query": False, "partial_unexpected_count": 0,
    })
    failures: dict[str, list[str]] = defaultdict(list)
    for r in result.results:
        rule = r.expectation_config.meta["rule"]
        if r.exception_info and r.exception_info.get("raised_exception"):
            raise RuntimeError(f"validation rule {rule} could not be evaluated: "
                               f"{r.exception_info.get('exception_message')}")
        if r.success:
            continue
        ids = r.result.get("unexpected_index_list")
        if ids is None:
            raise RuntimeError(f"validation rule {rule} failed without naming the failing rows")
        for entry in ids:
            failures[keys[entry[_ROW_NO]]].append(rule)
    return dict(failures)
