"""Emotion directions: one unit vector per emotion at one layer, saved as safetensors + JSON.

The dense recipe is the paper's: per-emotion mean of pooled activations minus the mean over
emotions, with the top principal components of neutral texts (to 50% of their variance) projected
out, unit norm, from the train split only. SAE-assembled directions (`sae.scoring`) use the
same object and keep the latent ids and weights they were built from in ``latents``.

Example:
    >>> dirs = EmotionDirections.load("runs/smollm2/directions/dense")
    >>> dirs.read(model, ["I can't stop smiling today."])   # [{'happy': ..., ...}]
    >>> scores = dirs.project(acts)          # (n_records, n_emotions)
    >>> dirs.vector("afraid")                # (d_model,)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from jaxtyping import Float
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from . import emotions as emo
from .activations import ActivationConfig, collect_pooled
from .errors import UserError
from .files import save_safetensors, write_json
from .hook_names import hook_name, parse

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

FORMAT_VERSION = 1


class _Text(NamedTuple):
    """A text to pool, as `collect_pooled` takes records."""

    id: str
    text: str


@dataclass
class DirectionConfig:
    """How dense directions are built."""

    neutral_variance: float = 0.5
    """Neutral principal components explaining this fraction of variance are projected out (0: none)."""
    max_neutral_pcs: int = 64
    """Upper bound on the neutral components removed."""


@dataclass
class EmotionDirections:
    """Unit emotion vectors at one hook, with what they were built from."""

    names: list[str]
    layer: int
    vectors: Float[Tensor, "n_emotions d_model"]
    hook: str = ""
    recipe: str = "dense"
    center: Float[Tensor, " d_model"] | None = None
    """Subtracted from activations before projecting (the train grand mean)."""
    latents: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    """Per emotion: (SAE latent id, weight) pairs the vector was assembled from; empty for dense."""
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.vectors.ndim != 2 or self.vectors.shape[0] != len(self.names):
            raise ValueError(f"vectors must be (n_emotions={len(self.names)}, d_model); got {tuple(self.vectors.shape)}")
        if not self.hook:
            self.hook = hook_name(self.layer)

    @property
    def d_model(self) -> int:
        return self.vectors.shape[1]

    def index(self, name: str) -> int:
        if name not in self.names:
            emo.get(name)  # unknown word: raises with suggestions
            raise KeyError(f"Emotion '{name}' is known but not in these directions ({len(self.names)} emotions).")
        return self.names.index(name)

    def vector(self, name: str) -> Float[Tensor, " d_model"]:
        return self.vectors[self.index(name)]

    def project(self, acts: Float[Tensor, "... d_model"]) -> Float[Tensor, "... n_emotions"]:
        """Projection of (centered) activations on every direction."""
        if acts.shape[-1] != self.d_model:
            raise ValueError(
                f"Activations have width {acts.shape[-1]} but these directions have d_model {self.d_model} "
                f"({self.hook}); collect activations at the same model and layer."
            )
        acts = acts.float()
        if self.center is not None:
            acts = acts - self.center.to(acts.device)
        return acts @ self.vectors.to(acts.device).T

    def read(self, model: HookedTransformer, texts: Sequence[str],
             cfg: ActivationConfig | None = None) -> list[dict[str, float]]:
        """Emotion scores of plain texts: each text's activations at these directions' hook, pooled
        over its tokens (the first left out), projected on every direction.

        Example:
            >>> dirs.read(model, ["I can't stop smiling today.", "The bus leaves at nine."])[0]["happy"]
        """
        layer, kind = parse(self.hook) or (self.layer, "hook_resid_post")
        cfg = cfg or ActivationConfig(hook=kind)
        rows = [_Text(str(i), t) for i, t in enumerate(texts)]
        acts = collect_pooled(model, rows, replace(cfg, hook=kind), layers=[layer], desc="read")[self.hook]
        return [dict(zip(self.names, row)) for row in self.project(acts).tolist()]

    def subset(self, names: Sequence[str]) -> "EmotionDirections":
        rows = [self.index(n) for n in names]
        return EmotionDirections(list(names), self.layer, self.vectors[rows], self.hook, self.recipe,
                                 self.center, {n: self.latents[n] for n in names if n in self.latents},
                                 dict(self.metadata))

    def save(self, path: Path | str) -> Path:
        """Write ``directions.safetensors`` and ``directions.json`` into directory ``path`` (atomically)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {"vectors": self.vectors.float().contiguous()}
        if self.center is not None:
            tensors["center"] = self.center.float().contiguous()
        save_safetensors(path / "directions.safetensors", tensors)
        meta = {"format": FORMAT_VERSION, "names": self.names, "layer": self.layer, "hook": self.hook,
                "recipe": self.recipe, "latents": {k: [[int(i), float(w)] for i, w in v] for k, v in self.latents.items()},
                "metadata": self.metadata}
        write_json(path / "directions.json", meta, indent=1)
        return path

    @classmethod
    def load(cls, path: Path | str) -> "EmotionDirections":
        path = Path(path)
        files = (path / "directions.json", path / "directions.safetensors")
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"{f} not found: `path` must be a directory written by EmotionDirections.save "
                                        "(e.g. RUN/directions/dense).")
        fix = "Save the directions again (EmotionDirections.save, or rerun the stage that wrote them)."
        try:
            meta = json.loads(files[0].read_text(encoding="utf-8"))
        except (ValueError, OSError) as e:
            raise UserError(f"{files[0]} is corrupt: not valid JSON ({e}). {fix}") from None
        keys = ("names", "layer", "hook", "recipe", "latents")
        missing = [k for k in keys if not isinstance(meta, dict) or k not in meta]
        if missing:
            raise UserError(f"{files[0]} lacks the key(s) {', '.join(missing)}: not written by "
                            f"EmotionDirections.save. {fix}")
        try:
            tensors = load_file(str(files[1]))
        except (SafetensorError, OSError) as e:
            raise UserError(f"{files[1]} is corrupt: unreadable or truncated safetensors file ({e}). {fix}") from None
        if "vectors" not in tensors:
            raise UserError(f"{files[1]} has no 'vectors' tensor (has {sorted(tensors)}). {fix}")
        try:
            latents = {k: [(int(i), float(w)) for i, w in v] for k, v in meta["latents"].items()}
            return cls(meta["names"], meta["layer"], tensors["vectors"], meta["hook"], meta["recipe"],
                       tensors.get("center"), latents, meta.get("metadata", {}))
        except (ValueError, TypeError, AttributeError) as e:
            raise UserError(f"{path}: directions.json and directions.safetensors disagree ({e}). {fix}") from None


