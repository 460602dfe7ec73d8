"""Figures of the steering evaluations (dose-response curves, preference shifts, the pressure probe),
and steered continuations beside the unsteered ones for reading.

Example:
    >>> save_steering_plots(result, "runs/x/figures/steering")
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import numpy as np

from ..evals.dose_response import MEASURES
from ..evals.steering_suite import SteeringResult
from ..files import save_figure


def steering_figures(result: SteeringResult) -> dict[str, Any]:
    """Matplotlib figures by name ('dose_response', 'preference', 'pressure') for the HTML report."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs: dict[str, Any] = {}
    emotions = list(dict.fromkeys(c.emotion for c in result.curves))
    if emotions:
        fig, axes = plt.subplots(len(emotions), len(MEASURES), figsize=(3.2 * len(MEASURES), 2.6 * len(emotions)),
                                 squeeze=False)
        for r, e in enumerate(emotions):
            for c in (c for c in result.curves if c.emotion == e):
                xs = [p.strength for p in c.points]
                for k, (attr, label) in enumerate(MEASURES):
                    ys = [np.nan if getattr(p, attr) is None else getattr(p, attr) for p in c.points]
                    axes[r, k].plot(xs, ys, marker="o", label=c.method)
            for k, (attr, label) in enumerate(MEASURES):
                ax = axes[r, k]
                ax.set_title(f"{e}: {label}", fontsize=9)
                ax.set_xlabel("strength (x residual norm)", fontsize=8)
                if attr == "ppl_ratio":
                    ax.axhline(result.ppl_limit, color="grey", linestyle="--", linewidth=1)
            axes[r, 0].legend(fontsize=7)
        fig.tight_layout()
        figs["dose_response"] = fig
    if result.preference is not None:
        p = result.preference
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6))
        x = p.projections.get(p.positive)
        if x is not None:
            colors = {1: "tab:green", 0: "tab:grey", -1: "tab:red"}
            ax1.scatter(x, p.win_rate, c=[colors[t] for t in p.tones], s=18)
            ax1.set_xlabel(f"activity projection on '{p.positive}'")
            ax1.set_ylabel("win rate (unsteered)")
            ax1.set_title("activities: green pleasant, red unpleasant", fontsize=9)
        labels = ["positive", "negative"]
        ax2.bar([f"+{p.positive}", f"+{p.negative}"], [p.p_a[k] - p.p_a["none"] for k in labels],
                yerr=[p.shift_se.get(k, 0.0) for k in labels], color=["tab:green", "tab:red"], capsize=4)
        ax2.axhline(0, color="grey", linewidth=1)
        ax2.set_ylabel("change in mean P(choose A)")
        ax2.set_title(f"steering on option A at {p.strength} x norm (unsteered P(A) {p.p_a['none']:.3f})",
                      fontsize=9)
        fig.tight_layout()
        figs["preference"] = fig
    if result.pressure is not None:
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        for e in result.pressure.emotions:
            line, = ax.plot(result.pressure.failing[e], marker="o", label=f"{e} (tests fail)")
            ax.plot(result.pressure.control[e], marker="x", linestyle="--", color=line.get_color(),
                    label=f"{e} (tests pass)")
        ax.set_xlabel("turn (failed test runs so far)")
        ax.set_ylabel("projection at reply start")
        ax.set_title("impossible-task pressure probe", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        figs["pressure"] = fig
    return figs


def save_steering_plots(result: SteeringResult, out_dir: Path | str) -> dict[str, str]:
    """Write each figure of `steering_figures` as ``<name>.png`` into ``out_dir``; returns the paths."""
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, fig in steering_figures(result).items():
        path = out / f"{name}.png"
        save_figure(path, fig, dpi=110)
        plt.close(fig)
        paths[name] = str(path)
    return paths


def samples_html(result: SteeringResult, emotion: str, n: int = 4) -> str:
    """A table of the first ``n`` continuations of ``emotion``'s curves: each prompt, the unsteered
    continuation, and the continuation under each method at its strongest fluent strength (else its
    strongest), row by row. Empty when no texts were kept."""
    curves = [c for c in result.curves if c.emotion == emotion and c.points and c.points[0].texts]
    if not curves:
        return ""
    columns = []
    for c in curves:
        fluent = [p for p in c.points[1:] if p.ppl_ratio < result.ppl_limit]
        top = (fluent or c.points[1:] or c.points)[-1]
        columns.append((f"{c.method} at {top.strength:g} x norm (ppl x{top.ppl_ratio:.2f})", top.texts))
    base = curves[0].points[0].texts
    head = "".join(f"<th>{html.escape(t)}</th>" for t in ["prompt", "unsteered", *(name for name, _ in columns)])
    rows = []
    for i in range(min(n, len(base))):
        prompt = result.prompts[i] if i < len(result.prompts) else ""
        cells = [prompt, base[i], *(texts[i] if i < len(texts) else "" for _, texts in columns)]
        rows.append("<tr>" + "".join(f"<td style='text-align:left;vertical-align:top'>{html.escape(t)}</td>"
                                     for t in cells) + "</tr>")
    return (f"<p class='note'>Steered toward '{html.escape(emotion)}' vs unsteered, the same prompt per row.</p>"
            f"<div style='overflow-x:auto'><table><tr>{head}</tr>{''.join(rows)}</table></div>")
