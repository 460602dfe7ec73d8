"""Feature cards: for each selected latent, its top-activating corpus snippets with the activating
tokens marked, its scores per emotion and its logit-lens tokens; as HTML and as wandb tables.

Example:
    >>> cards = build_cards(model, sae, scores, sae_dirs, records, per_emotion=2)
    >>> Path("cards.html").write_text(cards_page(cards))
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from .activations import forward_hooks, iter_batches, with_dtype
from .directions import EmotionDirections
from .latent_effects import logit_lens
from .scoring import LatentScores


@dataclass
class Snippet:
    record_id: str
    emotion: str
    tokens: list[str]
    acts: list[float]
    """The latent's activation at each token of the window."""


@dataclass
class FeatureCard:
    latent: int
    emotion: str
    weight: float
    """Weight of the latent in the emotion's SAE-assembled direction."""
    scores: dict[str, float]
    """The latent's scores for this emotion (auroc, cohens_d, mean_diff, firing_ratio, ...)."""
    top_emotions: list[tuple[str, float]]
    """Emotions with the highest mean pooled activation of this latent."""
    logit_lens: list[str]
    snippets: list[Snippet] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _top_records(scores: LatentScores, latent: int, n: int) -> dict[int, int]:
    """Up to ``n`` records holding the latent's highest class maxima: record index -> peak position."""
    order = torch.argsort(scores.max[:, latent], descending=True)
    out: dict[int, int] = {}
    for c in order:
        r = int(scores.max_record[c, latent])
        if r >= 0 and r not in out:
            out[r] = int(scores.max_pos[c, latent])
        if len(out) == n:
            break
    return out


