"""SAE-assembled emotion directions: per emotion, a few latents picked by how well they separate
its stories (`sae.scoring`; and, as the dense recipe weights them, the concept sentences naming it,
`saefeatures.concepts`), weighted to fit the dense direction, their decoder vectors summed.

Which few: by default a pursuit. The latents that read an emotion best are often near-copies of
one another, so the top k by AUROC span little of the emotion's direction. Instead, among the
``candidates`` best-ranked latents, each step adds the one whose decoder vector points most along
what the latents chosen so far leave of the dense direction (non-negative matching pursuit).
``scripts/bench_sae_recipe.py`` measures it against the top k.

Example:
    >>> dirs = build_sae(scores, sae.W_dec, k=16, layer=20, dense=dense)
    >>> dirs.latents["afraid"]               # [(latent id, weight), ...]
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from jaxtyping import Float
from torch import Tensor

from ..directions import DEFAULT_POOLING, POOLING_FIELDS, EmotionDirections, pooling_record


@dataclass
class SAERecipeConfig:
    """How SAE-assembled directions pick and weight latents."""

    ks: list[int] = field(default_factory=lambda: [1, 4, 16, 64])
    """Latents per emotion; one direction set per k."""
    rank_by: str = "auroc"
    """Score that orders candidates: 'auroc', 'cohens_d', 'mean_diff' or 'output'."""
    select: str = "pursuit"
    """'pursuit': k of the ``candidates`` best-ranked latents, chosen one at a time to rebuild the
    dense direction (`pursue_latents`); 'rank': the top k by rank. Without a dense direction to
    rebuild, 'pursuit' falls back to 'rank'."""
    candidates: int = 256
    """Latents the pursuit chooses from: the best-ranked that pass the selectivity filters."""
    min_cohens_d: float = 0.2
    """Minimum selectivity: Cohen's d vs the other emotions (a positive mean difference is required)."""
    output_filter: bool = False
    """Keep only latents whose clamping raises the emotion's own words (output score > 0)."""
    weighting: str = "lstsq"
    """'lstsq': non-negative least squares of decoder vectors onto the dense direction; 'score': by Cohen's d."""


RANKS = ("auroc", "cohens_d", "mean_diff", "output")
SELECTS = ("pursuit", "rank")
WEIGHTINGS = ("lstsq", "score")


def select_latents(scores, name: str, k: int, cfg: SAERecipeConfig, output: Tensor | None = None,
                   concepts=None, concept_weight: float = 0.0) -> list[int]:
    """Top-k latents of one emotion by ``cfg.rank_by`` among those passing the selectivity filters
    (if none pass, the single best by rank). With ``concepts`` (latent scores of the concept
    sentences) the rank is the weighted mean ``(stories + concept_weight x sentences) / (1 +
    concept_weight)`` of the same score on both; the filters read the stories."""
    if cfg.rank_by not in RANKS:
        raise ValueError(f"rank_by must be one of {RANKS}, got '{cfg.rank_by}'.")
    i = scores.index(name)
    d, diff = scores.cohens_d()[i], scores.mean_diff()[i]
    if cfg.rank_by == "output":
        if output is None:
            raise ValueError("rank_by='output' needs output scores (sae.effects.output_scores).")
        rank = output
    else:
        rank = getattr(scores, cfg.rank_by)()[i]
        if concepts is not None and concept_weight > 0 and name in concepts.classes:
            anchor = getattr(concepts, cfg.rank_by)()[concepts.index(name)]
            rank = (rank + concept_weight * anchor) / (1 + concept_weight)
    rank = rank + 1e-6 * d  # ties (common for AUROC) broken by effect size
    ok = (diff > 0) & (d >= cfg.min_cohens_d)
    if cfg.output_filter:
        if output is None:
            raise ValueError("output_filter needs output scores (sae.effects.output_scores).")
        ok &= output > 0
    ranked = torch.argsort(torch.where(ok, rank, torch.full_like(rank, -torch.inf)), descending=True)
    chosen = [int(j) for j in ranked[: min(k, int(ok.sum()))]]
    return chosen or [int(torch.argmax(rank))]


