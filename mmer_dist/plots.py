"""Matplotlib without pyplot: a Figure bound to the Agg canvas and a PNG writer, for every plot of the project.

    fig = agg_figure(6, 4)
    fig.add_subplot().bar(names, values)
    save_png(fig, out / "plot.png")

No global backend switch, no display needed (CI, Slurm nodes); matplotlib is imported on first use.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def agg_figure(width: float, height: float) -> "Figure":
    """A Figure bound to the Agg canvas: no pyplot, no global backend switch."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: "Figure", path: str | Path) -> "Figure":
    """Save `fig` as a PNG at `path` (parent folders created); returns the Figure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return fig
