"""The one table ``run_all.py`` prints: a row per figure, with its reference and ratio."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Row:
    target: str
    what: str
    figure: str
    reference: str
    #: figure / reference (for latencies and rates the same way round), or None.
    ratio: float | None
    goal: str
    #: True / False against the goal; None: no goal, for information.
    met: bool | None
    #: The same ratio per round, where the two ran in the same round.
    per_round: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def render(rows: list[Row]) -> str:
    header = ("target", "measure", "figure", "reference", "ratio", "goal", "", "per round")
    cells = [
        (
            r.target,
            r.what,
            r.figure,
            r.reference,
            "" if r.ratio is None else f"{r.ratio:.2f}x",
            r.goal,
            "" if r.met is None else ("ok" if r.met else "MISSED"),
            " ".join(f"{v:.2f}" for v in r.per_round),
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in [header, *cells]) for i in range(len(header))]
    lines = []
    for n, row in enumerate([header, *cells]):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if n == 0:
            lines.append("-" * len(lines[0]))
    return "\n".join(lines)
