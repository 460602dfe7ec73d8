"""The findings box as one figure: each headline number with its 95% interval, its null band and the
paper's value, a panel per result. The report shows it above the box's table; the README's hero
image is this figure drawn from a run (`scripts/readme_tables.py`).

Example:
    >>> fig = findings_figure(headline(metrics, direction_sets(metrics, manifest)), title="layer 20")
    >>> fig.savefig("findings.png")
"""

from __future__ import annotations

import io
import textwrap
from collections.abc import Sequence

from ..keys import lookup
from .findings import Finding

BEYOND, WITHIN, NO_NULL = "#1b7837", "#d95f02", "#444444"
"""Marker colours: beyond the null (one-sided 5%), within it, no null measured."""
LABEL_WIDTH = 58
"""Characters per line of a row's label."""


def _paper_value(f: Finding) -> float | None:
    try:
        return float(f.paper)
    except ValueError:
        return None


def figure_title(metrics: dict) -> str:
    """'Findings: MODEL, layer L' from a run's metrics."""
    return f"Findings: {lookup(metrics, 'model.id') or 'model'}, layer {lookup(metrics, 'model.layer')}"


def findings_figure(rows: Sequence[Finding], title: str = ""):
    """A panel per group of ``rows`` (in their order): per row, the null's 5-95% band (grey) and mean
    (grey tick), the value (green: beyond the null on the predicted side; orange: within) with its
    95% bootstrap interval, and the paper's value (red star) where it is a number."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[Finding]] = {}
    for f in rows:
        groups.setdefault(f.group or "other", []).append(f)
    if not groups:
        raise ValueError("no headline numbers to draw: the run has no findings yet")
    heights = [len(g) + 1.2 for g in groups.values()]
    fig, axes = plt.subplots(len(groups), 1, figsize=(11, 0.42 * sum(heights) + 0.6),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    for ax, (name, group) in zip(axes[:, 0], groups.items()):
        ys = list(range(len(group)))[::-1]
        for y, f in zip(ys, group):
            if f.null:
                ax.barh(y, f.null["p95"] - f.null["p05"], left=f.null["p05"], height=0.55, color="#dddddd", zorder=1)
                ax.plot([f.null["mean"]] * 2, [y - 0.3, y + 0.3], color="#888888", lw=1.5, zorder=2)
            if f.ci:
                ax.plot([f.ci["lower"], f.ci["upper"]], [y, y], color="black", lw=1.5, zorder=3)
            colour = {True: BEYOND, False: WITHIN, None: NO_NULL}[f.beyond_null]
            ax.plot(f.value, y, "o", color=colour, ms=7, zorder=4)
            paper = _paper_value(f)
            if paper is not None:
                ax.plot(paper, y, "*", color="#c51b1b", ms=12, zorder=5)
        ax.axvline(0, color="#bbbbbb", lw=0.8, zorder=0)
        ax.set_yticks(ys, [textwrap.fill(f.measure, LABEL_WIDTH) for f in group], fontsize=8)
        ax.set_ylim(-0.7, len(group) - 0.3)
        ax.set_title(name, loc="left", fontsize=10, fontweight="bold")
        ax.tick_params(axis="x", labelsize=8)
    handles = [plt.Line2D([], [], marker="o", ls="", color=BEYOND, label="this run, beyond the null"),
               plt.Line2D([], [], marker="o", ls="", color=WITHIN, label="this run, within the null"),
               plt.Line2D([], [], color="black", label="95% bootstrap interval"),
               plt.Rectangle((0, 0), 1, 1, color="#dddddd", label="null 5-95%"),
               plt.Line2D([], [], marker="*", ls="", color="#c51b1b", ms=10, label="paper")]
    fig.legend(handles=handles, loc="lower center", ncol=5, fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.35 / fig.get_figheight(), 1, 1))
    return fig


def findings_png(rows: Sequence[Finding], title: str = "", dpi: int = 110) -> bytes:
    """`findings_figure` as PNG bytes (the report inlines them)."""
    import matplotlib.pyplot as plt

    fig = findings_figure(rows, title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()
