"""What the CLI prints for a person: a JSON-able value as aligned text (pure, no I/O).

``key: value`` lines aligned per level, nested levels indented, flat rows as a small table;
``--json`` prints the same value as JSON instead (:mod:`ml.cli`, docs/cli.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def _is_scalar(value: Any) -> bool:
    """A value printed on its key's line (an empty list or dict prints as ``-``)."""
    return not isinstance(value, Mapping | list) or not value


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, str | Mapping | list) and not value):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def human_lines(value: Any, indent: int = 0) -> list[str]:
    """A JSON-able value as text: ``key: value`` lines aligned per level, flat rows as a table."""
    pad = " " * indent
    if isinstance(value, Mapping):
        if not value:
            return [f"{pad}(none)"]
        width = max(len(str(key)) for key in value) + 1
        lines: list[str] = []
        for key, item in value.items():
            if _is_scalar(item):
                lines.append(f"{pad}{f'{key}:':<{width}} {_cell(item)}".rstrip())
            else:
                lines.append(f"{pad}{key}:")
                lines.extend(human_lines(item, indent + 2))
        return lines
    if isinstance(value, list):
        if not value:
            return [f"{pad}(none)"]
        if all(isinstance(row, Mapping) and all(map(_is_scalar, row.values())) for row in value):
            return _table(value, pad)
        if all(map(_is_scalar, value)):
            return [f"{pad}- {_cell(item)}" for item in value]
        blocks: list[str] = []
        for i, item in enumerate(value):
            blocks.extend([""] * (i > 0) + human_lines(item, indent))
        return blocks
    return [f"{pad}{_cell(value)}"]


def _table(rows: list[Mapping[str, Any]], pad: str) -> list[str]:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    cells = [columns] + [
        [_cell(row.get(col)).replace("\n", " ") for col in columns] for row in rows
    ]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return [
        pad + "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
        for line in cells
    ]
