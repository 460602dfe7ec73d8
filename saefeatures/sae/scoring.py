"""Score every SAE latent against the emotion corpus in one streaming pass.

For each batch of records the layer's activations are encoded by the SAE; per class (each emotion,
plus 'neutral') and per latent the pass accumulates sufficient statistics of the record-pooled
latent value (count, sum, sum of squares, a histogram) and of the tokens (firing count, token
count, max with its record and position). Memory is classes x latents (x histogram bins); the
latent matrix of the corpus is never held.

AUROC (one emotion's records vs the other emotions', on pooled values) is computed from the
per-class histograms: zeros are exact, positive values fall in ``hist_bins`` equal bins per latent
from 0 to ``hist_headroom`` x that latent's scale (its largest pooled value in a warm-up sample of
``warmup_records`` records, or in records given; larger values share the last bin), and pairs within one bin count one
half. The error is bounded by the mass that shares a bin (bins are 2.3% of the scale by default;
tests check it against the exact value).

Example:
    >>> scores = score_latents(model, sae, records, ScoringConfig())
    >>> scores.auroc()[scores.index("afraid")].topk(5)
"""

from __future__ import annotations

from collections.abc import Sequence
import functools
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from .. import emotions as emo
from ..activations import ActivationConfig, PooledStore, forward_hooks, iter_batches, pool_batch
from ..distributed import World
from ..dtype_copies import with_dtype
from ..files import load_safetensors, read_json, save_safetensors, write_json

NEUTRAL = "neutral"


def _memo(method):
    """Compute a derived (classes x latents) score once: the statistics never change after the pass,
    and selecting latents for 171 emotions asks for the same matrices again and again."""

    @functools.wraps(method)
    def wrapper(self):
        if method.__name__ not in self._derived:
            self._derived[method.__name__] = method(self)
        return self._derived[method.__name__]

    return wrapper


POOLING_FIELDS = ("dtype", "batch_tokens", "max_tokens", "skip_first")
"""The `ActivationConfig` fields a scoring pass reads records with (kept in `LatentScores.config`)."""


@dataclass
class ScoringConfig:
    """How latents are scored (records are read and pooled per `ActivationConfig`, the one pooling
    config, so the scoring pass can pool the activation stage's rows as it goes)."""

    split: str = "train"
    """Corpus split scored (directions are built from it; the test split stays held out)."""
    hist_bins: int = 64
    """Histogram bins per latent for pooled values above zero (for AUROC)."""
    hist_headroom: float = 1.5
    """The bins span 0 to this multiple of each latent's warm-up scale."""
    warmup_records: int = 256
    """Records (spread over the corpus) whose pooled maxima set each latent's histogram scale."""
    window: int = 24
    """Token activations kept around each class maximum: the feature cards' snippets, read without
    another pass over the corpus."""


