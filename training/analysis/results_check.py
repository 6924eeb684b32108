"""`worldplan results check`: every figure quoted in docs/results.md equals the one in the
result file it names.

A checked figure sits in a markdown table with a `figure` column and a `source` column. The
source is one code span, `results/DIR/FILE.json#/json/pointer`: a result file and an
RFC 6901 pointer into it. The figure is one of:
- `95 [89, 98]`, a success rate and its 95% interval, in percent: the pointer names an
  object with `success` and `interval` (fractions);
- `4 of 5`, a count: an object with `success` (a fraction) and `episodes`;
- a number with an optional unit (`10.1 ms`, `1,564 s`, `7.7×`): a JSON number, equal to
  the figure once rounded to the figure's decimals.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RATE = re.compile(r"^(-?\d+) \[(-?\d+), (-?\d+)\]$")
COUNT = re.compile(r"^(\d+) of (\d+)$")
NUMBER = re.compile(r"^(-?[\d,]*\.?\d+)(?:\s*\S+)?$")
SOURCE = re.compile(r"^`([^`#]+\.json)#(/[^`]*)?`$")


@dataclass(frozen=True)
class Figure:
    line: int  # 1-based, in the page
    figure: str  # as the page writes it, bold removed
    source: str  # the source cell


def table_cells(line: str) -> list[str]:
    """The cells of a markdown table row (pipes inside code spans are not split on)."""
    cells, cell, in_code = [], "", False
    for char in line.strip().strip("|"):
        if char == "`":
            in_code = not in_code
        if char == "|" and not in_code:
            cells.append(cell.strip())
            cell = ""
        else:
            cell += char
    return [*cells, cell.strip()]


def quoted_figures(text: str) -> list[Figure]:
    """Every row of every table that has a `figure` and a `source` column."""
    figures = []
    lines = text.splitlines()
    header: list[str] | None = None
    for number, line in enumerate(lines, 1):
        if not line.lstrip().startswith("|"):
            header = None
            continue
        cells = table_cells(line)
        if header is None:
            header = [cell.lower() for cell in cells]
            continue
        if all(set(cell) <= set("-: ") for cell in cells):  # the |---| row
            continue
        if "figure" in header and "source" in header:
            figure = cells[header.index("figure")].replace("**", "").strip()
            figures.append(Figure(number, figure, cells[header.index("source")]))
    return figures


def resolve(document: Any, pointer: str) -> Any:
    """The value at an RFC 6901 JSON pointer ("" is the whole document)."""
    value = document
    for token in pointer.split("/")[1:] if pointer else []:
        key = token.replace("~1", "/").replace("~0", "~")
        value = value[int(key)] if isinstance(value, list) else value[key]
    return value


def decimals(text: str) -> int:
    return len(text.split(".")[1]) if "." in text else 0


def mismatch(figure: str, value: Any) -> str | None:
    """Why `figure` is not what `value` says, or None when it is."""
    if rate := RATE.match(figure):
        if not (isinstance(value, dict) and "success" in value and "interval" in value):
            return "a rate needs an object with success and interval"
        shown = [round(100 * x) for x in (value["success"], *value["interval"])]
        written = [int(x) for x in rate.groups()]
        return None if shown == written else f"the file says {shown[0]} [{shown[1]}, {shown[2]}]"
    if count := COUNT.match(figure):
        if not (isinstance(value, dict) and "success" in value and "episodes" in value):
            return "a count needs an object with success and episodes"
        shown = (round(value["success"] * value["episodes"]), value["episodes"])
        written = tuple(int(x) for x in count.groups())
        return None if shown == written else f"the file says {shown[0]} of {shown[1]}"
    if number := NUMBER.match(figure):
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"a number needs a JSON number, the file holds {type(value).__name__}"
        text = number.group(1).replace(",", "")
        shown = round(float(value), decimals(text))
        return None if abs(shown - float(text)) < 1e-9 else f"the file says {shown}"
    return "not a figure the check reads (N [L, U], K of N, or a number)"


def check_page(page: Path, root: Path) -> tuple[int, list[str]]:
    """The number of figures checked and a line for each that fails."""
    problems = []
    figures = quoted_figures(page.read_text())
    documents: dict[Path, Any] = {}
    for fig in figures:
        where = f"{page}:{fig.line}"
        source = SOURCE.match(fig.source)
        if not source:
            problems.append(f"{where}: source {fig.source!r} is not `results/FILE.json#/pointer`")
            continue
        path = root / source.group(1)
        if path not in documents:
            if not path.is_file():
                problems.append(f"{where}: {source.group(1)} does not exist")
                continue
            documents[path] = json.loads(path.read_text())
        try:
            value = resolve(documents[path], source.group(2) or "")
        except (KeyError, IndexError, ValueError, TypeError):
            problems.append(f"{where}: {source.group(1)} holds nothing at {source.group(2)}")
            continue
        if why := mismatch(fig.figure, value):
            problems.append(f"{where}: {fig.figure!r}: {why}")
    return len(figures), problems
