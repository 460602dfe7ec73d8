"""Renderings of a monitor trace: a token heat-map (HTML) and per-emotion lines (figure).

Example:
    >>> html = trace_html(trace_chat(model, dense, chat), "afraid", calib)
"""

from __future__ import annotations

import base64
import html
import io
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


MAX_TICKS = 160
"""Most token labels on a trace figure's axis; longer traces show every n-th token."""


def token_label(token: str) -> str:
    """A token as an axis label: whitespace made visible, long tokens cut."""
    text = token.replace("\n", "\u21b5").replace(" ", "\u00b7")
    return text if len(text) <= 14 else text[:13] + "\u2026"


def trace_page(trace: Trace, emotions: Sequence[str], calib: Calibration | None = None, title: str = "",
               window: int = 1, notes: Sequence[str] = ()) -> str:
    """A self-contained HTML page of a trace: the line figure (inline PNG) and one token heat-map
    per emotion (hover a token for its value)."""
    import matplotlib.pyplot as plt

    fig = trace_figure(trace, emotions, calib, window=window)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    png = base64.b64encode(buf.getvalue()).decode()
    parts = [f"<h1>{html.escape(title or 'Monitor trace')}</h1>"]
    parts += [f"<p style='color:#666;font-size:13px'>{html.escape(n)}</p>" for n in notes]
    parts.append(f"<img alt='trace' style='max-width:100%' src='data:image/png;base64,{png}'>")
    parts += [f"<h3>{html.escape(e)}</h3>{trace_html(trace, e, calib)}" for e in emotions]
    return ("<!doctype html><html><head><meta charset='utf-8'><title>saefeatures monitor</title></head>"
            f"<body style='font-family:system-ui,sans-serif;max-width:1150px;margin:20px auto'>{''.join(parts)}</body></html>")


def trace_figure(trace: Trace, emotions: Sequence[str], calib: Calibration | None = None, window: int = 1):
    """Line plot of each emotion along the tokens, with turn boundaries as vertical lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = calib.z(trace) if calib else trace.projections
    t = Trace(trace.tokens, trace.token_ids, trace.roles, trace.turns, trace.content, trace.names, values)
    series = t.rolling(window) if window > 1 else values
    fig, ax = plt.subplots(figsize=(11, 4.2))
    for name in emotions:
        y = series[:, trace.names.index(name)].numpy().copy()
        y[0] = np.nan
        ax.plot(y, label=name, lw=1.2)
    for i in range(1, len(trace.turns)):
        if trace.turns[i] != trace.turns[i - 1]:
            ax.axvline(i, color="grey", lw=0.6, ls=":")
            ax.text(i, ax.get_ylim()[1], trace.roles[i], fontsize=7, va="top")
    if trace.roles and trace.turns[0] != trace.turns[-1]:
        ax.text(0, ax.get_ylim()[1], trace.roles[0], fontsize=7, va="top")
    every = max(1, -(-len(trace.tokens) // MAX_TICKS))  # the tokens themselves, thinned to fit
    ticks = list(range(0, len(trace.tokens), every))
    ax.set_xticks(ticks, [token_label(trace.tokens[i]) for i in ticks], rotation=90, fontsize=6)
    ax.set_xlim(-0.5, len(trace.tokens) - 0.5)
    ax.set_xlabel("token" if every == 1 else f"token (every {every}th shown)")
    ax.set_ylabel("z vs neutral" if calib else "projection")
    ax.legend(fontsize=8, ncol=len(emotions))
    fig.tight_layout()
    return fig