@dataclass
class LatentScores:
    """Per class (emotions + neutral) and per latent sufficient statistics, and scores from them."""

    classes: list[str]
    hook: str
    count: Tensor
    """(C,) records per class."""
    sum: Tensor
    """(C, L) sum over records of the pooled latent value (float64: variances are differences)."""
    sumsq: Tensor
    """(C, L) sum of squares of the pooled value (float64)."""
    hist: Tensor
    """(C, L, B) counts of positive pooled values per log bin (zeros are count - hist.sum)."""
    fire: Tensor
    """(C, L) content tokens where the latent is active (> 0)."""
    tokens: Tensor
    """(C,) content tokens per class."""
    max: Tensor
    """(C, L) largest token activation."""
    max_record: Tensor
    """(C, L) index into ``record_ids`` of that token's record (-1: never active)."""
    max_pos: Tensor
    """(C, L) its token position."""
    max_window: Tensor
    """(C, L, window) the latent's activations at positions ``max_pos - window // 2`` onwards in that
    record (entries outside the record are meaningless)."""
    hist_scale: Tensor
    """(L,) each latent's histogram scale (see module doc)."""
    record_ids: list[str]
    config: dict[str, Any]
    _derived: dict[str, Tensor] = field(default_factory=dict, init=False, repr=False, compare=False)

    # ------------------------------------------------------------ derived scores

    @property
    def n_latents(self) -> int:
        return self.sum.shape[1]

    def index(self, name: str) -> int:
        if name not in self.classes:
            emo.get(name)
            raise KeyError(f"Emotion '{name}' was not scored (no records of it in the scored split).")
        return self.classes.index(name)

    def _emotion_rows(self) -> Tensor:
        return torch.tensor([c != NEUTRAL for c in self.classes])

    @_memo
    def means(self) -> Tensor:
        return self.sum / self.count[:, None].clamp(min=1)

    @_memo
    def variances(self) -> Tensor:
        n = self.count[:, None].clamp(min=1)
        return (self.sumsq / n - self.means() ** 2).clamp(min=0)

    @_memo
    def _rest(self) -> tuple[Tensor, Tensor, Tensor]:
        """For each class: count, mean and variance of the records of the *other emotions*."""
        emo_rows = self._emotion_rows()
        n_all = self.count[emo_rows].sum()
        s_all, q_all = self.sum[emo_rows].sum(0), self.sumsq[emo_rows].sum(0)
        own = emo_rows[:, None].float()
        n = (n_all - self.count * emo_rows)[:, None].clamp(min=1)
        mean = (s_all - self.sum * own) / n
        var = ((q_all - self.sumsq * own) / n - mean**2).clamp(min=0)
        return n, mean, var

    @_memo
    def mean_diff(self) -> Tensor:
        """(C, L) class mean minus the mean over the other emotions' records."""
        return (self.means() - self._rest()[1]).float()

    @_memo
    def mean_diff_neutral(self) -> Tensor:
        """(C, L) class mean minus the neutral mean (zeros if neutral was not scored)."""
        if NEUTRAL not in self.classes:
            return torch.zeros_like(self.sum)
        return (self.means() - self.means()[self.index(NEUTRAL)]).float()

    @_memo
    def cohens_d(self) -> Tensor:
        """(C, L) standardized mean difference vs the other emotions (pooled SD)."""
        n_rest, mean_rest, var_rest = self._rest()
        n = self.count[:, None].float()
        pooled = ((n - 1) * self.variances() + (n_rest - 1) * var_rest) / (n + n_rest - 2).clamp(min=1)
        return ((self.means() - mean_rest) / pooled.sqrt().clamp(min=1e-6)).float()

    @_memo
    def firing_rate(self) -> Tensor:
        return self.fire / self.tokens[:, None].clamp(min=1)

    def firing_ratio(self, eps: float = 1e-4) -> Tensor:
        """(C, L) token firing rate of the class over that of the other emotions."""
        emo_rows = self._emotion_rows()
        own = emo_rows[:, None].float()
        rest_fire = self.fire[emo_rows].sum(0) - self.fire * own
        rest_tok = self.tokens[emo_rows].sum() - self.tokens * emo_rows
        return (self.firing_rate() + eps) / (rest_fire / rest_tok[:, None].clamp(min=1) + eps)

    @_memo
    def auroc(self) -> Tensor:
        """(C, L) one-vs-other-emotions AUROC of pooled values, from the histograms (see module doc)."""
        zeros = (self.count[:, None] - self.hist.sum(-1)).unsqueeze(-1)
        h = torch.cat([zeros, self.hist], -1).double()  # (C, L, B+1), bin 0 = exact zeros
        emo_rows = self._emotion_rows()
        total = h[emo_rows].sum(0)
        own = emo_rows[:, None, None].double()
        neg = total - h * own
        below = neg.cumsum(-1) - neg
        n_pos = self.count[:, None].double()
        n_neg = neg.sum(-1)
        u = (h * (below + 0.5 * neg)).sum(-1)
        return (u / (n_pos * n_neg).clamp(min=1)).float()

    def table(self, name: str, top: int = 20, by: str = "auroc") -> list[dict[str, float]]:
        """The top latents of one class with all their scores."""
        i = self.index(name)
        cols = {"auroc": self.auroc()[i], "cohens_d": self.cohens_d()[i], "mean_diff": self.mean_diff()[i],
                "mean_diff_neutral": self.mean_diff_neutral()[i], "firing_ratio": self.firing_ratio()[i],
                "firing_rate": self.firing_rate()[i], "max": self.max[i]}
        order = torch.argsort(cols[by] + 1e-6 * cols["mean_diff"], descending=True)[:top]
        return [{"latent": int(j), **{k: float(v[j]) for k, v in cols.items()}} for j in order]

    # ------------------------------------------------------------ storage

    _TENSORS = ("count", "sum", "sumsq", "hist", "fire", "tokens", "max", "max_record", "max_pos", "max_window",
                "hist_scale")

    def save(self, path: Path | str) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_safetensors(path / "scores.safetensors", {k: getattr(self, k) for k in self._TENSORS})
        write_json(path / "scores.json", {"classes": self.classes, "hook": self.hook, "record_ids": self.record_ids,
                                          "config": self.config}, indent=None)
        return path

    @classmethod
    def load(cls, path: Path | str) -> "LatentScores":
        path = Path(path)
        if not (path / "scores.json").is_file():
            raise FileNotFoundError(f"No latent scores in {path}; run `saefeatures score` first.")
        meta = read_json(path / "scores.json")
        t = load_safetensors(path / "scores.safetensors")
        missing = [k for k in cls._TENSORS if k not in t]
        if missing:
            raise ValueError(f"{path} lacks {missing} (written by an older saefeatures); delete it and score again "
                             "(`saefeatures run` rescores by itself).")
        return cls(meta["classes"], meta["hook"], *(t[k] for k in cls._TENSORS), meta["record_ids"], meta["config"])


