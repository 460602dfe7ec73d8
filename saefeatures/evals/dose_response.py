"""Dose-response of emotion steering: for each emotion, method and strength, continuations of fixed
neutral prompts (one batch carries a whole curve) measured by (a) the projection of their
activations, under the unsteered model, on the emotion's direction; (b) the judge (Warriner
valence and arousal of the words); (c) fluency: perplexity under the unsteered model and a
repetition rate. The change of (a) and (b) from strength 0 to the strongest fluent strength has a
bootstrap interval and a permutation null (`Curve.uncertainty`); every continuation is kept.

Methods compared on the same strength axis (a fraction of the mean residual norm): ``dense``
(add the dense direction), ``sae`` (add the SAE-assembled direction) and ``sae_clamp`` (clamp the
emotion's SAE latents, error term kept; `steering.emotion_latent_values` puts the clamp values on
the same scale).

Example:
    >>> curves = dose_response(model, {"dense": dense}, sae, SteeringConfig(), dense, norm)
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .. import emotions as emo
from ..directions import EmotionDirections
from ..distributed import World
from ..hf_hooks import tl_named_hooks
from ..models import hf_twin
from ..stats import group_difference
from ..steering import Generation, Steering, SteeringError, SteeringSpec, generate_steered_full
from .judge import judge, repetition_rate, spearman
from .steering import SteeringConfig

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

log = logging.getLogger(__name__)


@torch.inference_mode()
def suffix_forward(hf: Any, prefix_cache: Any | None, suffixes: Sequence[Sequence[int]], pad: int) -> torch.Tensor:
    """Final hidden states [batch, longest suffix, d_model] of token ``suffixes`` that all continue
    one prefix, given that prefix's KV cache (copied, then repeated over the batch; None: no prefix). Right padding:
    the positions continue the prefix's, and hooks see absolute positions from the prefix length on."""
    width = max(len(t) for t in suffixes)
    n_prefix = prefix_cache.get_seq_length() if prefix_cache is not None else 0
    ids = torch.full((len(suffixes), width), pad, dtype=torch.long)
    attn = torch.zeros((len(suffixes), n_prefix + width), dtype=torch.long)
    attn[:, :n_prefix] = 1
    for r, t in enumerate(suffixes):
        ids[r, :len(t)] = torch.tensor(list(t))
        attn[r, n_prefix:n_prefix + len(t)] = 1
    kv = None
    if prefix_cache is not None:
        kv = copy.deepcopy(prefix_cache)
        kv.batch_repeat_interleave(len(suffixes))
    return hf.base_model(input_ids=ids.to(hf.device), attention_mask=attn.to(hf.device), cache=kv,
                         use_cache=True).last_hidden_state


