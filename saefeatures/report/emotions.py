"""The report's detection confusion matrices and its per-emotion sections: each emotion's detection
by every direction set, its SAE latents, and its steered continuations beside the unsteered ones.

Example:
    >>> confusion_html(detection["confusion_clusters"], "dense: true cluster (rows) vs predicted")
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from typing import Any

from ..evals.steering_suite import SteeringResult
from .steering import samples_html


def anchor(name: str) -> str:
    """The HTML id of an emotion's section ('at ease' -> 'emotion-at-ease')."""
    return "emotion-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def confusion_html(conf: dict[str, Any], caption: str) -> str:
    """A confusion matrix (rows true, columns predicted) with row totals; each cell shaded by its
    share of the row, the diagonal in green."""
    labels, matrix = conf["labels"], conf["matrix"]
    head = "".join(f"<th title='{html.escape(lab)}'>{html.escape(lab[:14])}</th>" for lab in labels)
    rows = []
    for i, (lab, row) in enumerate(zip(labels, matrix)):
        total = sum(row)
        cells = []
        for j, count in enumerate(row):
            share = count / total if total else 0.0
            colour = "40,160,60" if i == j else "220,60,40"
            cells.append(f"<td style='background:rgba({colour},{share:.2f})'>{count or ''}</td>")
        rows.append(f"<tr><th>{html.escape(lab)}</th>{''.join(cells)}<td><b>{total}</b></td></tr>")
    return (f"<p class='note'>{html.escape(caption)}</p><div style='overflow-x:auto'><table class='confusion'>"
            f"<tr><th>true \\ predicted</th>{head}<th>records</th></tr>{''.join(rows)}</table></div>")


def latents_html(latents: Sequence[Sequence[float]], linked: set[int]) -> str:
    """An emotion's SAE latents with their weights; ids with a section on the page link to it."""
    def one(i: int, w: float) -> str:
        text = f"{i} ({w:.2f})"
        return f"<a href='#latent-{i}'>{text}</a>" if i in linked else text
    return ", ".join(one(int(i), float(w)) for i, w in latents) or "&ndash;"


def emotion_sections(names: Sequence[str], detections: dict[str, dict[str, dict[str, float]]],
                     latents: dict[str, list], steering: SteeringResult | None, linked: set[int]) -> str:
    """One collapsible section per emotion (id `anchor`): detection by each direction set
    (``detections``: label -> per-emotion table), its SAE latents, and steered text samples."""
    steered = {c.emotion for c in steering.curves} if steering is not None else set()
    out = []
    for name in names:
        rows, warn = [], False
        for label, per in detections.items():
            d = per.get(name)
            if d is None:
                continue
            own, neutral = d.get("own_mean"), d.get("neutral_mean")
            below = own is not None and neutral is not None and own < neutral
            warn |= below
            cells = [f"{d['auroc']:.3f}", f"{d['top1']:.3f}", str(int(d["n"])),
                     "&ndash;" if own is None else f"{own:.3f}", "&ndash;" if neutral is None else f"{neutral:.3f}"]
            rows.append(f"<tr><td>{html.escape(label)}{' &#9888;' if below else ''}</td>"
                        + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
        parts = []
        if rows:
            parts.append("<table><tr><th>directions</th><th>AUROC</th><th>top-1</th><th>test records</th>"
                         "<th>mean read-out, own stories</th><th>mean read-out, neutral texts</th></tr>"
                         + "".join(rows) + "</table>")
        if name in latents:
            parts.append(f"<p>SAE latents (weight): {latents_html(latents[name], linked)}</p>")
        if name in steered:
            parts.append(samples_html(steering, name))
        if not parts:
            continue
        flag = " &#9888; reads below neutral" if warn else ""
        out.append(f"<details id='{anchor(name)}'><summary>{html.escape(name)}{flag}</summary>{''.join(parts)}</details>")
    return "".join(out)