@torch.inference_mode()
def build_cards(model, sae, scores: LatentScores, dirs: EmotionDirections, records: Sequence,
                per_emotion: int = 2, snippets: int = 3, window: int = 24, dtype: str = "auto") -> list[FeatureCard]:
    """Cards for the ``per_emotion`` highest-weighted latents of each emotion in ``dirs``."""
    by_id = {r.id: r for r in records}
    chosen: list[tuple[str, int, float]] = []
    for name in dirs.names:
        top = sorted(dirs.latents.get(name, []), key=lambda x: -x[1])[:per_emotion]
        chosen += [(name, i, w) for i, w in top]
    latents = sorted({i for _, i, _ in chosen})
    lens = logit_lens(model, sae, latents) if latents else {}
    tops = {lat: _top_records(scores, lat, snippets) for lat in latents}
    need = {lat: [scores.record_ids[r] for r in top] for lat, top in tops.items()}
    # only the tokens up to the last window's end are read: each peak is the latent's maximum over
    # the scored positions, so no later token can outrank it
    upto: dict[str, int] = {}
    for top in tops.values():
        for r, pos in top.items():
            rid = scores.record_ids[r]
            upto[rid] = max(upto.get(rid, 0), pos + window // 2 + 1)
    rec_ids = sorted(upto)
    missing = [r for r in rec_ids if r not in by_id]
    if missing:
        raise ValueError(f"Scored records not in the corpus given: {missing[:3]}; pass the corpus the scores came from.")
    run_model = with_dtype(model, dtype)
    hook = sae.cfg.metadata.hook_name
    per_record: dict[str, tuple[list[int], torch.Tensor]] = {}
    for batch in iter_batches(model.tokenizer, rec_ids, [by_id[r].text for r in rec_ids], 4096, 256,
                              keep=[upto[r] for r in rec_ids]):
        resid = forward_hooks(run_model, batch.tokens, [hook])[hook]
        lat = sae.encode(resid.to(sae.device, next(sae.parameters()).dtype))[..., latents].float().cpu()
        for row, rid in enumerate(batch.ids):
            n = int(batch.lengths[row])
            per_record[rid] = (batch.tokens[row, :n].tolist(), lat[row, :n])
    col = {lat: j for j, lat in enumerate(latents)}
    means = scores.means()
    table_cols = ("auroc", "cohens_d", "mean_diff", "mean_diff_neutral", "firing_ratio", "firing_rate")
    derived = {k: getattr(scores, k)() for k in table_cols}
    cards = []
    for name, lat, w in chosen:
        c = scores.index(name)
        order = torch.argsort(means[:, lat], descending=True)[:5]
        card = FeatureCard(lat, name, w, {k: float(v[c, lat]) for k, v in derived.items()} | {"max": float(scores.max[c, lat])},
                           [(scores.classes[int(i)], float(means[i, lat])) for i in order], lens[lat])
        for rid in need[lat]:
            toks, acts = per_record[rid]
            a = acts[:, col[lat]].clone()
            a[0] = 0.0  # the attention-sink token is never scored
            peak = int(a.argmax())
            lo, hi = max(1, peak - window // 2), min(len(toks), peak + window // 2)
            card.snippets.append(Snippet(rid, by_id[rid].emotion,
                                         [model.tokenizer.decode([t]) for t in toks[lo:hi]],
                                         [round(float(x), 3) for x in a[lo:hi]]))
        cards.append(card)
    return cards


def snippet_html(s: Snippet) -> str:
    top = max(s.acts) or 1.0
    spans = "".join(
        f"<span style='background:rgba(255,120,0,{min(1.0, a / top):.2f})' title='{a:.2f}'>{html.escape(t)}</span>"
        for t, a in zip(s.tokens, s.acts))
    return f"<div class='snip'><b>{html.escape(s.emotion)}</b> <small>{html.escape(s.record_id)}</small>: {spans}</div>"


def card_html(card: FeatureCard) -> str:
    sc = " ".join(f"{k}={v:.3g}" for k, v in card.scores.items())
    tops = ", ".join(f"{n} ({v:.2f})" for n, v in card.top_emotions)
    lens = " ".join(f"<code>{html.escape(t)}</code>" for t in card.logit_lens)
    snips = "".join(snippet_html(s) for s in card.snippets)
    return (f"<div class='card'><h4>latent {card.latent} &middot; {html.escape(card.emotion)} "
            f"(weight {card.weight:.2f})</h4><p>{sc}</p><p>highest mean on: {tops}</p>"
            f"<p>logit lens: {lens}</p>{snips}</div>")


CARD_CSS = (".card{border:1px solid #ccc;border-radius:6px;padding:6px 10px;margin:8px 0;font-size:13px}"
            ".card h4{margin:2px 0}.snip{margin:3px 0;line-height:1.6}.snip span{padding:1px 0}")


def cards_html(cards: Sequence[FeatureCard]) -> str:
    """Cards grouped by emotion, one <details> panel each (an HTML fragment with its CSS)."""
    by_emotion: dict[str, list[FeatureCard]] = {}
    for c in cards:
        by_emotion.setdefault(c.emotion, []).append(c)
    panels = "".join(f"<details><summary>{html.escape(e)} ({len(cs)} latents)</summary>"
                     f"{''.join(card_html(c) for c in cs)}</details>" for e, cs in by_emotion.items())
    return f"<style>{CARD_CSS}</style>{panels}"


def cards_page(cards: Sequence[FeatureCard], title: str = "Feature cards") -> str:
    return (f"<html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head>"
            f"<body><h1>{html.escape(title)}</h1>{cards_html(cards)}</body></html>")


def cards_tables(cards: Sequence[FeatureCard]) -> dict[str, tuple[list[str], list[list]]]:
    """Per emotion: (columns, rows) for a wandb.Table, one panel per emotion."""
    cols = ["latent", "weight", "auroc", "cohens_d", "firing_ratio", "top_emotions", "logit_lens", "top_snippet"]
    out: dict[str, tuple[list[str], list[list]]] = {}
    for c in cards:
        snip = c.snippets[0] if c.snippets else None
        text = "".join(f"[{t}]" if a >= 0.5 * max(snip.acts) else t for t, a in zip(snip.tokens, snip.acts)) if snip else ""
        out.setdefault(c.emotion, (cols, []))[1].append(
            [c.latent, c.weight, c.scores["auroc"], c.scores["cohens_d"], c.scores["firing_ratio"],
             ", ".join(n for n, _ in c.top_emotions), " ".join(c.logit_lens), text])
    return out
