"""The findings box that opens the report: this run's headline numbers beside the paper's, each with
its 95% bootstrap interval and null baseline, and warnings where a result contradicts the method.

The intervals and nulls are computed by the stages that compute the numbers (``ci.*`` and
``null.*`` in metrics.json, `saefeatures.stats`); this module only reads and judges them.

Example:
    >>> rows = headline(metrics, [("dense", "dense"), ("sae.k16", "SAE k=16")])
    >>> warnings = flags(metrics, {"dense": detection["per_emotion"]})
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .. import emotions as emo
from ..keys import lookup

PAPER_VALENCE_R = 0.81
PAPER_AROUSAL_R = 0.66
PAPER_STEERING = "desperate: blackmail 22% → 72% (another measure)"
"""The paper's steering result: steering toward 'desperate' raised the blackmail rate."""
GEOMETRY, DETECTION, TYLENOL, STEERING = ("geometry vs human ratings", "held-out detection",
                                         "Tylenol probe", "steering")
"""The groups of headline rows, in the order the box lists them."""
MAX_LISTED = 8
"""Emotions named in one warning; the rest are counted."""


@dataclass
class Finding:
    """One headline number with its interval, its null baseline and the paper's value."""

    measure: str
    value: float | None
    ci: dict[str, float] | None
    null: dict[str, float] | None
    null_kind: str
    """What the null is (e.g. 'valence ratings shuffled over the emotions')."""
    paper: str
    expect: float = 1.0
    """The sign the method predicts: +1, the value should sit high in its null; -1, low."""
    group: str = ""
    """Which result it belongs to (geometry, detection, Tylenol probe, steering): a panel of the figure."""

    @property
    def beyond_null(self) -> bool | None:
        """Whether the value lies beyond the null's 95th percentile on the predicted side (one-sided 5%)."""
        if self.null is None or self.value is None:
            return None
        return self.null["percentile"] >= 95 if self.expect > 0 else self.null["percentile"] <= 5


def _finding(metrics: dict, section: str, key: str, measure: str, null_kind: str, paper: str,
             expect: float = 1.0, group: str = "") -> Finding | None:
    value = lookup(metrics, f"{section}.{key}")
    if not isinstance(value, (int, float)):
        return None
    return Finding(measure, float(value), lookup(metrics, f"{section}.ci.{key}"),
                   lookup(metrics, f"{section}.null.{key}"), null_kind, paper, expect, group)


def headline(metrics: dict[str, Any], sections: Sequence[tuple[str, str]]) -> list[Finding]:
    """The rows of the box: geometry and detection of each direction set in ``sections``
    ((metrics section, label)), the Tylenol probe and the steering effects, where the run has them."""
    rows: list[Finding | None] = []
    for section, label in sections:
        rows += [
            _finding(metrics, section, "valence_r", f"valence r: PC1 vs human valence ({label})",
                     "|r| with the valence ratings shuffled", f"{PAPER_VALENCE_R:.2f}", group=GEOMETRY),
            _finding(metrics, section, "arousal_r", f"arousal r: PC2 vs human arousal ({label})",
                     "|r| with the arousal ratings shuffled", f"{PAPER_AROUSAL_R:.2f}", group=GEOMETRY),
        ]
    for section, label in sections:
        rows += [
            _finding(metrics, section, "top1", f"held-out detection, top-1 ({label})",
                     "test labels shuffled", "–", group=DETECTION),
            _finding(metrics, section, "cluster_acc", f"prediction in the true cluster of 10 ({label})",
                     "test labels shuffled", "–", group=DETECTION),
        ]
    for prefix, label in (("", "dense"), ("sae_", "SAE")):
        for e, expect, paper in (("afraid", 1.0, "rises with the dose"), ("calm", -1.0, "–")):
            for suffix, what in (("", ""), ("_minus_control", " minus the vitamin C control")):
                rows.append(_finding(metrics, "probes", f"{prefix}tylenol_{e}_spearman{suffix}",
                                     f"Tylenol: Spearman of dose vs '{e}'{what} ({label})",
                                     "every order of the doses", paper if not suffix else "–", expect, TYLENOL))
    for emotion, entry in (metrics.get("steering") or {}).items():
        if not isinstance(entry, dict) or "judge_valence_spearman" not in entry:
            continue
        strength = entry.get("max_strength_ppl_ratio_under_2")
        at = f"at {strength:g} x norm" if isinstance(strength, (int, float)) else "(no fluent strength)"
        sign = entry.get("expected_valence_sign") or 1.0
        rows += [
            _finding(metrics, f"steering.{emotion}", "valence_change_at_max_fluent",
                     f"steering toward '{emotion}' {at}: change in the text's Warriner valence",
                     "strength labels shuffled", PAPER_STEERING if emotion == "desperate" else "–", sign, STEERING),
            _finding(metrics, f"steering.{emotion}", "projection_change_at_max_fluent",
                     f"steering toward '{emotion}' {at}: change in the text's '{emotion}' read-out",
                     "strength labels shuffled", "–", group=STEERING),
        ]
    return [r for r in rows if r is not None]


def _valence(name: str) -> float | None:
    return emo.get(name).valence if name in emo.NAMES else None


def _names(items: list[str]) -> str:
    more = f" and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return ", ".join(items[:MAX_LISTED]) + more