class ScoreAccumulator:
    """Streaming sufficient statistics; `update` with each batch's latents, `finish` for the scores."""

    def __init__(self, classes: list[str], scale: Tensor, hook: str, record_ids: list[str], cfg: ScoringConfig,
                 pooling: ActivationConfig | None = None):
        C, L, B = len(classes), scale.shape[0], cfg.hist_bins
        self.classes, self.hook, self.record_ids, self.cfg = classes, hook, record_ids, cfg
        pooling = pooling or ActivationConfig()
        self.pooling = {k: getattr(pooling, k) for k in POOLING_FIELDS}
        self.shape = (C, L, B)
        self.width = (scale * cfg.hist_headroom).clamp(min=1e-6) / B
        self.acc = {
            "count": torch.zeros(C, dtype=torch.long), "sum": torch.zeros(C, L, dtype=torch.float64),
            "sumsq": torch.zeros(C, L, dtype=torch.float64), "hist": torch.zeros(C * L * B, dtype=torch.int32),
            "fire": torch.zeros(C, L, dtype=torch.long), "tokens": torch.zeros(C, dtype=torch.long),
            "max": torch.zeros(C, L), "max_record": torch.full((C, L), -1, dtype=torch.long),
            "max_pos": torch.zeros(C, L, dtype=torch.long), "max_window": torch.zeros(C, L, cfg.window),
        }
        self.offsets = torch.arange(cfg.window) - cfg.window // 2

    def update(self, lat: Float[Tensor, "b pos L"], mask: Tensor, y: Tensor, rec: Tensor) -> None:
        """Add a batch: latents (zeroed outside ``mask``), class index ``y`` and record index ``rec`` per row."""
        acc, (_, L, B) = self.acc, self.shape
        raw = lat.float()
        lat = raw * mask[..., None]
        n_tok = mask.sum(1)
        pooled = pool_batch(lat, mask)
        acc["count"].index_add_(0, y, torch.ones_like(y))
        acc["sum"].index_add_(0, y, pooled.double())
        acc["sumsq"].index_add_(0, y, pooled.double() ** 2)
        acc["fire"].index_add_(0, y, (lat > 0).sum(1))
        acc["tokens"].index_add_(0, y, n_tok)
        b_idx, l_idx = (pooled > 0).nonzero(as_tuple=True)
        bins = (pooled[b_idx, l_idx] / self.width[l_idx]).long().clamp(0, B - 1)
        flat = (y[b_idx] * L + l_idx) * B + bins
        acc["hist"].index_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
        best, pos = lat.max(1)  # best token per (record, latent), then per (class, latent)
        for row in range(lat.shape[0]):
            c = y[row]
            better = best[row] > acc["max"][c]
            acc["max"][c] = torch.where(better, best[row], acc["max"][c])
            acc["max_record"][c] = torch.where(better, rec[row], acc["max_record"][c])
            acc["max_pos"][c] = torch.where(better, pos[row], acc["max_pos"][c])
            idx = better.nonzero(as_tuple=True)[0]
            at = (pos[row, idx][:, None] + self.offsets).clamp(0, lat.shape[1] - 1)
            acc["max_window"][c, idx] = raw[row, at, idx[:, None]]

    def merge(self, world: World, order: Tensor, stage: str = "scoring") -> None:
        """Combine in place the accumulators of every rank (each read its share of the batches): sums,
        counts and histograms all-reduced; each (class, latent) maximum, with its record, position and
        window, from the rank whose record came first in ``order`` (the records' places in the batch
        sequence) among equal maxima: what one process reading every batch in order keeps."""
        if world.size == 1:
            return
        acc = self.acc
        world.sync(stage)
        for k in ("count", "sum", "sumsq", "hist", "fire", "tokens"):
            world.all_reduce(acc[k], stage)
        best = world.all_reduce(acc["max"].clone(), stage, "max")
        last = torch.iinfo(torch.long).max
        held = (acc["max"] == best) & (acc["max_record"] >= 0)
        mine = torch.where(held, order[acc["max_record"].clamp(min=0)], last)
        first = world.all_reduce(mine.clone(), stage, "min")
        own = held & (mine == first)
        for k in ("max_record", "max_pos", "max_window"):
            keep = own if k != "max_window" else own[..., None]
            acc[k] = world.all_reduce(torch.where(keep, acc[k], torch.zeros_like(acc[k])), stage)
        acc["max_record"][first == last] = -1
        acc["max"] = best

    def finish(self) -> LatentScores:
        acc = dict(self.acc)
        acc["hist"] = acc["hist"].view(self.shape)
        return LatentScores(self.classes, self.hook, **acc, hist_scale=self.width * self.shape[2] / self.cfg.hist_headroom,
                            record_ids=self.record_ids, config=asdict(self.cfg) | self.pooling)


