"""Figures, and their rendering as a text table (terminal) or Markdown (README)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Figure:
    """One measured value; `goal` is a sentence like "<= 5 ms", `met` whether the value meets it."""

    section: str
    name: str
    value: float | None
    unit: str
    goal: str = ""
    met: bool | None = None
    note: str = ""

    @property
    def shown(self) -> str:
        if self.value is None:
            return "skipped"
        digits = 0 if abs(self.value) >= 100 else 1 if abs(self.value) >= 10 else 2
        return f"{self.value:.{digits}f} {self.unit}".strip()

    @property
    def verdict(self) -> str:
        return {True: "met", False: "MISSED", None: ""}[self.met]


def goal(
    section: str, name: str, value: float | None, unit: str, text: str, check: Callable[[float], bool], note: str = ""
) -> Figure:
    """A figure with a goal; `check` says whether the value meets it."""
    met = None if value is None else bool(check(value))
    return Figure(section, name, value, unit, text, met, note)


def info(section: str, name: str, value: float | None, unit: str, note: str = "") -> Figure:
    return Figure(section, name, value, unit, note=note)


def _rows(figures: list[Figure]) -> list[tuple[str, ...]]:
    return [(f.section, f.name, f.shown, f.goal, f.verdict, f.note) for f in figures]


HEADER = ("benchmark", "figure", "value", "goal", "", "note")


def text_table(figures: list[Figure]) -> str:
    rows = [HEADER, *_rows(figures)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER) - 1)]
    lines = []
    previous = ""
    for index, row in enumerate(rows):
        section = row[0] if row[0] != previous or index == 0 else ""
        previous = row[0]
        cells = [section.ljust(widths[0])] + [cell.ljust(w) for cell, w in zip(row[1:-1], widths[1:], strict=True)]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(figures: list[Figure]) -> str:
    lines = ["| " + " | ".join(HEADER[:4]) + " | met | note |", "|---|---|---:|---|---|---|"]
    previous = ""
    for row in _rows(figures):
        section = row[0] if row[0] != previous else ""
        previous = row[0]
        lines.append("| " + " | ".join((section, *row[1:])).replace("\n", " ") + " |")
    return "\n".join(lines)