def flags(metrics: dict[str, Any], detections: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    """Warnings where a result contradicts the method: a direction that reads its own emotion's
    text below neutral text (``detections``: label -> per-emotion detection with ``own_mean`` and
    ``neutral_mean``); in the speaker probe, a negative emotion reading higher on a neutral user
    than on a distressed one (a positive one, the reverse); a frightened story reading less afraid
    than an unrelated request; steering that moves its own read-out, or the text's valence, the
    wrong way beyond its bootstrap interval; a Tylenol read-out that moves against the paper's
    direction beyond its interval."""
    out = []
    for label, per in detections.items():
        below = [f"{n} ({d['own_mean']:.2f} vs {d['neutral_mean']:.2f})" for n, d in per.items()
                 if "own_mean" in d and d["own_mean"] < d["neutral_mean"]]
        if below:
            out.append(f"{label}: {len(below)} of {len(per)} directions read their own emotion's test stories "
                       f"below the neutral texts: {_names(below)}.")
    probes = metrics.get("probes") or {}
    for key, distress in probes.items():
        if not (key.startswith("speaker_") and key.endswith("_user_distress")):
            continue
        e = key.removeprefix("speaker_").removesuffix("_user_distress")
        neutral, valence = probes.get(f"speaker_{e}_user_neutral"), _valence(e)
        if neutral is None or valence is None:
            continue
        if valence < 5 and neutral > distress:
            out.append(f"speaker probe: '{e}' reads higher on a neutral user turn ({neutral:.2f}) than on a "
                       f"distressed one ({distress:.2f}).")
        elif valence > 5 and distress > neutral:
            out.append(f"speaker probe: '{e}' reads higher on a distressed user turn ({distress:.2f}) than on a "
                       f"neutral one ({neutral:.2f}).")
    story, alone = probes.get("local_afraid_story"), probes.get("local_afraid_request_alone")
    if story is not None and alone is not None and story < alone:
        out.append(f"local probe: 'afraid' reads lower during the frightened story ({story:.2f}) than on an "
                   f"unrelated request alone ({alone:.2f}).")
    for prefix, label in (("", "dense"), ("sae_", "SAE")):
        ci = lookup(probes, f"ci.{prefix}tylenol_afraid_spearman")
        if ci and ci["upper"] < 0:
            out.append(f"Tylenol probe ({label}): 'afraid' falls as the dose rises (Spearman 95% CI "
                       f"[{ci['lower']:.2f}, {ci['upper']:.2f}]), against the paper.")
    for emotion, entry in (metrics.get("steering") or {}).items():
        if not isinstance(entry, dict):
            continue
        proj = lookup(entry, "ci.projection_change_at_max_fluent")
        if proj and proj["upper"] < 0:
            out.append(f"steering toward '{emotion}' lowers its own read-out (95% CI [{proj['lower']:.2f}, "
                       f"{proj['upper']:.2f}]).")
        val, sign = lookup(entry, "ci.valence_change_at_max_fluent"), entry.get("expected_valence_sign")
        if val and sign and (val["upper"] < 0 if sign > 0 else val["lower"] > 0):
            way = "lowers" if sign > 0 else "raises"
            out.append(f"steering toward '{emotion}' {way} the text's valence (95% CI [{val['lower']:.2f}, "
                       f"{val['upper']:.2f}]), against the emotion's own valence.")
    return out


def _num(v: float | None, digits: int = 2) -> str:
    return "&ndash;" if v is None else f"{v:.{digits}f}"


def findings_html(rows: Sequence[Finding], warnings: Sequence[str], notes: Sequence[str] = (),
                  figure_png: bytes | None = None) -> str:
    """The box: ``figure_png`` (`findings_figure` of the rows), a table of ``rows``, then the
    ``warnings`` (or a line saying there are none), then notes."""
    body = []
    for f in rows:
        ci = f"[{_num(f.ci['lower'])}, {_num(f.ci['upper'])}]" if f.ci else "&ndash;"
        null = (f"{html.escape(f.null_kind)}: mean {_num(f.null['mean'])}, 5&ndash;95% "
                f"[{_num(f.null['p05'])}, {_num(f.null['p95'])}]") if f.null else "&ndash;"
        pct = "&ndash;" if f.null is None else f"{f.null['percentile']:.1f}"
        verdict = {True: "beyond", False: "within", None: "&ndash;"}[f.beyond_null]
        body.append(f"<tr><td>{html.escape(f.measure)}</td><td><b>{_num(f.value, 3)}</b></td><td>{ci}</td>"
                    f"<td>{null}</td><td>{pct}</td><td>{verdict}</td><td>{html.escape(f.paper)}</td></tr>")
    table = ("<div style='overflow-x:auto'><table><tr><th>measure</th><th>this run</th><th>95% CI</th>"
             "<th>null baseline</th><th>percentile in null</th><th>vs null (one-sided 5%)</th><th>paper</th></tr>"
             + "".join(body) + "</table></div>") if body else "<p>No headline numbers in this run yet.</p>"
    warn = ("<ul class='flags'>" + "".join(f"<li>&#9888; {html.escape(w)}</li>" for w in warnings) + "</ul>"
            if warnings else "<p class='note'>No result contradicts the method's assumptions.</p>")
    note = "".join(f"<p class='note'>{html.escape(n)}</p>" for n in notes)
    figure = (f"<img alt='findings: each headline number with its interval, null band and the paper&#39;s value' "
              f"src='data:image/png;base64,{base64.b64encode(figure_png).decode()}'>" if figure_png else "")
    return f"<div id='findings' class='findings'><h2>Findings</h2>{figure}{table}{warn}{note}</div>"
