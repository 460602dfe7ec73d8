"""Emotion directions: one unit vector per emotion at one layer, saved as safetensors + JSON.

The dense recipe is the paper's: per-emotion mean of pooled activations minus the mean over
emotions, with the top principal components of neutral texts (to 50% of their variance) projected
out, unit norm, from the train split only; by default each emotion's direction then gets the
direction of short sentences naming it added (`saefeatures.concepts`: the embedded model's own
stories carry their emotion weakly; ``DirectionConfig.concept_weight=0`` is the paper's recipe
alone). SAE-assembled directions (`sae.assemble`) use the
same object and keep the latent ids and weights they were built from in ``latents``.

Directions record how their activations were pooled (``metadata["pooling"]``: hook, layer, tokens
kept and skipped, dtype) and keep a sample of neutral texts pooled the same way (``neutral``), so
`EmotionDirections.read` pools new text as they were built and z-scores each projection against
neutral text: raw projections carry a different offset per emotion, and the largest of them is
not the emotion a text expresses (a neutral invoice sentence read top-1 'afraid'). Given neutral
texts, `read` calibrates each text against them cut to its own length: a one-line text pools
early positions, whose offsets differ from a whole story's, and against whole neutral stories a
short neutral sentence reads several SD high on some direction (scripts/bench_read_calibration.py).

Example:
    >>> dirs = EmotionDirections.load("runs/smollm2/directions/dense")
    >>> dirs.read(model, ["I can't stop smiling today."])   # [{'happy': z vs neutral, ...}]
    >>> dirs.read(model, ["I can't stop smiling today."], neutral_texts=neutral)   # z vs neutral of its length
    >>> dirs.read(model, ["I can't stop smiling today."], raw=True)   # raw projections
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
from .activations import ActivationConfig, collect_pooled, tokenize_texts
from .errors import UserError
from .files import save_safetensors, write_json
from .hook_names import hook_name, parse

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

FORMAT_VERSION = 1
DEFAULT_POOLING = ActivationConfig()
"""How directions saved before their pooling was recorded are read: `ActivationConfig`'s defaults."""
POOLING_FIELDS = ("max_tokens", "skip_first", "dtype")
"""The `ActivationConfig` fields ``metadata["pooling"]`` records, beside the hook and layer."""


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
    concept_weight: float = 2.0
    """Weight of the concept-sentence direction added to the story direction (`concepts`; both
    unit norm, neutral components out); 0: the paper's recipe, stories only."""


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
    neutral: Float[Tensor, "n_neutral d_model"] | None = None
    """Pooled activations of neutral texts (pooled as these directions were built): `read`
    z-scores projections against theirs. None: not recorded (directions saved before it was)."""

    def __post_init__(self) -> None:
        if self.vectors.ndim != 2 or self.vectors.shape[0] != len(self.names):
            raise ValueError(f"vectors must be (n_emotions={len(self.names)}, d_model); got {tuple(self.vectors.shape)}")
        if not self.hook:
            self.hook = hook_name(self.layer)
        if self.neutral is not None and (self.neutral.ndim != 2 or len(self.neutral) < 2):
            self.neutral = None  # fewer than two texts give no spread to calibrate against

    @property
    def pooling(self) -> ActivationConfig:
        """How these directions' activations were pooled (`DEFAULT_POOLING` where not recorded)."""
        recorded = self.metadata.get("pooling") or {}
        _, kind = parse(self.hook) or (self.layer, DEFAULT_POOLING.hook)
        return replace(DEFAULT_POOLING, hook=kind,
                       **{k: recorded[k] for k in POOLING_FIELDS if k in recorded})

    def calibration(self) -> tuple[Float[Tensor, " n_emotions"], Float[Tensor, " n_emotions"]]:
        """Mean and SD of each direction's projection over the neutral sample."""
        if self.neutral is None:
            raise UserError(f"These {self.recipe} directions carry no neutral sample to calibrate against "
                            "(saved before it was recorded): attach one with dirs.calibrated(model, neutral_texts), "
                            "or read raw projections with read(..., raw=True).")
        proj = self.project(self.neutral)
        return proj.mean(0), proj.std(0).clamp(min=1e-6)

    def calibrated(self, model: HookedTransformer, texts: Sequence[str]) -> "EmotionDirections":
        """A copy whose neutral sample is ``texts`` (neutral, e.g. a corpus's neutral test split),
        pooled as these directions were built."""
        return replace(self, neutral=neutral_sample(self.pool(model, texts)), metadata={
            **self.metadata, "calibration": {"n_neutral": len(texts), "source": "calibrated()"}})

    def pool(self, model: HookedTransformer, texts: Sequence[str], max_tokens: int | None = None,
             memo: dict | None = None) -> Float[Tensor, "n_texts d_model"]:
        """Activations of plain texts at these directions' hook, pooled as the directions were built
        (each cut to ``max_tokens`` tokens if given: a calibration pass, without a progress bar).
        ``memo``, one dict shared by direction sets read together, keeps the pooled rows, so sets at
        the same hook pooled alike pool each text once."""
        cfg = self.pooling if max_tokens is None else replace(self.pooling, max_tokens=max_tokens)
        key = (self.hook, repr(cfg), tuple(texts))
        if memo is not None and key in memo:
            return memo[key]
        layer, _ = parse(self.hook) or (self.layer, DEFAULT_POOLING.hook)
        rows = [_Text(f"text {i}", t) for i, t in enumerate(texts)]
        acts = collect_pooled(model, rows, cfg, layers=[layer], desc="read", progress=max_tokens is None)[self.hook]
        if memo is not None:
            memo[key] = acts
        return acts

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

    def length_calibration(self, model: HookedTransformer, neutral_texts: Sequence[str], n_tokens: int,
                           memo: dict | None = None) -> tuple[Float[Tensor, " n_emotions"], Float[Tensor, " n_emotions"]]:
        """Mean and SD of each direction's projection over the ``neutral_texts`` at least
        ``n_tokens`` long, each cut to its first ``n_tokens`` tokens and pooled as these directions
        were built: the calibration of a text that pools to ``n_tokens`` tokens (``memo``: `pool`)."""
        lengths = [len(t) for t in tokenize_texts(model.tokenizer, neutral_texts, n_tokens)]
        long_enough = [t for t, n in zip(neutral_texts, lengths) if n >= n_tokens]
        if len(long_enough) < 2:
            raise UserError(f"{len(long_enough)} of the {len(neutral_texts)} neutral texts have {n_tokens} tokens "
                            "or more: calibrating a text needs at least two neutral texts as long as it; give "
                            "longer neutral texts, or read without them (the directions' neutral sample).")
        proj = self.project(self.pool(model, long_enough, n_tokens, memo))
        return proj.mean(0), proj.std(0).clamp(min=1e-6)

    def read(self, model: HookedTransformer, texts: Sequence[str], raw: bool = False,
             neutral_texts: Sequence[str] | None = None, memo: dict | None = None) -> list[dict[str, float]]:
        """Emotion scores of plain texts, pooled as the directions were built (`pooling`): each
        projection as a z-score against neutral text, or, with ``raw``, the projection itself.
        With ``neutral_texts``, each text is z-scored against them cut to its own token length
        (`length_calibration`, one pass per distinct length); without, against the directions'
        neutral sample (`calibration`), pooled from whole texts. ``memo``: see `pool`.

        Example:
            >>> dirs.read(model, ["I can't stop smiling today.", "The bus leaves at nine."])[0]["happy"]
        """
        proj = self.project(self.pool(model, texts, memo=memo))
        if not raw and neutral_texts is None:
            mean, std = self.calibration()
            proj = (proj - mean) / std
        elif not raw:
            lengths = [len(t) for t in tokenize_texts(model.tokenizer, texts, self.pooling.max_tokens)]
            for n in sorted(set(lengths)):
                rows = [i for i, length in enumerate(lengths) if length == n]
                mean, std = self.length_calibration(model, neutral_texts, n, memo)
                proj[rows] = (proj[rows] - mean) / std
        return [dict(zip(self.names, row)) for row in proj.tolist()]

    def subset(self, names: Sequence[str]) -> "EmotionDirections":
        rows = [self.index(n) for n in names]
        return EmotionDirections(list(names), self.layer, self.vectors[rows], self.hook, self.recipe,
                                 self.center, {n: self.latents[n] for n in names if n in self.latents},
                                 dict(self.metadata), self.neutral)

    def save(self, path: Path | str) -> Path:
        """Write ``directions.safetensors`` and ``directions.json`` into directory ``path`` (atomically)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {"vectors": self.vectors.float().contiguous()}
        if self.center is not None:
            tensors["center"] = self.center.float().contiguous()
        if self.neutral is not None:
            tensors["neutral"] = self.neutral.float().contiguous()
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
                       tensors.get("center"), latents, meta.get("metadata", {}), tensors.get("neutral"))
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
    pooling: ActivationConfig | None = None,
    concepts: tuple[Float[Tensor, "c d_model"], Sequence[str]] | None = None,
) -> EmotionDirections:
    """The paper's DiffMean directions from pooled train activations and their emotion labels;
    ``neutral`` (pooled as ``pooling`` says, recorded with the directions) is also their
    calibration sample. With ``concepts`` (pooled concept sentences and their emotions) and
    ``cfg.concept_weight`` > 0, each emotion that has both gets the unit story direction plus the
    weighted unit DiffMean direction of its sentences, renormalised (`saefeatures.concepts`)."""
    if acts.shape[0] != len(labels):
        raise ValueError(f"{acts.shape[0]} activation rows but {len(labels)} labels.")
    if neutral.shape[-1] != acts.shape[-1]:
        raise ValueError(f"Neutral activations have width {neutral.shape[-1]}, emotion ones {acts.shape[-1]}.")
    names = [n for n in emo.NAMES if n in set(labels)] + sorted(set(labels) - set(emo.NAMES))
    basis = neutral_basis(neutral, cfg.neutral_variance, cfg.max_neutral_pcs)
    grand, vectors = _diff_means(acts, labels, names, basis)
    meta: dict[str, Any] = {"neutral_pcs": int(basis.shape[0]), "neutral_variance": cfg.neutral_variance,
                            "n_train": int(acts.shape[0])}
    if concepts is not None and cfg.concept_weight > 0:
        c_acts, c_labels = concepts
        if c_acts.shape[0] != len(c_labels):
            raise ValueError(f"{c_acts.shape[0]} concept rows but {len(c_labels)} concept labels.")
        both = [n for n in names if n in set(c_labels)]
        if len(both) >= 2:
            rows = [i for i, label in enumerate(c_labels) if label in set(both)]
            _, anchor = _diff_means(c_acts[rows], [c_labels[i] for i in rows], both, basis)
            at = [names.index(n) for n in both]
            mixed = vectors[at] + cfg.concept_weight * anchor
            vectors[at] = mixed / mixed.norm(dim=1, keepdim=True).clamp(min=1e-8)
            meta.update(concept_weight=cfg.concept_weight, n_concepts=len(rows), n_concept_emotions=len(both))
    hook = hook or hook_name(layer)
    return EmotionDirections(names, layer, vectors, hook, "dense", grand,
                             metadata={**meta,
                                       "pooling": pooling_record(pooling or DEFAULT_POOLING, hook, layer),
                                       "calibration": {"n_neutral": int(neutral.shape[0]), "source": "train"}},
                             neutral=neutral_sample(neutral))


def _diff_means(acts: Tensor, labels: Sequence[str], names: list[str], basis: Tensor) -> tuple[Tensor, Tensor]:
    """The mean over ``names`` of the per-name means, and each mean minus it with ``basis`` out, unit norm."""
    index = {n: i for i, n in enumerate(names)}
    y = torch.tensor([index[label] for label in labels])
    acts = acts.float()
    sums = torch.zeros(len(names), acts.shape[1]).index_add_(0, y, acts)
    means = sums / torch.bincount(y, minlength=len(names))[:, None]
    grand = means.mean(0)
    diffs = project_out(means - grand, basis)
    return grand, diffs / diffs.norm(dim=1, keepdim=True).clamp(min=1e-8)


def neutral_sample(neutral: Float[Tensor, "n d_model"], size: int = 256) -> Float[Tensor, "m d_model"]:
    """At most ``size`` rows of ``neutral``, evenly spaced: the calibration sample directions keep."""
    return neutral[:: max(1, -(-len(neutral) // size))][:size].float()


def pooling_record(cfg: ActivationConfig, hook: str, layer: int) -> dict[str, Any]:
    """What ``metadata["pooling"]`` records: the hook and layer read, and `POOLING_FIELDS` of ``cfg``."""
    return {"hook": hook, "layer": layer, **{k: getattr(cfg, k) for k in POOLING_FIELDS}}
