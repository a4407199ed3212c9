"""A griffe extension for the API reference: doctest examples become code blocks.

The package's docstrings show examples as plain doctests (``>>> Pool([...]).upstreams``),
which ``help()`` and doctest read as they are. Markdown would read them as quoted text
(``>``) and their output as links (``['http://...']``), so each run of ``>>>`` lines with
its output is fenced as ``pycon`` before mkdocstrings renders the docstring.
"""

from __future__ import annotations

from typing import Any

import griffe


def fence_doctests(text: str) -> str:
    lines = text.splitlines()
    out: list[str] = []
    in_example = False
    fenced = False  # inside a ``` block the docstring wrote itself
    for line in lines:
        stripped = line.lstrip()
        if stripped.startswith("```"):
            fenced = not fenced
        if not fenced and not in_example and stripped.startswith(">>>"):
            out.append(line[: len(line) - len(stripped)] + "```pycon")
            in_example = True
        elif in_example and not stripped:
            out.append(out[-1][: len(out[-1]) - len(out[-1].lstrip())] + "```")
            in_example = False
        out.append(line)
    if in_example:
        out.append("```")
    return "\n".join(out)


class DoctestFences(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None and ">>>" in obj.docstring.value:
            obj.docstring.value = fence_doctests(obj.docstring.value)
