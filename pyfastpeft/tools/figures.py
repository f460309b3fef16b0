"""Writing the tools' figures: one place that turns a figure (or the reason there is none) into a PNG."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional


def save(fig: Any, path: Path, dpi: int = 100) -> Optional[str]:
    """Write ``fig`` to ``path`` and close it. ``fig`` may be a string saying why no figure could be drawn
    (matplotlib missing, nothing to plot); that string is returned and nothing is written. None on success."""
    if isinstance(fig, str):
        return fig
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return None