@torch.inference_mode()
def score_continuations(model: HookedTransformer, gens: Sequence[Generation], hook: str,
                        batch_size: int = 16) -> tuple[torch.Tensor, list[float], list[int]]:
    """Under the unsteered model: pooled activations of each continuation at ``hook``
    [n, d_model], and the summed negative log-likelihood and token count of each continuation.

    Continuations of the same prompt share one forward pass of that prompt (its KV cache is
    repeated over the batch): the steering evaluations continue a few prompts many times, and the
    prompt is half of every sequence."""
    hf = hf_twin(model)
    pad = model.tokenizer.pad_token_id or 0
    pooled = torch.zeros(len(gens), model.cfg.d_model)
    nll, count = [0.0] * len(gens), [0] * len(gens)
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    for i, g in enumerate(gens):
        if g.new_ids:
            by_prompt.setdefault(tuple(g.prompt_ids), []).append(i)
    store: dict[str, torch.Tensor] = {}

    def keep(act: torch.Tensor, positions: torch.Tensor) -> None:  # noqa: ARG001
        store["act"] = act

    for prompt, members in by_prompt.items():
        prefix = hf.base_model(input_ids=torch.tensor([prompt], device=hf.device), use_cache=True)
        first = hf.lm_head(prefix.last_hidden_state[:, -1]).float().cpu()[0]  # predicts each first token
        members.sort(key=lambda i: len(gens[i].new_ids))
        for start in range(0, len(members), batch_size):
            rows = members[start:start + batch_size]
            with tl_named_hooks(hf, [(hook, keep)]):
                final = suffix_forward(hf, prefix.cache, [gens[i].new_ids for i in rows], pad)
            hidden = store.pop("act").float().cpu()
            # logits only where they predict a continuation token (the unembedding is a third of the pass)
            lens = [len(gens[i].new_ids) for i in rows]
            width = final.shape[1]
            at = torch.cat([torch.arange(n - 1) + r * width for r, n in enumerate(lens)])
            logits = hf.lm_head(final.reshape(-1, final.shape[-1])[at.to(final.device)]).float().cpu()
            targets = torch.tensor([t for i in rows for t in gens[i].new_ids[1:]], dtype=torch.long)
            token_nll = logits.logsumexp(-1) - logits.gather(1, targets[:, None])[:, 0]
            first_nll = first.logsumexp(-1) - first[[gens[i].new_ids[0] for i in rows]]
            offset = 0
            for r, (i, n) in enumerate(zip(rows, lens)):
                nll[i] = float(first_nll[r] + token_nll[offset:offset + n - 1].sum())
                count[i] = n
                pooled[i] = hidden[r, :n].mean(0)
                offset += n - 1
    return pooled, nll, count


@dataclass
class CurvePoint:
    """Measures of the continuations at one strength."""

    strength: float
    projection: float | None
    """Mean projection of the continuations' pooled activations on the emotion's direction."""
    valence: float | None
    """Judge: mean Warriner valence of the generated words (1-9)."""
    arousal: float | None
    """Judge: mean Warriner arousal of the generated words (1-9)."""
    n_rated_words: int
    perplexity: float
    """exp(mean NLL per continuation token) under the unsteered model."""
    ppl_ratio: float
    """Perplexity over the unsteered (strength 0) perplexity."""
    repetition: float
    """Mean fraction of repeated word trigrams."""
    sample: str
    """The first continuation, for reading."""
    texts: list[str] = field(default_factory=list)
    """Every continuation, in prompt order (the same order at every strength)."""
    projections: list[float] = field(default_factory=list)
    """Each continuation's projection on the emotion's direction."""


@dataclass
class Curve:
    """One emotion steered by one method at every strength."""

    emotion: str
    method: str
    points: list[CurvePoint]
    note: str = ""

    @classmethod
    def from_dict(cls, c: dict[str, Any]) -> "Curve":
        return cls(c["emotion"], c["method"], [CurvePoint(**p) for p in c["points"]], c.get("note", ""))

    def metrics(self, ppl_limit: float = 2.0) -> dict[str, Any]:
        s = [p.strength for p in self.points]
        fluent = [p for p in self.points if p.ppl_ratio < ppl_limit]
        broken = [p.strength for p in self.points if p.ppl_ratio >= ppl_limit]
        fl = [p.strength for p in fluent]
        rated = emo.get(self.emotion).valence if self.emotion in emo.NAMES else None
        sign = None if rated is None else (1.0 if rated > 5 else -1.0)
        rho = spearman(s, [p.valence for p in self.points])
        return {
            "judge_valence_spearman": rho,
            "expected_valence_sign": sign,
            "judge_valence_spearman_aligned": None if rho is None or sign is None else rho * sign,
            "judge_arousal_spearman": spearman(s, [p.arousal for p in self.points]),
            "projection_spearman": spearman(s, [p.projection for p in self.points]),
            "ppl_spearman": spearman(s, [p.ppl_ratio for p in self.points]),
            "repetition_spearman": spearman(s, [p.repetition for p in self.points]),
            "judge_valence_spearman_fluent": spearman(fl, [p.valence for p in fluent]),
            "max_strength_ppl_ratio_under_2": max(fl) if fl else None,
            "fluency_break_strength": min(broken) if broken else None,
            "valence_change_at_max_fluent": (_delta(self.points, max(fl), "valence") if fl else None),
            "projection_change_at_max_fluent": (_delta(self.points, max(fl), "projection") if fl else None),
            **(self.uncertainty(max(fl)) if fl else {}),
        }

    def uncertainty(self, strength: float) -> dict[str, dict]:
        """``ci`` and ``null`` of the valence and projection change from strength 0 to ``strength``:
        continuations resampled within each strength; strength labels shuffled between the two.
        The valence change weighs each continuation by its rated words, as the point's mean does."""
        base, top = self.points[0], next(p for p in self.points if p.strength == strength)
        ci, null = {}, {}
        if base.texts and top.texts:
            (va, na), (vb, nb) = (_per_text_valence(p.texts) for p in (base, top))
            _, ci["valence_change_at_max_fluent"], null["valence_change_at_max_fluent"] = group_difference(va, vb, na, nb)
        if base.projections and top.projections:
            _, ci["projection_change_at_max_fluent"], null["projection_change_at_max_fluent"] = group_difference(
                np.array(base.projections), np.array(top.projections))
        out = {"ci": {k: v for k, v in ci.items() if v}, "null": {k: v for k, v in null.items() if v}}
        return {k: v for k, v in out.items() if v}


