"""One self-contained HTML report of a run, built from the artifacts in its directory.

Images are inlined as base64 and nothing is fetched, so the file opens offline. The findings box
comes first (headline numbers beside the paper's, with intervals, null baselines and warnings:
`report.findings`); then, as their stages have run: corpus and its audit, layer sweep, geometry,
detection (dense vs SAE, confusion matrices), the reader test, feature cards, probes, steering,
monitor examples, SAE quality, one section per emotion, and an appendix of timings.

Example:
    >>> write_report("runs/smollm2-135m")      # -> runs/smollm2-135m/report.html
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path
from typing import Any

from ..evals.steering_suite import SteeringResult
from ..feature_cards import load_cards
from ..files import read_json, write_text
from ..keys import flatten, lookup
from ..stats import N_RESAMPLES, SEED
from .cards import cards_html
from .emotions import confusion_html, emotion_sections
from .findings import findings_html, flags, headline
from .findings_figure import figure_title, findings_png
from .latents import latents_section

CSS = """body{font-family:system-ui,sans-serif;max-width:1150px;margin:20px auto;padding:0 16px;color:#222}
h1{font-size:24px}h2{border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:34px}
table{border-collapse:collapse;margin:8px 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}img{max-width:100%;border:1px solid #eee}
.note{color:#666;font-size:13px}details{margin:4px 0}summary{cursor:pointer;font-weight:600}
.findings{border:2px solid #447;border-radius:8px;padding:4px 14px;background:#f7f8fc}.findings h2{margin-top:8px}
.flags li{color:#a30}table.confusion td{min-width:22px;text-align:center}"""

SECTIONS = ("dense", "sae.k1", "sae.k4", "sae.k16", "sae.k64")
COLS = ("top1", "top5", "auroc", "top1_display12", "cluster_acc", "valence_r", "arousal_r", "arousal_best_r", "emobank_valence_spearman",
        "emobank_arousal_spearman", "cosine_to_dense_median")
TITLES = {"top1_display12": "top-1 of 12 display", "cluster_acc": "cluster acc (10)",
          "valence_r": "valence r (PC1)", "arousal_r": "arousal r (PC2)", "arousal_best_r": "arousal best r (PC1-4)",
          "emobank_valence_spearman": "EmoBank valence ρ", "emobank_arousal_spearman": "EmoBank arousal ρ",
          "cosine_to_dense_median": "cosine to dense (median)"}


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


def _read(path: Path) -> Any:
    return read_json(path) if path.is_file() else None


def direction_sets(metrics: dict[str, Any], manifest: dict[str, Any]) -> list[tuple[str, str]]:
    """(metrics section, label) of the sets the findings box reports: dense and the run's main SAE k."""
    main_k = lookup(manifest, "config.sae_directions.main_k")
    ks = [s for s in SECTIONS[1:] if lookup(metrics, s)]
    main = f"sae.k{main_k}" if f"sae.k{main_k}" in ks else (ks[-1] if ks else None)
    return [(s, label) for s, label in (("dense", "dense"), (main, f"SAE k={main[5:]}" if main else ""))
            if s and lookup(metrics, s)]


def findings_notes(metrics: dict[str, Any]) -> list[str]:
    """Context the box's numbers need: how the intervals were drawn, and the model's own danger answer."""
    notes = [f"95% intervals: percentile bootstrap ({N_RESAMPLES} resamples, seed {SEED}) over the emotions "
             "(geometry, the PCA redone per resample), the test records (detection), the phrasings (Tylenol) and "
             "the continuations (steering). Null baselines: the same statistic with the labels shuffled "
             "(ratings, records, dose order, strength); 'beyond' means above the null's 95th percentile on the "
             "side the method predicts. The paper used its own model and 45 PAD-rated words; here, Warriner norms."]
    danger, control = lookup(metrics, "probes.danger_tylenol_spearman"), lookup(metrics, "probes.danger_control_spearman")
    if danger is not None:
        notes.append(f"The model's own answer to 'is this dose dangerous?': Spearman of dose vs P(Yes) {danger:.2f} "
                     f"(vitamin C {'&ndash;' if control is None else f'{control:.2f}'}); a model that does not know the dose is dangerous has no danger "
                     "to represent.")
    return notes


def build_report(run_dir: Path | str) -> str:
    run = Path(run_dir)
    metrics = _read(run / "metrics.json") or {}
    manifest = _read(run / "manifest.json") or {}
    figs = run / "figures"
    sets = direction_sets(metrics, manifest)
    detection = {s: _read(figs / s / "detection.json") for s in SECTIONS}
    detections = {label: detection[s]["per_emotion"] for s, label in sets if detection.get(s)}
    rows = headline(metrics, sets)
    head = [f"<h1>saefeatures report: {_fmt(lookup(metrics, 'model.id'))}, layer {_fmt(lookup(metrics, 'model.layer'))}</h1>",
            f"<p class='note'>Run directory {html.escape(str(run))}; started {_fmt(manifest.get('started'))}. "
            "Emotion directions follow Anthropic (2026), 'Emotion Concepts and their Function in a Large Language "
            "Model'; human norms are Warriner et al. (2013) (the paper used a PAD study of 45 words).</p>",
            findings_html(rows, flags(metrics, detections), findings_notes(metrics),
                          findings_png(rows, figure_title(metrics)) if rows else None)]
    smoke = manifest.get("smoke")
    if smoke:
        head.append(f"<p><b>Smoke check.</b> {html.escape(smoke['prompt'])} &rarr; <i>{html.escape(smoke['reply'])}</i></p>")
    parts = corpus_parts(run, metrics, manifest) + direction_parts(run, metrics, detection)
    cards = figs / "cards.json"
    if cards.exists():
        parts.append("<h2>Feature cards</h2><p class='note'>Top-weighted SAE latents per emotion: scores, logit-lens tokens, "
                     "and top-activating corpus snippets (orange: activation).</p>" + cards_html(load_cards(cards)))
    parts.append(latents_section(run))
    steering = SteeringResult.load(run / "steering" / "results.json") if (run / "steering" / "results.json").is_file() else None
    parts += behaviour_parts(run, metrics)
    sae = {k: v for k, v in (metrics.get("sae") or {}).items() if not isinstance(v, dict)}
    if sae:
        parts.append("<h2>SAE quality (held-out text)</h2>" + _kv(sae))
    linked = {int(i) for i in re.findall(r"id=['\"]latent-(\d+)['\"]", "".join(parts))}
    latents = (_read(run / "directions" / "sae" / "directions.json") or {}).get("latents", {})
    names = list((detection.get("dense") or {}).get("per_emotion", {})) or list(latents)
    emotions = emotion_sections(names, detections, latents, steering, linked)
    if emotions:
        parts.append("<h2>Emotions</h2><p class='note'>Per emotion: detection by each direction set (&#9888;: the "
                     "direction reads its own stories below neutral texts), its SAE latents, and steered continuations "
                     "beside unsteered ones.</p>" + emotions)
    if metrics.get("timings"):
        parts.append("<h2>Timings</h2><p class='note'>Appendix: wall seconds per stage of the last run that "
                     "computed it.</p>" + _table(["stage", "seconds"], [[k.removesuffix("_s"), v]
                                                                          for k, v in metrics["timings"].items()]))
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>saefeatures report</title>"
            f"<style>{CSS}</style></head><body>{''.join(head + parts)}</body></html>")


def corpus_parts(run: Path, metrics: dict[str, Any], manifest: dict[str, Any]) -> list[str]:
    """The corpus, its model-free audit, and the layer sweep."""
    parts = []
    if metrics.get("corpus"):
        corpus = {k: v for k, v in metrics["corpus"].items() if not k.startswith("bow_")}
        parts.append("<h2>Corpus</h2>" + _kv(corpus) + f"<p class='note'>{html.escape(str(manifest.get('corpus', '')))}</p>")
    if lookup(metrics, "corpus.bow_top1") is not None:
        keys = ["bow_n_classes", "bow_n_test", "bow_top1", "bow_top5", "bow_auroc", "bow_cluster_acc"]
        parts.append("<h3>Corpus audit (no model)</h3><p class='note'>A bag-of-words logistic regression trained on the "
                     "train topics' stories, reading the test topics': how far the words alone tell the emotions "
                     "apart (chance top-1: 1 / classes). Per emotion: corpus_audit.json.</p>"
                     + _table([k.removeprefix("bow_") for k in keys], [[lookup(metrics, f"corpus.{k}") for k in keys]]))
    sweep = _read(run / "sweep.json")
    if sweep:
        keys = ["layer", "valence_r", "arousal_r", "top1", "auroc", "emobank_valence_spearman"]
        parts.append("<h2>Layer sweep</h2>" + _table([TITLES.get(k, k) for k in keys], [[r.get(k) for k in keys] for r in sweep]))
    return parts


def dense_recipe(run: Path) -> str:
    """One sentence on how the run's dense directions were built (from their saved metadata)."""
    meta = (_read(run / "directions" / "dense" / "directions.json") or {}).get("metadata", {})
    if "n_train" not in meta:
        return ""
    text = (f"Dense: the per-emotion mean of {meta.get('n_train', '?')} train stories minus the mean over emotions, "
            f"{meta.get('neutral_pcs', '?')} neutral principal components out")
    if meta.get("concept_weight"):
        text += (f", plus {meta['concept_weight']:g} x the same direction of {meta['n_concepts']} short sentences "
                 f"naming the emotions (directions.concept_weight; 0 is the paper's recipe)")
    return text + "."


def sae_recipe(run: Path) -> str:
    """One sentence on how the run's main SAE directions chose and weighted their latents."""
    meta = (_read(run / "directions" / "sae" / "directions.json") or {}).get("metadata", {})
    if "k" not in meta:
        return ""
    rank = meta.get("rank_by", "?")
    if meta.get("concept_weight"):
        rank += f" on the stories and {meta['concept_weight']:g} x on the sentences"
    if meta.get("select") == "pursuit":
        text = (f"SAE k={meta['k']}: per emotion, among the {meta.get('candidates', '?')} selective latents "
                f"ranked best by {rank}, the {meta['k']} chosen one at a time to rebuild the dense direction "
                "(sae_directions.recipe.select)")
    else:
        text = f"SAE k={meta['k']}: per emotion, the top {meta['k']} selective latents by {rank}"
    weights = "least squares onto the dense direction" if meta.get("weighting") == "lstsq" else "effect size"
    return f"{text}; weights by {weights}."


def direction_parts(run: Path, metrics: dict[str, Any], detection: dict[str, Any]) -> list[str]:
    """The direction sets side by side, their geometry, detection confusion matrices, the reader test."""
    figs, parts = run / "figures", []
    present = [s for s in SECTIONS if lookup(metrics, s)]
    if present:
        parts.append("<h2>Emotion directions: dense vs SAE-assembled</h2>"
                     f"<p class='note'>{html.escape(dense_recipe(run))} {html.escape(sae_recipe(run))} "
                     "171-way detection on the topic-held-out test "
                     "split; PCA of the directions vs human valence (PC1) and arousal (PC2); EmoBank: Spearman of "
                     "sentence projections with human ratings.</p>")
        parts.append(_table(["directions", *(TITLES.get(c, c) for c in COLS)],
                            [[s, *(lookup(metrics, f"{s}.{c}") for c in COLS)] for s in present]))
    for s in present:
        png = figs / s / "geometry.png"
        if png.exists():
            link = (f"<p class='note'><a href='figures/{s}/geometry.html'>Interactive version</a></p>"
                    if (figs / s / "geometry.html").is_file() else "")
            parts.append(f"<details {'open' if s == 'dense' else ''}><summary>Geometry: {s}</summary>{_img(png, s)}{link}</details>")
    matrices = []
    for s in present:
        det = detection.get(s) or {}
        for key, what in (("confusion_clusters", "the paper's 10 clusters (true emotion's cluster vs predicted "
                                                 "emotion's, 171-way argmax)"),
                          ("confusion_display", "the 12 display emotions (their records, argmax among them)")):
            if det.get(key):
                matrices.append(f"<details {'open' if s == 'dense' else ''}><summary>{s}: {what.split(' (')[0]}"
                                f"</summary>{confusion_html(det[key], f'{s}: {what}; rows true, columns predicted')}"
                                "</details>")
    if matrices:
        parts.append("<h2>Detection: confusion matrices</h2>" + "".join(matrices))
    reader = metrics.get("reader") or {}
    if reader:
        keys = ["n_emotions", "n", "top1", "top3", "auroc"]
        path = (_read(figs / "reader.json") or {}).get("path", "")
        parts.append("<h2>Reader test</h2><p class='note'>The directions reading an external story set "
                     f"({html.escape(str(path))}): projections on the directions of the set's emotions, z-scored per "
                     "direction over the stories, then the argmax (chance top-1: 1 / emotions).</p>"
                     + _table(["directions", *keys], [[name, *(d.get(k) for k in keys)] for name, d in reader.items()]))
    return parts


def _without_uncertainty(d: Any) -> Any:
    """A metrics section without its ``ci`` and ``null`` entries (the findings box shows those)."""
    if not isinstance(d, dict):
        return d
    return {k: _without_uncertainty(v) for k, v in d.items() if k not in ("ci", "null")}


def behaviour_parts(run: Path, metrics: dict[str, Any]) -> list[str]:
    """Context probes, steering figures and metrics, monitor examples."""
    figs, parts = run / "figures", []
    if metrics.get("probes"):
        parts.append("<h2>Context probes</h2>" + _img(figs / "probes" / "tylenol.png", "tylenol") + _kv(metrics["probes"]))
    if metrics.get("steering"):
        parts.append("<h2>Steering</h2>")
        for png in sorted((figs / "steering").glob("*.png")):
            parts.append(f"<h4>{html.escape(png.stem)}</h4>{_img(png, png.stem)}")
        # per emotion, the per-method entries only (the emotion-level keys repeat the primary method's)
        steering = {k: {m: d for m, d in v.items() if isinstance(d, dict) and m not in ("ci", "null")}
                    if isinstance(v, dict) and any(isinstance(d, dict) for d in v.values()) else v
                    for k, v in metrics["steering"].items()}
        parts.append(_table(["metric", "value"], [[k, v] for k, v in flatten(_without_uncertainty(steering)).items()]))
    monitor = figs / "monitor"
    if monitor.exists():
        parts.append("<h2>Monitor examples</h2>")
        for png in sorted(monitor.glob("*.png")):
            parts.append(f"<h4>{html.escape(png.stem)}</h4>{_img(png, png.stem)}")
        for frag in sorted(monitor.glob("*.html")):
            parts.append(f"<details><summary>{html.escape(frag.stem)}</summary>{frag.read_text()}</details>")
    return parts


def write_report(run_dir: Path | str) -> Path:
    path = Path(run_dir) / "report.html"
    write_text(path, build_report(run_dir))
    return path
