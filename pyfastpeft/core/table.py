"""The one table formatter of the library, the tools and the benchmarks: aligned plain text, or Markdown."""
from __future__ import annotations

from typing import Any, Optional, Sequence


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, align: Optional[Sequence[str]] = None,
          markdown: bool = False) -> str:
    """A table of ``rows`` under ``headers``; a ``None`` cell is empty, any other is ``str(cell)``.

    Plain text: columns padded to their widest cell and separated by two spaces, a dashed rule under
    the header, trailing blanks stripped. Markdown: ``| a | b |`` rows under a ``|---|---|`` rule, cells
    not padded.

    Args:
        align: one ``"<"`` (left, the default) or ``">"`` (right) per column, e.g. ``"<<>>"``; in
            Markdown a right-aligned column's rule is ``---:``.
    """
    align = list(align) if align is not None else ["<"] * len(headers)
    if len(align) != len(headers) or set(align) - {"<", ">"}:
        raise ValueError(f"align must give '<' or '>' for each of the {len(headers)} columns, got {align!r}")
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    if markdown:
        rule = "|" + "|".join("---:" if a == ">" else "---" for a in align) + "|"
        lines = ["| " + " | ".join(r) + " |" for r in cells]
        lines.insert(1, rule)
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) if a == ">" else c.ljust(w) for c, w, a in zip(r, widths, align)).rstrip()
             for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