def _per_text_valence(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Each text's mean Warriner valence (0 where none is rated) and its count of rated words."""
    judged = [judge([t]) for t in texts]
    return np.array([v or 0.0 for v, _, _ in judged]), np.array([n for _, _, n in judged], dtype=float)


def _delta(points: list[CurvePoint], strength: float, attr: str) -> float | None:
    base = next(p for p in points if p.strength == min(q.strength for q in points))
    top = next(p for p in points if p.strength == strength)
    a, b = getattr(top, attr), getattr(base, attr)
    return None if a is None or b is None else a - b


def method_source(method: str, dirs_by_recipe: dict[str, EmotionDirections]) -> tuple[EmotionDirections, str, str]:
    """(directions, 'direction' | 'clamp', note) for a method name such as 'dense' or 'sae_clamp'."""
    recipe, clamp = (method[: -len("_clamp")], True) if method.endswith("_clamp") else (method, False)
    note = ""
    if recipe not in dirs_by_recipe:
        if not clamp:
            raise SteeringError(f"Method '{method}': no '{recipe}' directions; have {sorted(dirs_by_recipe)}.")
        with_latents = [k for k, d in dirs_by_recipe.items() if d.latents]
        recipe = with_latents[0] if with_latents else ("dense" if "dense" in dirs_by_recipe else next(iter(dirs_by_recipe)))
        note = f"no '{method[:-6]}' directions: latents from '{recipe}'"
    dirs = dirs_by_recipe[recipe]
    if clamp and not dirs.latents:
        note = (note + "; " if note else "") + f"latents = SAE decoder vectors nearest the {recipe} directions"
    return dirs, "clamp" if clamp else "direction", note


def check_strengths(strengths: Sequence[float]) -> list[float]:
    """The dose-response strengths sorted, or `SteeringError`: they must hold 0 (the unsteered
    baseline) and positive finite values; the curves measure steering toward each emotion."""
    ordered = sorted(strengths)
    if not all(math.isfinite(s) for s in ordered) or len(ordered) < 2 or ordered[0] != 0 or ordered[1] <= 0:
        negative = (" (negative ones steer away, which these curves do not measure: give 0 and positive values; "
                    "to steer away, use `saefeatures steer --emotion NAME=-0.1`)") if ordered and ordered[0] < 0 else ""
        raise SteeringError(f"steering.strengths must hold 0 (the unsteered baseline) and at least one positive "
                            f"finite strength{negative}; got {list(strengths)}.")
    if len(set(ordered)) != len(ordered):
        raise SteeringError(f"steering.strengths has repeated values: {list(strengths)}. List each strength once.")
    return ordered


def dose_response(
    model: HookedTransformer,
    dirs_by_recipe: dict[str, EmotionDirections],
    sae: Any,
    cfg: SteeringConfig,
    reader: EmotionDirections,
    norm: float,
    world: World = World(),
) -> list[Curve]:
    """Curves of every (emotion, method) in the config; one baseline generation is shared. Under
    `torchrun` (``world``) each rank generates every size-th (emotion, method) cell (and the shared
    baseline) and every rank gets all the curves, in the config's order."""
    strengths = check_strengths(cfg.strengths)
    prompts = [p for p in cfg.prompts for _ in range(cfg.samples_per_prompt)]
    gen_kwargs = dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed,
                      repetition_penalty=cfg.repetition_penalty, batch_size=cfg.batch_size, backend="hf")
    t0 = time.perf_counter()
    base = generate_steered_full(model, None, prompts, **gen_kwargs)
    cells = []
    for emotion in cfg.emotions:
        for method in cfg.methods:
            if method.endswith("_clamp") and sae is None:
                log.warning("steering: no SAE, skipping method %s", method)
                continue
            dirs, kind, note = method_source(method, dirs_by_recipe)
            if emotion not in dirs.names:
                log.warning("steering: '%s' is not in the %s directions; skipped", emotion, method)
                continue
            cells.append((emotion, method, dirs, kind, note))
    groups: list[tuple[str, str, str, list[Generation]]] = []
    for emotion, method, dirs, kind, note in world.mine(cells):
        rows = [Steering.from_spec(SteeringSpec(emotions={emotion: s}, method=kind, op=cfg.clamp_op,
                                                positions=cfg.positions, clamp_latents=cfg.clamp_latents),
                                   model, directions=dirs, sae=sae if kind == "clamp" else None, norm=norm)
                for s in strengths[1:]]
        stacked = Steering.stack(rows, repeat=len(prompts))
        gens = generate_steered_full(model, stacked, prompts * len(rows), **gen_kwargs)
        groups.append((emotion, method, note, gens))
        log.info("steering: generated %s / %s (%d continuations, %.0f s so far)", emotion, method,
                 len(gens), time.perf_counter() - t0)
    everything = base + [g for *_, gens in groups for g in gens]
    pooled, nll, count = score_continuations(model, everything, reader.hook)
    proj_all = reader.project(pooled)  # n, n_emotions

    def point(strength: float, sl: slice, emotion: str, base_ppl: float | None) -> CurvePoint:
        gens = everything[sl]
        v, a, n_words = judge([g.text for g in gens])
        tokens = sum(count[sl])
        ppl = math.exp(sum(nll[sl]) / max(tokens, 1))
        col = reader.index(emotion) if emotion in reader.names else None
        proj = float(proj_all[sl, col].mean()) if col is not None else None
        return CurvePoint(strength, proj, v, a, n_words, ppl, ppl / base_ppl if base_ppl else 1.0,
                          float(np.mean([repetition_rate(g.text) for g in gens])), gens[0].text,
                          [g.text for g in gens], proj_all[sl, col].tolist() if col is not None else [])

    curves = []
    offset = len(base)
    for emotion, method, note, gens in groups:
        p0 = point(0.0, slice(0, len(base)), emotion, None)
        points = [p0]
        for k, s in enumerate(strengths[1:]):
            sl = slice(offset + k * len(prompts), offset + (k + 1) * len(prompts))
            points.append(point(s, sl, emotion, p0.perplexity))
        offset += len(gens)
        curves.append(Curve(emotion, method, points, note))
    if world.size == 1:
        return curves
    by_cell = {(c["emotion"], c["method"]): c for part in world.sync("steering", payload=[asdict(c) for c in curves])
               for c in part}
    return [Curve.from_dict(by_cell[emotion, method]) for emotion, method, *_ in cells]


MEASURES = (("projection", "projection on direction"), ("valence", "judge valence (Warriner)"),
            ("arousal", "judge arousal (Warriner)"), ("ppl_ratio", "perplexity / unsteered"),
            ("repetition", "repeated trigrams"))
"""`CurvePoint` attributes of a dose-response curve, with their axis labels."""