def pursue_latents(decoder: Float[Tensor, "m d_model"], target: Float[Tensor, " d_model"], k: int) -> list[int]:
    """Up to ``k`` rows of ``decoder``, chosen greedily: each step takes the row (unit-normed) most
    aligned with the residual of ``target`` after a non-negative least-squares fit on the rows taken
    so far; it stops early when no row points along the residual."""
    from scipy.optimize import nnls

    rows = decoder.double()
    units = (rows / rows.norm(dim=1, keepdim=True).clamp(min=1e-12)).numpy()
    t = target.double().numpy()
    chosen: list[int] = []
    residual = t
    for _ in range(min(k, len(units))):
        align = units @ residual
        align[chosen] = -float("inf")
        j = int(align.argmax())
        if align[j] <= 1e-9 * float(abs(t).max()):
            break
        chosen.append(j)
        basis = rows[chosen].numpy().T
        w, _ = nnls(basis, t)
        residual = t - basis @ w
    return chosen


def latent_weights(decoder: Float[Tensor, "k d_model"], target: Tensor | None, effect: Tensor,
                   weighting: str) -> Tensor:
    """Weights of selected latents: NNLS fit of their decoder vectors to ``target``, or by effect size."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got '{weighting}'.")
    if weighting == "lstsq" and target is not None:
        from scipy.optimize import nnls

        w, _ = nnls(decoder.double().T.numpy(), target.double().numpy())
        if w.sum() > 0:
            return torch.tensor(w / w.sum(), dtype=torch.float32)
    w = effect.clamp(min=1e-6).float()
    return w / w.sum()


def build_sae(scores, W_dec: Float[Tensor, "d_sae d_model"], k: int, layer: int,
              dense: EmotionDirections | None = None, cfg: SAERecipeConfig = SAERecipeConfig(),
              output_scores: Tensor | None = None, concepts=None, concept_weight: float = 0.0) -> EmotionDirections:
    """Per emotion: select k latents (``cfg.select``), weight them, sum their decoder vectors (unit norm).

    ``output_scores`` is (n_emotions_scored, d_sae) in the order of ``scores.classes`` (as
    `sae.effects.output_scores` returns), used by rank_by='output' and output_filter. ``concepts``
    and ``concept_weight``: the concept sentences' latent scores and their weight in the ranking
    (`select_latents`; the study passes ``directions.concept_weight``, as the dense recipe uses it).
    """
    if dense is not None and dense.d_model != W_dec.shape[1]:
        raise ValueError(f"SAE decoder width {W_dec.shape[1]} != directions d_model {dense.d_model}: "
                         "the SAE must read the same model and layer as the dense directions.")
    if dense is not None and dense.layer != layer:
        raise ValueError(f"SAE layer {layer} != dense directions layer {dense.layer}; "
                         f"use an SAE at layer {dense.layer}.")
    if cfg.select not in SELECTS:
        raise ValueError(f"select must be one of {SELECTS}, got '{cfg.select}'.")
    names = [c for c in scores.classes if c != "neutral"]
    vectors, latents = [], {}
    W = W_dec.detach().float().cpu()
    for name in names:
        out_row = output_scores[scores.index(name)] if output_scores is not None else None
        target = dense.vector(name) if dense is not None and name in dense.names else None
        if cfg.select == "pursuit" and target is not None:
            pool = select_latents(scores, name, max(k, cfg.candidates), cfg, out_row, concepts, concept_weight)
            ids = [pool[j] for j in pursue_latents(W[pool], target, k)] or pool[:1]
        else:
            ids = select_latents(scores, name, k, cfg, out_row, concepts, concept_weight)
        effect = scores.cohens_d()[scores.index(name)][ids]
        w = latent_weights(W[ids], target, effect, cfg.weighting)
        v = (w[:, None] * W[ids]).sum(0)
        vectors.append(v / v.norm().clamp(min=1e-8))
        latents[name] = [(i, float(x)) for i, x in zip(ids, w)]
    pooling = replace(DEFAULT_POOLING, **{k: v for k, v in scores.config.items()
                                          if k in POOLING_FIELDS})  # as the scored records were pooled
    return EmotionDirections(names, layer, torch.stack(vectors), scores.hook, f"sae-k{k}",
                             dense.center if dense is not None else None, latents,
                             metadata={"k": k, "rank_by": cfg.rank_by, "select": cfg.select,
                                       "candidates": cfg.candidates if cfg.select == "pursuit" else None,
                                       "weighting": cfg.weighting,
                                       "concept_weight": concept_weight if concepts is not None else 0.0,
                                       "min_cohens_d": cfg.min_cohens_d, "output_filter": cfg.output_filter,
                                       "pooling": pooling_record(pooling, scores.hook, layer),
                                       **({"calibration": dense.metadata["calibration"]}
                                          if dense is not None and "calibration" in dense.metadata else {})},
                             neutral=dense.neutral if dense is not None and dense.hook == scores.hook else None)
