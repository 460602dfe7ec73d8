"""Feature cards and the latent table. A card: one selected latent of one emotion, with its
top-activating corpus snippets (the activating tokens marked), its scores for that emotion and its
logit-lens tokens. The table (`latents.LatentTable`): the same for every scored latent, one row each.
Both read the windows the scoring pass kept: no forward pass over the corpus.

Example:
    >>> cards = build_cards(model, sae, scores, sae_dirs, records, per_emotion=2)
    >>> Path("cards.html").write_text(cards_page(cards))
    >>> build_latent_table(model, sae, scores, sae_dirs, records).save("runs/x")
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .activations import tokenize_texts
from .directions import EmotionDirections
from .files import read_json
from .latents import LatentRow, LatentTable, Snippet
from .sae.effects import logit_lens
from .sae.scoring import NEUTRAL, LatentScores


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


def _snippets(model, scores: LatentScores, records: Sequence, tops: dict[int, list[int]]) -> dict[int, list[Snippet]]:
    """Per latent, the windows the scoring pass kept around its maxima in the classes ``tops[latent]``."""
    by_id = {r.id: r for r in records}
    rec_ids = sorted({scores.record_ids[int(scores.max_record[c, lat])] for lat, cs in tops.items() for c in cs})
    if not rec_ids:  # no latent asked for fired anywhere: nothing to show (and nothing to tokenize)
        return {lat: [] for lat in tops}
    missing = [r for r in rec_ids if r not in by_id]
    if missing:
        raise ValueError(f"Scored records not in the corpus given: {missing[:3]}; pass the corpus the scores came from.")
    tokens = dict(zip(rec_ids, tokenize_texts(model.tokenizer, [by_id[r].text for r in rec_ids],
                                              scores.config["max_tokens"])))
    text = {t: model.tokenizer.decode([t]) for t in {t for ids in tokens.values() for t in ids}}
    half = scores.max_window.shape[-1] // 2
    out: dict[int, list[Snippet]] = {}
    for lat, classes in tops.items():
        out[lat] = []
        for k in classes:
            rid = scores.record_ids[int(scores.max_record[k, lat])]
            toks, peak = tokens[rid], int(scores.max_pos[k, lat])
            lo, hi = max(1, peak - half), min(len(toks), peak + half)  # the attention sink (token 0) is never scored
            acts = scores.max_window[k, lat, lo - peak + half:hi - peak + half]
            out[lat].append(Snippet(rid, by_id[rid].emotion, [text[t] for t in toks[lo:hi]],
                                    [round(float(x), 3) for x in acts]))
    return out


def _top_classes(means: torch.Tensor, classes: list[str], latent: int, n: int = 5) -> list[tuple[str, float]]:
    order = torch.argsort(means[:, latent], descending=True)[:n]
    return [(classes[int(i)], float(means[i, latent])) for i in order]


@torch.inference_mode()
def build_cards(model, sae, scores: LatentScores, dirs: EmotionDirections, records: Sequence,
                per_emotion: int = 2, snippets: int = 3) -> list[FeatureCard]:
    """Cards for the ``per_emotion`` highest-weighted latents of each emotion in ``dirs``."""
    chosen: list[tuple[str, int, float]] = []
    for name in dirs.names:
        top = sorted(dirs.latents.get(name, []), key=lambda x: -x[1])[:per_emotion]
        chosen += [(name, i, w) for i, w in top]
    latents = sorted({i for _, i, _ in chosen})
    lens = logit_lens(model, sae, latents) if latents else {}
    snips = _snippets(model, scores, records, {lat: _top_maxima(scores, lat, snippets) for lat in latents})
    means = scores.means()
    table_cols = ("auroc", "cohens_d", "mean_diff", "mean_diff_neutral", "firing_ratio", "firing_rate")
    derived = {k: getattr(scores, k)() for k in table_cols}
    return [FeatureCard(lat, name, w, {k: float(v[scores.index(name), lat]) for k, v in derived.items()}
                        | {"max": float(scores.max[scores.index(name), lat])},
                        _top_classes(means, scores.classes, lat), lens[lat], list(snips[lat]))
            for name, lat, w in chosen]


@torch.inference_mode()
def build_latent_table(model, sae, scores: LatentScores, dirs: EmotionDirections, records: Sequence,
                       snippets: int = 3) -> LatentTable:
    """One row for every latent the scoring pass scored (`latents.LatentTable`); ``dirs`` gives the
    emotions each was selected for and its weights."""
    emotions = [c for c in scores.classes if c != NEUTRAL]
    rows = [scores.index(n) for n in emotions]
    auroc, d = scores.auroc()[rows], scores.cohens_d()[rows]
    density = (scores.fire.sum(0) / scores.tokens.sum().clamp(min=1)).tolist()
    selected: dict[int, dict[str, float]] = {}
    for name in dirs.names:
        for i, w in dirs.latents.get(name, []):
            selected.setdefault(int(i), {})[name] = float(w)
    latents = list(range(scores.n_latents))
    lens = logit_lens(model, sae, latents)
    snips = _snippets(model, scores, records, {lat: _top_maxima(scores, lat, snippets) for lat in latents})
    best, au, dd = auroc.argmax(0).tolist(), auroc.T.tolist(), d.T.tolist()  # lists: no per-item tensor access
    top_means = scores.means().topk(min(5, len(scores.classes)), dim=0)
    tops = [[(scores.classes[i], v) for i, v in zip(ids, vals)]
            for ids, vals in zip(top_means.indices.T.tolist(), top_means.values.T.tolist())]
    out = []
    for lat in latents:
        chosen = {n: w for n, w in selected.get(lat, {}).items() if n in emotions}
        e = emotions.index(max(chosen, key=chosen.get)) if chosen else best[lat]
        out.append(LatentRow(lat, emotions[e], au[lat][e], dd[lat][e], density[lat], chosen, tops[lat], lens[lat],
                             snips[lat]))
    return LatentTable(emotions, out, auroc, d, {"hook": scores.hook, "directions": dirs.recipe,
                                                  "records": len(scores.record_ids)})
