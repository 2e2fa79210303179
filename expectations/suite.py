"""Running a suite of named rules with Great Expectations on a pandas DataFrame (shared by both streams).

GX cannot validate DuckDB over SQLAlchemy, so batches are pulled into pandas. ``result_format=COMPLETE``
keyed by the row's position returns every failing row of every rule, mapped back to ``row_key``; GX is told
not to echo the failing values (PHI), and nothing else is read from the result.
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
    from great_expectations.execution_engine import pandas_execution_engine

    # GX fingerprints every batch it is handed below this size (a hash of the whole frame, ~0.1 s per
    # million rows, once per call: a fifth of the suite's run) for batch markers nothing here reads.
    pandas_execution_engine.HASH_THRESHOLD = 0
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
    """Only the columns the suite reads, text columns as categoricals, the row position as a named index.

    Categoricals hold the same values, so every expectation judges exactly what it judged before; the named
    index lets GX list failing rows without reading each one back (and without echoing their values)."""
    import pandas as pd

    # run_suite checked that the frame has every one. No copy: pandas copies on write, so converting a column
    # replaces it in this selection only (a copy of a million rows cost ~0.35 s, and the gate's text columns
    # already come as categoricals).
    narrow = frame[columns_of(rules)]
    for col in narrow.columns:
        if pd.api.types.infer_dtype(narrow[col], skipna=True) == "string":
            narrow[col] = narrow[col].astype("category")
    narrow.index = pd.RangeIndex(len(narrow), name=_ROW_NO)
    return narrow


def _by_condition(rules: list[Rule]) -> dict[str, list[int]]:
    """Positions of the rules in the suite, grouped by their row condition ("" for none), first seen first."""
    groups: dict[str, list[int]] = {}
    for i, rule in enumerate(rules):
        groups.setdefault(rule.kwargs.get("row_condition", ""), []).append(i)
    return groups


def _unconditional(rule: Rule) -> Rule:
    kwargs = {k: v for k, v in rule.kwargs.items() if k not in ("row_condition", "condition_parser")}
    return Rule(rule.name, rule.protects, rule.expectation, kwargs)


def run_suite(frame: Any, name: str, rules: list[Rule]) -> dict[str, list[str]]:
    """Rules each failing row broke, by row key. Raises if GX could not evaluate a rule (never passes).

    GX applies a rule's row condition by copying the rows that meet it (``DataFrame.query``), once per metric
    it computes: ~5 copies of the whole frame per conditional rule. So the rows each condition selects are
    taken here once, with only the columns its rules read, and GX judges them with those rules unconditional —
    the same rows, the same expectation (the mask is ``DataFrame.eval`` of the condition, what ``query``
    selects by)."""
    import pandas as pd

    if frame.empty:
        return {}
    for rule in rules:  # checked up front: a rule whose rows are absent from this frame must not go unread
        absent = [c for c in columns_of([rule]) if c not in frame.columns]
        if absent:
            raise RuntimeError(f"validation rule {rule.name} could not be evaluated: no column {absent}")
    keys = frame[INDEX_COLUMN].to_numpy()
    narrow = validation_frame(frame, rules)
    broken: dict[int, list[int]] = defaultdict(list)  # row position -> positions of the rules it broke
    for k, (condition, members) in enumerate(_by_condition(rules).items()):
        judged = [_unconditional(rules[i]) for i in members]
        cols = columns_of(judged)
        if condition:
            try:
                mask = narrow.eval(condition)
                if not pd.api.types.is_bool_dtype(mask):  # query would select by label: refuse instead
                    raise TypeError(f"it gives {mask.dtype}, not booleans")
                rows = narrow.loc[mask, cols]
            except Exception as exc:  # noqa: BLE001 - whatever pandas raises, the rules cannot be judged
                raise RuntimeError(f"validation rule {rules[members[0]].name} could not be evaluated: "
                                   f"row condition {condition!r}: {exc}") from exc
        else:
            rows = narrow[cols]
        if rows.empty:
            continue  # no row meets the condition: none can break its rules
        for i, row_nos in zip(members, _validate(rows, f"{name}#{k}", judged), strict=True):
            for row_no in row_nos:
                broken[row_no].append(i)
    return {keys[row_no]: [rules[i].name for i in sorted(positions)] for row_no, positions in broken.items()}


def _validate(rows: Any, suite_name: str, rules: list[Rule]) -> list[list[int]]:
    """The failing row positions of each rule (in ``rules``' order) over ``rows``, as GX judges them."""
    batch = (_context().data_sources.get("rpm").get_asset("candidate_rows")
             .get_batch_definition("batch").get_batch(batch_parameters={"dataframe": rows}))
    result = batch.validate(build_suite(suite_name, rules), result_format={
        "result_format": "COMPLETE", "unexpected_index_column_names": [_ROW_NO],
        # row positions only: GX neither reads each failing row back nor echoes its values (PHI)
        "exclude_unexpected_values": True, "return_unexpected_index_query": False, "partial_unexpected_count": 0,
    })
    failing: dict[str, list[int]] = {}
    for r in result.results:
        rule = r.expectation_config.meta["rule"]
        if r.exception_info and r.exception_info.get("raised_exception"):
            raise RuntimeError(f"validation rule {rule} could not be evaluated: "
                               f"{r.exception_info.get('exception_message')}")
        if r.success:
            failing[rule] = []
            continue
        ids = r.result.get("unexpected_index_list")
        if ids is None:
            raise RuntimeError(f"validation rule {rule} failed without naming the failing rows")
        failing[rule] = [int(row_no) for entry in ids for row_no in entry[_ROW_NO]]
    missing = [r.name for r in rules if r.name not in failing]
    if missing:
        raise RuntimeError(f"validation rule {missing[0]} was not evaluated")
    return [failing[r.name] for r in rules]
