"""Feature cards: for each selected latent, its top-activating corpus snippets with the activating
tokens marked, its scores per emotion and its logit-lens tokens; as HTML and as wandb tables.

Example:
    >>> cards = build_cards(model, sae, scores, sae_dirs, records, per_emotion=2)
    >>> Path("cards.html").write_text(cards_page(cards))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .activations import tokenize_texts
from .directions import EmotionDirections
from .files import read_json
from .sae.effects import logit_lens
from .sae.scoring import LatentScores


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


def load_cards(path: Path | str) -> list[FeatureCard]:
    """Feature cards from the JSON list `saefeatures run` writes (``figures/cards.json``)."""
    cards = []
    for c in read_json(path):
        c["snippets"] = [Snippet(**s) for s in c["snippets"]]
        c["top_emotions"] = [tuple(x) for x in c["top_emotions"]]
        cards.append(FeatureCard(**c))
    return cards


def _top_maxima(scores: LatentScores, latent: int, n: int) -> list[int]:
    """Classes whose maxima of the latent are the ``n`` highest, one per record (the scoring pass
    kept each maximum's record, position and window)."""
    out, seen = [], set()
    for c in torch.argsort(scores.max[:, latent], descending=True).tolist():
        r = int(scores.max_record[c, latent])
        if r >= 0 and r not in seen:
            seen.add(r)
            out.append(c)
        if len(out) == n:
            break
    return out


@torch.inference_mode()
def build_cards(model, sae, scores: LatentScores, dirs: EmotionDirections, records: Sequence,
                per_emotion: int = 2, snippets: int = 3) -> list[FeatureCard]:
    """Cards for the ``per_emotion`` highest-weighted latents of each emotion in ``dirs``. Snippets
    are the windows around each latent's top activations that the scoring pass kept: no forward
    pass over the corpus."""
    by_id = {r.id: r for r in records}
    chosen: list[tuple[str, int, float]] = []
    for name in dirs.names:
        top = sorted(dirs.latents.get(name, []), key=lambda x: -x[1])[:per_emotion]
        chosen += [(name, i, w) for i, w in top]
    latents = sorted({i for _, i, _ in chosen})
    lens = logit_lens(model, sae, latents) if latents else {}
    tops = {lat: _top_maxima(scores, lat, snippets) for lat in latents}
    rec_ids = sorted({scores.record_ids[int(scores.max_record[c, lat])] for lat, cs in tops.items() for c in cs})
    missing = [r for r in rec_ids if r not in by_id]
    if missing:
        raise ValueError(f"Scored records not in the corpus given: {missing[:3]}; pass the corpus the scores came from.")
    tokens = dict(zip(rec_ids, tokenize_texts(model.tokenizer, [by_id[r].text for r in rec_ids],
                                              scores.config["max_tokens"])))
    half = scores.max_window.shape[-1] // 2
    means = scores.means()
    table_cols = ("auroc", "cohens_d", "mean_diff", "mean_diff_neutral", "firing_ratio", "firing_rate")
    derived = {k: getattr(scores, k)() for k in table_cols}
    cards = []
    for name, lat, w in chosen:
        c = scores.index(name)
        order = torch.argsort(means[:, lat], descending=True)[:5]
        card = FeatureCard(lat, name, w, {k: float(v[c, lat]) for k, v in derived.items()} | {"max": float(scores.max[c, lat])},
                           [(scores.classes[int(i)], float(means[i, lat])) for i in order], lens[lat])
        for k in tops[lat]:
            rid = scores.record_ids[int(scores.max_record[k, lat])]
            toks, peak = tokens[rid], int(scores.max_pos[k, lat])
            lo, hi = max(1, peak - half), min(len(toks), peak + half)  # the attention sink (token 0) is never scored
            acts = scores.max_window[k, lat, lo - peak + half:hi - peak + half]
            card.snippets.append(Snippet(rid, by_id[rid].emotion, [model.tokenizer.decode([t]) for t in toks[lo:hi]],
                                         [round(float(x), 3) for x in acts]))
        cards.append(card)
    return cards


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
