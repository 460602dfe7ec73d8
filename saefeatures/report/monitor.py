"""Renderings of a monitor trace: a token heat-map (HTML) and per-emotion lines (figure).

Example:
    >>> html = trace_html(trace_chat(model, dense, chat), "afraid", calib)
"""

from __future__ import annotations

import html
from collections.abc import Sequence

import numpy as np

from ..monitor import Calibration, Trace


def trace_html(trace: Trace, emotion: str, calib: Calibration | None = None, scale: float | None = None) -> str:
    """Heat-map of one emotion over the tokens (red above neutral, blue below), turns on new lines."""
    values = (calib.z(trace) if calib else trace.projections)[:, trace.names.index(emotion)]
    vmax = scale or float(np.nanmax(np.abs(values.numpy()[1:]))) or 1.0
    parts, last_turn = [], None
    for i, (tok, v) in enumerate(zip(trace.tokens, values.tolist())):
        if trace.turns[i] != last_turn:
            parts.append(f"<br><b>[{html.escape(trace.roles[i])}]</b> ")
            last_turn = trace.turns[i]
        if np.isnan(v):
            color = "transparent"
        else:
            a = min(1.0, abs(v) / vmax)
            color = f"rgba(220,40,40,{a:.2f})" if v > 0 else f"rgba(40,80,220,{a:.2f})"
        parts.append(f"<span style='background:{color}' title='{emotion}: {v:.2f}'>{html.escape(tok)}</span>")
    unit = "z vs neutral" if calib else "projection"
    return f"<div style='line-height:1.7;font-family:monospace;font-size:12px'><i>{html.escape(emotion)} ({unit})</i>{''.join(parts)}</div>"


def trace_figure(trace: Trace, emotions: Sequence[str], calib: Calibration | None = None, window: int = 1):
    """Line plot of each emotion along the tokens, with turn boundaries as vertical lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = calib.z(trace) if calib else trace.projections
    t = Trace(trace.tokens, trace.token_ids, trace.roles, trace.turns, trace.content, trace.names, values)
    series = t.rolling(window) if window > 1 else values
    fig, ax = plt.subplots(figsize=(11, 3.5))
    for name in emotions:
        y = series[:, trace.names.index(name)].numpy().copy()
        y[0] = np.nan
        ax.plot(y, label=name, lw=1.2)
    for i in range(1, len(trace.turns)):
        if trace.turns[i] != trace.turns[i - 1]:
            ax.axvline(i, color="grey", lw=0.6, ls=":")
            ax.text(i, ax.get_ylim()[1], trace.roles[i], fontsize=7, va="top")
    ax.set_xlabel("token")
    ax.set_ylabel("z vs neutral" if calib else "projection")
    ax.legend(fontsize=8, ncol=len(emotions))
    fig.tight_layout()
    return fig
