"""Figures of direction geometry: PC1 vs PC2 coloured by human valence (PNG and interactive HTML).

Example:
    >>> save_plots(analyze(dirs), "runs/x/figures/dense", title="dense directions, layer 20")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .. import emotions as emo
from ..files import save_figure, write_text
from ..geometry import Geometry


def valence_arousal_figure(geo: Geometry, title: str = "") -> Any:
    """Matplotlib figure: PC1 vs PC2 of the directions, each word coloured by its human valence."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 9))
    val = np.array([emo.get(n).valence if n in emo.NAMES and emo.get(n).valence else np.nan for n in geo.names])
    rated = ~np.isnan(val)
    sc = ax.scatter(geo.scores[rated, 0], geo.scores[rated, 1], c=val[rated], cmap="coolwarm_r", vmin=1.5,
                    vmax=8.5, s=22, edgecolors="k", linewidths=0.3)
    ax.scatter(geo.scores[~rated, 0], geo.scores[~rated, 1], c="lightgrey", s=22, edgecolors="k", linewidths=0.3)
    for i, n in enumerate(geo.names):
        ax.annotate(n, (geo.scores[i, 0], geo.scores[i, 1]), fontsize=6.5, alpha=0.85,
                    xytext=(2, 2), textcoords="offset points")
    fig.colorbar(sc, ax=ax, label="human valence (Warriner, 1-9; grey: unrated)")
    ax.set_xlabel(f"PC1 ({geo.explained[0]:.0%} var)  r(valence) = {geo.valence_r:.2f}")
    ax.set_ylabel(f"PC2 ({geo.explained[1]:.0%} var)  r(arousal) = {geo.arousal_r:.2f}")
    ax.set_title(title or "Emotion directions: PC1 vs PC2")
    ax.axhline(0, color="grey", lw=0.5)
    ax.axvline(0, color="grey", lw=0.5)
    fig.tight_layout()
    return fig


def valence_arousal_html(geo: Geometry, title: str = "") -> str:
    """Interactive (plotly) scatter of PC1/PC2 as an HTML fragment; plotly.js is not included."""
    import plotly.graph_objects as go

    rated = [i for i, n in enumerate(geo.names) if n in emo.NAMES and emo.get(n).valence is not None]
    unrated = [i for i in range(len(geo.names)) if i not in set(rated)]

    def trace(rows: list[int], color: Any, name: str) -> Any:
        hover = [f"{geo.names[i]}<br>valence {emo.get(geo.names[i]).valence if geo.names[i] in emo.NAMES else None}"
                 f"<br>arousal {emo.get(geo.names[i]).arousal if geo.names[i] in emo.NAMES else None}" for i in rows]
        return go.Scatter(x=geo.scores[rows, 0], y=geo.scores[rows, 1], mode="markers+text", name=name,
                          text=[geo.names[i] for i in rows], hovertext=hover, hoverinfo="text",
                          textposition="top center", textfont={"size": 9}, marker=color)

    fig = go.Figure([
        trace(rated, {"color": [emo.get(geo.names[i]).valence for i in rated], "colorscale": "RdBu", "cmin": 1.5,
                      "cmax": 8.5, "size": 8, "colorbar": {"title": "valence"}}, "rated"),
        trace(unrated, {"color": "lightgrey", "size": 8}, "no rating"),
    ])
    fig.update_layout(title=title or "Emotion directions: PC1 vs PC2", width=1000, height=800,
                      xaxis_title=f"PC1 (r valence {geo.valence_r:.2f})",
                      yaxis_title=f"PC2 (r arousal {geo.arousal_r:.2f})")
    return fig.to_html(full_html=False, include_plotlyjs=False)


def save_plots(geo: Geometry, out_dir: Path | str, title: str = "") -> dict[str, str]:
    """Write geometry.png and geometry.html (standalone, plotly.js inlined) into ``out_dir``."""
    import matplotlib.pyplot as plt
    import plotly.offline

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fig = valence_arousal_figure(geo, title)
    save_figure(out / "geometry.png", fig, dpi=110)
    plt.close(fig)
    js = plotly.offline.get_plotlyjs()
    write_text(out / "geometry.html",
        f"<html><head><meta charset='utf-8'><script>{js}</script></head><body>"
        f"{valence_arousal_html(geo, title)}</body></html>")
    return {"png": str(out / "geometry.png"), "html": str(out / "geometry.html")}
