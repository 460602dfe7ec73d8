"""One self-contained HTML report of a run, built from the artifacts in its directory.

Images are inlined as base64 and nothing is fetched, so the file opens offline. Sections appear
when their stage has run: summary and timings, corpus and its audit, layer sweep, geometry,
detection (dense vs SAE), the reader test, feature cards, probes, steering, monitor examples, SAE
quality.

Example:
    >>> write_report("runs/smollm2-135m")      # -> runs/smollm2-135m/report.html
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from ..feature_cards import load_cards
from ..files import write_text
from ..keys import flatten
from .cards import cards_html
from .latents import latents_section

CSS = """body{font-family:system-ui,sans-serif;max-width:1150px;margin:20px auto;padding:0 16px;color:#222}
h1{font-size:24px}h2{border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:34px}
table{border-collapse:collapse;margin:8px 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}img{max-width:100%;border:1px solid #eee}
.note{color:#666;font-size:13px}details{margin:4px 0}summary{cursor:pointer;font-weight:600}"""

SECTIONS = ("dense", "sae.k1", "sae.k4", "sae.k16", "sae.k64")
COLS = ("top1", "top5", "auroc", "top1_display12", "cluster_acc", "valence_r", "arousal_r", "arousal_best_r", "emobank_valence_spearman",
        "emobank_arousal_spearman", "cosine_to_dense_median")
TITLES = {"top1_display12": "top-1 of 12 display", "cluster_acc": "cluster acc (10)",
          "valence_r": "valence r (PC1)", "arousal_r": "arousal r (PC2)", "arousal_best_r": "arousal best r (PC1-4)",
          "emobank_valence_spearman": "EmoBank valence ρ", "emobank_arousal_spearman": "EmoBank arousal ρ",
          "cosine_to_dense_median": "cosine to dense (median)"}


def _get(d: dict[str, Any], dotted: str) -> Any:
    for k in dotted.split("."):
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    return html.escape(str(v)) if v is not None else "&ndash;"


def _img(path: Path, alt: str = "") -> str:
    if not path.is_file():
        return ""
    data = base64.b64encode(path.read_bytes()).decode()
    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{data}'>"


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<div style='overflow-x:auto'><table><tr>{head}</tr>{body}</table></div>"


def _kv(d: dict[str, Any]) -> str:
    return _table(["key", "value"], [[k, v] for k, v in d.items() if not isinstance(v, (dict, list))])


def build_report(run_dir: Path | str) -> str:
    run = Path(run_dir)
    metrics = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").exists() else {}
    manifest = json.loads((run / "manifest.json").read_text()) if (run / "manifest.json").exists() else {}
    figs = run / "figures"
    parts = [f"<h1>saefeatures report: {_fmt(_get(metrics, 'model.id'))}, layer {_fmt(_get(metrics, 'model.layer'))}</h1>",
             f"<p class='note'>Run directory {html.escape(str(run))}; started {_fmt(manifest.get('started'))}. "
             "Emotion directions follow Anthropic (2026), 'Emotion Concepts and their Function in a Large Language "
             "Model'; human norms are Warriner et al. (2013) (the paper used a PAD study of 45 words).</p>"]
    smoke = manifest.get("smoke")
    if smoke:
        parts.append(f"<p><b>Smoke check.</b> {html.escape(smoke['prompt'])} &rarr; <i>{html.escape(smoke['reply'])}</i></p>")
    if metrics.get("timings"):
        parts.append("<h2>Timings</h2>" + _table(["stage", "seconds"], [[k.removesuffix("_s"), v] for k, v in metrics["timings"].items()]))
    if metrics.get("corpus"):
        corpus = {k: v for k, v in metrics["corpus"].items() if not k.startswith("bow_")}
        parts.append("<h2>Corpus</h2>" + _kv(corpus) + f"<p class='note'>{html.escape(str(manifest.get('corpus', '')))}</p>")
    if _get(metrics, "corpus.bow_top1") is not None:
        keys = ["bow_n_classes", "bow_n_test", "bow_top1", "bow_top5", "bow_auroc", "bow_cluster_acc"]
        parts.append("<h3>Corpus audit (no model)</h3><p class='note'>A bag-of-words logistic regression trained on the "
                     "train topics' stories, reading the test topics': how far the words alone tell the emotions "
                     "apart (chance top-1: 1 / classes). Per emotion: corpus_audit.json.</p>"
                     + _table([k.removeprefix("bow_") for k in keys], [[_get(metrics, f"corpus.{k}") for k in keys]]))
    sweep = run / "sweep.json"
    if sweep.exists():
        rows = json.loads(sweep.read_text())
        keys = ["layer", "valence_r", "arousal_r", "top1", "auroc", "emobank_valence_spearman"]
        parts.append("<h2>Layer sweep</h2>" + _table([TITLES.get(k, k) for k in keys], [[r.get(k) for k in keys] for r in rows]))
    present = [s for s in SECTIONS if _get(metrics, s)]
    if present:
        parts.append("<h2>Emotion directions: dense vs SAE-assembled</h2>"
                     "<p class='note'>171-way detection on the topic-held-out test split; PCA of the directions vs "
                     "human valence (PC1) and arousal (PC2); EmoBank: Spearman of sentence projections with human ratings.</p>")
        parts.append(_table(["directions", *(TITLES.get(c, c) for c in COLS)],
                            [[s, *(_get(metrics, f"{s}.{c}") for c in COLS)] for s in present]))
    for s in present:
        png = figs / s / "geometry.png"
        if png.exists():
            parts.append(f"<details {'open' if s == 'dense' else ''}><summary>Geometry: {s}</summary>{_img(png, s)}"
                         f"<p class='note'>Interactive version: figures/{s}/geometry.html</p></details>")
    reader = metrics.get("reader") or {}
    if reader:
        keys = ["n_emotions", "n", "top1", "top3", "auroc"]
        path = json.loads((figs / "reader.json").read_text()).get("path", "") if (figs / "reader.json").exists() else ""
        parts.append("<h2>Reader test</h2><p class='note'>The directions reading an external story set "
                     f"({html.escape(str(path))}): projections on the directions of the set's emotions, z-scored per "
                     "direction over the stories, then the argmax (chance top-1: 1 / emotions).</p>"
                     + _table(["directions", *keys], [[name, *(d.get(k) for k in keys)] for name, d in reader.items()]))
    det = figs / "dense" / "detection.json"
    if det.exists():
        per = json.loads(det.read_text())["per_emotion"]
        ranked = sorted(per.items(), key=lambda kv: -kv[1]["auroc"])
        rows = [[n, d["auroc"], d["top1"], int(d["n"])] for n, d in ranked]
        parts.append("<details><summary>Per-emotion detection (dense)</summary>" + _table(["emotion", "auroc", "top1", "n"], rows) + "</details>")
    cards = figs / "cards.json"
    if cards.exists():
        parts.append("<h2>Feature cards</h2><p class='note'>Top-weighted SAE latents per emotion: scores, logit-lens tokens, "
                     "and top-activating corpus snippets (orange: activation).</p>" + cards_html(load_cards(cards)))
    parts.append(latents_section(run))
    if metrics.get("probes"):
        parts.append("<h2>Context probes</h2>" + _img(figs / "probes" / "tylenol.png", "tylenol") + _kv(metrics["probes"]))
    if metrics.get("steering"):
        parts.append("<h2>Steering</h2>")
        for png in sorted((figs / "steering").glob("*.png")):
            parts.append(f"<h4>{html.escape(png.stem)}</h4>{_img(png, png.stem)}")
        # per emotion, the per-method entries only (the emotion-level keys repeat the primary method's)
        steering = {k: {m: d for m, d in v.items() if isinstance(d, dict)}
                    if isinstance(v, dict) and any(isinstance(d, dict) for d in v.values()) else v
                    for k, v in metrics["steering"].items()}
        rows = [[k, v] for k, v in flatten(steering).items()]
        parts.append(_table(["metric", "value"], rows))
    monitor = figs / "monitor"
    if monitor.exists():
        parts.append("<h2>Monitor examples</h2>")
        for png in sorted(monitor.glob("*.png")):
            parts.append(f"<h4>{html.escape(png.stem)}</h4>{_img(png, png.stem)}")
        for frag in sorted(monitor.glob("*.html")):
            parts.append(f"<details><summary>{html.escape(frag.stem)}</summary>{frag.read_text()}</details>")
    sae = {k: v for k, v in (metrics.get("sae") or {}).items() if not isinstance(v, dict)}
    if sae:
        parts.append("<h2>SAE quality (held-out text)</h2>" + _kv(sae))
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>saefeatures report</title>"
            f"<style>{CSS}</style></head><body>{''.join(parts)}</body></html>")


def write_report(run_dir: Path | str) -> Path:
    path = Path(run_dir) / "report.html"
    write_text(path, build_report(run_dir))
    return path