def score_classes(records: Sequence) -> list[str]:
    """Scored classes in the paper's emotion order, then 'neutral' if present."""
    present = {r.emotion for r in records}
    unknown = present - set(emo.NAMES) - {NEUTRAL}
    if unknown:
        raise ValueError(f"Records with unknown emotions: {sorted(unknown)[:5]}")
    return [n for n in emo.NAMES if n in present] + ([NEUTRAL] if NEUTRAL in present else [])


@torch.inference_mode()
def score_latents(model, sae, records: Sequence, cfg: ScoringConfig = ScoringConfig(),
                  pooling: ActivationConfig | None = None, desc: str = "scoring", pooled: PooledStore | None = None,
                  scale_records: Sequence | None = None, world: World = World()) -> LatentScores:
    """One pass over ``records`` (``.id``, ``.text``, ``.emotion``) accumulating per-class latent statistics.

    Records are truncated, batched, pooled and run in the dtype of ``pooling`` (default
    `ActivationConfig()`); the SAE encodes in its own dtype. With ``pooled`` (a store of the same
    pooling settings), the pass also stores each
    record's pooled activations at the store's hooks, so the activation stage need not run the
    model over these records again. ``scale_records`` set each latent's histogram scale (default:
    ``cfg.warmup_records`` records spread over ``records``); `saefeatures run` passes the
    evaluation split, whose activations it pools anyway, so the warm-up costs no extra pass.

    Under `torchrun` (``world``) each rank reads every size-th batch of the same batch sequence and
    the statistics are combined exactly (`ScoreAccumulator.merge`): the scores do not depend on
    the number of ranks; each rank stores its records' pooled rows in ``pooled``'s directory.
    """
    hook = sae.cfg.metadata.hook_name
    classes = score_classes(records)
    cls_index = {c: i for i, c in enumerate(classes)}
    rec_index = {r.id: i for i, r in enumerate(records)}
    label = {r.id: cls_index[r.emotion] for r in records}
    pooling = pooling or ActivationConfig()
    run_model = with_dtype(model, pooling.dtype)
    sae_dtype = next(sae.parameters()).dtype

    names = sorted({hook, *(pooled.names if pooled is not None else [])})

    def latents(batches):
        for batch in batches:
            acts = forward_hooks(run_model, batch.tokens, names)
            if pooled is not None:
                mask = batch.content_mask(pooling.skip_first)
                pooled.add(batch.ids, {n: pool_batch(acts[n], mask) for n in pooled.names})
            yield batch, sae.encode(acts[hook].to(sae.device, sae_dtype)).float().cpu()

    def batches_of(recs: Sequence) -> list:
        return list(iter_batches(model.tokenizer, [r.id for r in recs], [r.text for r in recs],
                                 pooling.batch_tokens, pooling.max_tokens))

    if scale_records is None:
        scale_records = records[:: max(1, len(records) // cfg.warmup_records)]
    scale = torch.zeros(sae.cfg.d_sae)
    for batch, lat in latents(world.mine(batches_of(scale_records))):
        scale = torch.maximum(scale, pool_batch(lat, batch.content_mask(pooling.skip_first)).max(0).values)
    world.sync(desc)
    acc = ScoreAccumulator(classes, world.all_reduce(scale, desc, "max"), hook, [r.id for r in records], cfg, pooling)
    batches = batches_of(records)
    order = torch.tensor([rec_index[i] for b in batches for i in b.ids]).argsort()  # record -> place in the sequence
    mine = world.mine(batches)
    for batch, lat in tqdm(latents(mine), desc=desc, unit="batch", total=len(mine), disable=len(records) < 64):
        acc.update(lat, batch.content_mask(pooling.skip_first), torch.tensor([label[i] for i in batch.ids]),
                   torch.tensor([rec_index[i] for i in batch.ids]))
    if pooled is not None:
        pooled.flush()
    acc.merge(world, order, desc)
    return acc.finish()