def neutral_basis(neutral: Float[Tensor, "n d_model"], variance: float, max_pcs: int = 64) -> Float[Tensor, "k d_model"]:
    """Top principal directions of neutral activations that explain ``variance`` of their variance."""
    if variance <= 0 or len(neutral) < 2:
        return neutral.new_zeros((0, neutral.shape[1]))
    centered = neutral.float() - neutral.float().mean(0)
    _, s, vh = torch.linalg.svd(centered, full_matrices=False)
    ratio = (s**2).cumsum(0) / (s**2).sum()
    k = int(torch.searchsorted(ratio, torch.tensor(variance)).item()) + 1
    return vh[: min(k, max_pcs)]


def project_out(x: Float[Tensor, "... d"], basis: Float[Tensor, "k d"]) -> Float[Tensor, "... d"]:
    """Remove the span of the orthonormal rows of ``basis`` from ``x``."""
    if basis.shape[0] == 0:
        return x
    return x - (x @ basis.T) @ basis


def build_dense(
    acts: Float[Tensor, "n d_model"],
    labels: Sequence[str],
    neutral: Float[Tensor, "m d_model"],
    layer: int,
    cfg: DirectionConfig = DirectionConfig(),
    hook: str = "",
) -> EmotionDirections:
    """The paper's DiffMean directions from pooled train activations and their emotion labels."""
    if acts.shape[0] != len(labels):
        raise ValueError(f"{acts.shape[0]} activation rows but {len(labels)} labels.")
    if neutral.shape[-1] != acts.shape[-1]:
        raise ValueError(f"Neutral activations have width {neutral.shape[-1]}, emotion ones {acts.shape[-1]}.")
    names = [n for n in emo.NAMES if n in set(labels)] + sorted(set(labels) - set(emo.NAMES))
    index = {n: i for i, n in enumerate(names)}
    y = torch.tensor([index[label] for label in labels])
    acts = acts.float()
    sums = torch.zeros(len(names), acts.shape[1]).index_add_(0, y, acts)
    means = sums / torch.bincount(y, minlength=len(names))[:, None]
    grand = means.mean(0)
    basis = neutral_basis(neutral, cfg.neutral_variance, cfg.max_neutral_pcs)
    diffs = project_out(means - grand, basis)
    vectors = diffs / diffs.norm(dim=1, keepdim=True).clamp(min=1e-8)
    return EmotionDirections(names, layer, vectors, hook, "dense", grand,
                             metadata={"neutral_pcs": int(basis.shape[0]),
                                       "neutral_variance": cfg.neutral_variance,
                                       "n_train": int(acts.shape[0])})


