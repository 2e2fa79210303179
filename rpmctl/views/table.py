"""The CLI's one table renderer (tabulate): aligned columns, numbers right-aligned, a missing value as "-",
and stored strings shown with control characters escaped, so a hostile value cannot forge a terminal line."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from tabulate import tabulate

from rpmctl.errors import printable


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], empty: str = "",
          right: Sequence[bool] | None = None) -> str:
    """``right``: per column, whether to right-align it (default: tabulate's choice, numbers right)."""
    cells = [[printable(v) if isinstance(v, str) else v for v in row] for row in rows]
    if not cells:
        return empty
    align = [("right" if r else "left") for r in right] if right is not None else None
    return tabulate(cells, headers=list(headers), tablefmt="simple", missingval="-", disable_numparse=True,
                    colalign=align)
