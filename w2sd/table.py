"""Plain-text tables for the terminal (aligned columns, numbers right-aligned)."""

from __future__ import annotations

from typing import Mapping, Sequence


def _fmt(v: object, digits: int) -> str:
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return "-" if v is None else str(v)


def format_table(rows: Sequence[Mapping[str, object]], columns: Sequence[str] | None = None,
                 headers: Mapping[str, str] | None = None, digits: int = 4) -> str:
    """Render ``rows`` (dicts) as an aligned table; missing cells show ``-``."""
    if not rows:
        return "(no rows)"
    columns = list(columns or dict.fromkeys(k for r in rows for k in r))
    headers = headers or {}
    cells = [[_fmt(r.get(c), digits) for c in columns] for r in rows]
    heads = [headers.get(c, c) for c in columns]
    widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(heads)]
    numeric = [all(isinstance(r.get(c), (int, float)) or r.get(c) is None for r in rows) for c in columns]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(heads), sep, *(line(r) for r in cells)])