@dataclass
class SAERecipeConfig:
    """How SAE-assembled directions pick and weight latents."""

    ks: list[int] = field(default_factory=lambda: [1, 4, 16, 64])
    """Latents per emotion; one direction set per k."""
    rank_by: str = "auroc"
    """Score that orders candidates: 'auroc', 'cohens_d', 'mean_diff' or 'output'."""
    min_cohens_d: float = 0.2
    """Minimum selectivity: Cohen's d vs the other emotions (a positive mean difference is required)."""
    output_filter: bool = False
    """Keep only latents whose clamping raises the emotion's own words (output score > 0)."""
    weighting: str = "lstsq"
    """'lstsq': non-negative least squares of decoder vectors onto the dense direction; 'score': by Cohen's d."""


RANKS = ("auroc", "cohens_d", "mean_diff", "output")
WEIGHTINGS = ("lstsq", "score")


def select_latents(scores, name: str, k: int, cfg: SAERecipeConfig,
                   output: Tensor | None = None) -> list[int]:
    """Top-k latents of one emotion by ``cfg.rank_by`` among those passing the selectivity filters
    (if none pass, the single best by rank)."""
    if cfg.rank_by not in RANKS:
        raise ValueError(f"rank_by must be one of {RANKS}, got '{cfg.rank_by}'.")
    i = scores.index(name)
    d, diff = scores.cohens_d()[i], scores.mean_diff()[i]
    if cfg.rank_by == "output":
        if output is None:
            raise ValueError("rank_by='output' needs output scores (sae.effects.output_scores).")
        rank = output
    else:
        rank = {"auroc": scores.auroc, "cohens_d": scores.cohens_d, "mean_diff": scores.mean_diff}[cfg.rank_by]()[i]
    rank = rank + 1e-6 * d  # ties (common for AUROC) broken by effect size
    ok = (diff > 0) & (d >= cfg.min_cohens_d)
    if cfg.output_filter:
        if output is None:
            raise ValueError("output_filter needs output scores (sae.effects.output_scores).")
        ok &= output > 0
    ranked = torch.argsort(torch.where(ok, rank, torch.full_like(rank, -torch.inf)), descending=True)
    chosen = [int(j) for j in ranked[: min(k, int(ok.sum()))]]
    return chosen or [int(torch.argmax(rank))]


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
              output_scores: Tensor | None = None) -> EmotionDirections:
    """Per emotion: select k latents, weight them, sum their decoder vectors (unit norm).

    ``output_scores`` is (n_emotions_scored, d_sae) in the order of ``scores.classes`` (as
    `sae.effects.output_scores` returns), used by rank_by='output' and output_filter.
    """
    if dense is not None and dense.d_model != W_dec.shape[1]:
        raise ValueError(f"SAE decoder width {W_dec.shape[1]} != directions d_model {dense.d_model}: "
                         "the SAE must read the same model and layer as the dense directions.")
    if dense is not None and dense.layer != layer:
        raise ValueError(f"SAE layer {layer} != dense directions layer {dense.layer}; use an SAE at layer {dense.layer}.")
    names = [c for c in scores.classes if c != "neutral"]
    vectors, latents = [], {}
    W = W_dec.detach().float().cpu()
    for name in names:
        out_row = output_scores[scores.index(name)] if output_scores is not None else None
        ids = select_latents(scores, name, k, cfg, out_row)
        target = dense.vector(name) if dense is not None and name in dense.names else None
        effect = scores.cohens_d()[scores.index(name)][ids]
        w = latent_weights(W[ids], target, effect, cfg.weighting)
        v = (w[:, None] * W[ids]).sum(0)
        vectors.append(v / v.norm().clamp(min=1e-8))
        latents[name] = [(i, float(x)) for i, x in zip(ids, w)]
    return EmotionDirections(names, layer, torch.stack(vectors), scores.hook, f"sae-k{k}",
                             dense.center if dense is not None else None, latents,
                             metadata={"k": k, "rank_by": cfg.rank_by, "weighting": cfg.weighting,
                                       "min_cohens_d": cfg.min_cohens_d, "output_filter": cfg.output_filter})
