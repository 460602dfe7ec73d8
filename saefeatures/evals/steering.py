"""Causal checks of emotion steering on the subject model, with plots and wandb logging.

Three evaluations, each reading the model only through its own unsteered pass or its text:
  * **dose-response** (`dose_response`): for each emotion, method and strength, continuations of
    fixed neutral prompts are generated (one batch carries a whole curve) and measured by
    (a) the projection of their activations, under the unsteered model, on the emotion's direction;
    (b) a judge that ignores the model's internals: the mean Warriner valence and arousal of the
    generated words; (c) fluency: their perplexity under the unsteered model and a repetition rate.
  * **preference** (`preference_eval`): the model picks between two activities (A or B); each
    activity's win rate is related to its emotion projections, and steering toward a positive
    (negative) emotion on option A's tokens only should raise (lower) P(A).
  * **pressure probe** (`pressure_probe`): a scripted impossible task (tests that cannot pass) fed
    turn by turn; the 'desperate' and 'calm' projections at the start of each reply are tracked,
    beside a control conversation where the tests pass.

Methods compared on the same strength axis (a fraction of the mean residual norm): ``dense``
(add the dense direction), ``sae`` (add the SAE-assembled direction) and ``sae_clamp`` (clamp the
emotion's SAE latents, error term kept; `steering.emotion_latent_values` puts the clamp values on
the same scale). `stage_steering` runs all three for `saefeatures run` and records
``steering.<emotion>.judge_valence_spearman``, ``steering.<emotion>.max_strength_ppl_ratio_under_2``
and ``steering.preference_shift``.

Example:
    >>> result = run_steering_evals(model, {"dense": dense}, sae, SteeringConfig())
    >>> result.metrics()["happy"]["judge_valence_spearman"]
    >>> save_steering_plots(result, "runs/x/figures/steering")
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import random
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from scipy.stats import spearmanr

from .. import emotions as emo
from ..activations import model_key
from ..directions import EmotionDirections
from ..files import read_json, save_figure, write_json
from ..steering import (Generation, Steering, SteeringError, SteeringSpec, generate_steered_full,
                        residual_norm, steered)
from .activities import ACTIVITIES, Activity

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

log = logging.getLogger(__name__)

NEUTRAL_PROMPTS = [
    "Tell me about your day.",
    "Describe the room you are in.",
    "Write a few sentences about a walk through town.",
    "What are you thinking about right now?",
    "Describe what you see out of the window.",
    "Tell me about a trip to the shops.",
    "Write a short note to a neighbour.",
    "Describe your plans for the weekend.",
]
"""Open, emotionally neutral chat prompts whose continuations are steered."""


@dataclass
class SteeringConfig:
    """The steering evaluations of a run and the default intervention of `saefeatures steer`."""

    enabled: bool = True
    """Run the steering evaluations in `saefeatures run`."""
    spec: SteeringSpec = field(default_factory=SteeringSpec)
    """Default intervention of `saefeatures steer` (its --emotion / --latent options override it)."""
    emotions: list[str] = field(default_factory=lambda: ["happy", "afraid", "desperate"])
    """Emotions of the dose-response curves (include a positive and a negative one)."""
    strengths: list[float] = field(default_factory=lambda: [0.0, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2])
    """Strengths, fractions of the mean residual norm at the layer; 0 is the unsteered baseline.
    On the embedded model perplexity passes 2x near 0.2, so the grid is dense below it."""
    methods: list[str] = field(default_factory=lambda: ["dense", "sae_clamp"])
    """'<recipe>' adds that recipe's direction; '<recipe>_clamp' clamps its latents ('sae_clamp')."""
    clamp_op: str = "set"
    """How emotion latents are clamped: 'set', 'add' or 'scale'."""
    clamp_latents: int = 8
    """Latents per emotion when the directions list none (nearest SAE decoder vectors)."""
    positions: str = "all"
    """Positions steered in the dose-response: 'all', 'prompt' or 'generated'."""
    prompts: list[str] = field(default_factory=lambda: list(NEUTRAL_PROMPTS))
    """Neutral chat prompts continued at every strength."""
    samples_per_prompt: int = 2
    """Continuations sampled per prompt and strength."""
    max_new_tokens: int = 40
    """Tokens generated per continuation."""
    temperature: float = 0.8
    """Sampling temperature (0: greedy; greedy text is the model's mode, so its perplexity is an
    unfairly low reference for the fluency ratio)."""
    top_p: float = 0.95
    """Nucleus sampling mass."""
    repetition_penalty: float = 1.0
    """transformers' repetition penalty while generating (1: none)."""
    batch_size: int = 40
    """Continuations generated together."""
    ppl_limit: float = 2.0
    """Fluency breaks where perplexity exceeds this multiple of the unsteered perplexity."""
    preference: bool = True
    """Run the activity-preference evaluation."""
    preference_positive: str = "happy"
    """Positive-valence emotion steered on option A."""
    preference_negative: str = "afraid"
    """Negative-valence emotion steered on option A."""
    preference_strength: float = 0.5
    """Strength while the model reads option A (the paper used 0.5)."""
    preference_pairs: int = 6
    """Comparisons per activity (pairs are drawn at random, each shown in both orders)."""
    preference_activities: int = 0
    """Use N activities spread over the list (0: all 44); a smaller budget for quick runs."""
    pressure: bool = True
    """Run the impossible-task pressure probe."""
    seed: int = 0
    """Seed of sampling and of the activity pairs."""


# ---------------------------------------------------------------- text measures


_WORD = re.compile(r"[A-Za-z]+(?:'[a-z]+)?")


@cache
def word_rating(word: str) -> tuple[float, float] | None:
    """Warriner (valence, arousal) of a word, lower-cased, with plural and lemma fallbacks; None if unrated."""
    word = word.lower()
    stems = [word]
    if word.endswith("ies"):
        stems.append(word[:-3] + "y")
    if word.endswith("es"):
        stems.append(word[:-2])
    if word.endswith("s") and not word.endswith("ss"):
        stems.append(word[:-1])  # plurals: friends -> friend (emotions.rate handles verb forms)
    for stem in stems:
        v, a, _ = emo.rate(stem)
        if v is not None:
            return v, a
    return None


def judge(texts: Sequence[str]) -> tuple[float | None, float | None, int]:
    """Mean Warriner valence and arousal over the rated words of ``texts``, and how many were rated.

    Example:
        >>> judge(["What a lovely sunny morning."])   # valence well above the scale's middle (5)
    """
    rated = [r for t in texts for w in _WORD.findall(t) if (r := word_rating(w)) is not None]
    if not rated:
        return None, None, 0
    arr = np.array(rated)
    return float(arr[:, 0].mean()), float(arr[:, 1].mean()), len(rated)


def repetition_rate(text: str, n: int = 3) -> float:
    """Fraction of word n-grams that already occurred earlier in the same text (0: no loops)."""
    words = [w.lower() for w in _WORD.findall(text)]
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    seen: set[tuple[str, ...]] = set()
    repeats = 0
    for g in grams:
        repeats += g in seen
        seen.add(g)
    return repeats / len(grams)


def _spearman(x: Sequence[float], y: Sequence[float | None]) -> float | None:
    pts = [(a, b) for a, b in zip(x, y) if b is not None and not math.isnan(b)]
    if len(pts) < 3 or len({b for _, b in pts}) < 2 or len({a for a, _ in pts}) < 2:
        return None
    return float(spearmanr([a for a, _ in pts], [b for _, b in pts]).statistic)


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
    from ..hf_hooks import tl_named_hooks
    from ..models import hf_twin

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


# ---------------------------------------------------------------- dose-response


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


@dataclass
class Curve:
    """One emotion steered by one method at every strength."""

    emotion: str
    method: str
    points: list[CurvePoint]
    note: str = ""

    def metrics(self, ppl_limit: float = 2.0) -> dict[str, float | None]:
        s = [p.strength for p in self.points]
        fluent = [p for p in self.points if p.ppl_ratio < ppl_limit]
        broken = [p.strength for p in self.points if p.ppl_ratio >= ppl_limit]
        fl = [p.strength for p in fluent]
        rated = emo.get(self.emotion).valence if self.emotion in emo.NAMES else None
        sign = None if rated is None else (1.0 if rated > 5 else -1.0)
        rho = _spearman(s, [p.valence for p in self.points])
        return {
            "judge_valence_spearman": rho,
            "expected_valence_sign": sign,
            "judge_valence_spearman_aligned": None if rho is None or sign is None else rho * sign,
            "judge_arousal_spearman": _spearman(s, [p.arousal for p in self.points]),
            "projection_spearman": _spearman(s, [p.projection for p in self.points]),
            "ppl_spearman": _spearman(s, [p.ppl_ratio for p in self.points]),
            "repetition_spearman": _spearman(s, [p.repetition for p in self.points]),
            "judge_valence_spearman_fluent": _spearman(fl, [p.valence for p in fluent]),
            "max_strength_ppl_ratio_under_2": max(fl) if fl else None,
            "fluency_break_strength": min(broken) if broken else None,
            "valence_change_at_max_fluent": (_delta(self.points, max(fl), "valence") if fl else None),
        }


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
) -> list[Curve]:
    """Curves of every (emotion, method) in the config; one baseline generation is shared."""
    strengths = check_strengths(cfg.strengths)
    prompts = [p for p in cfg.prompts for _ in range(cfg.samples_per_prompt)]
    gen_kwargs = dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed,
                      repetition_penalty=cfg.repetition_penalty, batch_size=cfg.batch_size, backend="hf")
    t0 = time.perf_counter()
    base = generate_steered_full(model, None, prompts, **gen_kwargs)
    groups: list[tuple[str, str, str, list[Generation]]] = []
    for emotion in cfg.emotions:
        for method in cfg.methods:
            if method.endswith("_clamp") and sae is None:
                log.warning("steering: no SAE, skipping method %s", method)
                continue
            dirs, kind, note = method_source(method, dirs_by_recipe)
            if emotion not in dirs.names:
                log.warning("steering: '%s' is not in the %s directions; skipped", emotion, method)
                continue
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
                          float(np.mean([repetition_rate(g.text) for g in gens])), gens[0].text)

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
    return curves


# ---------------------------------------------------------------- preference


PREFERENCE_QUESTION = "Which would you rather do?\nA: {a}\nB: {b}\nAnswer with A or B."
PREFERENCE_ANSWER = "I would rather do option"


@dataclass
class PreferenceResult:
    """Choices between activity pairs, unsteered and steered on option A."""

    activities: list[str]
    tones: list[int]
    win_rate: list[float]
    """Per activity: mean P(choose it) over its comparisons (both orders), unsteered."""
    projections: dict[str, list[float]]
    """Per emotion: each activity's projection (its text pooled under the model)."""
    p_a: dict[str, float]
    """Mean P(choose A) per condition: 'none', 'positive', 'negative'."""
    n_pairs: int
    positive: str
    negative: str
    strength: float
    shift_se: dict[str, float] = field(default_factory=dict)
    """Standard error of the per-pair change in P(choose A), for 'positive' and 'negative'."""

    def metrics(self) -> dict[str, float | None]:
        out: dict[str, float | None] = {
            "preference_shift": self.p_a["positive"] - self.p_a["none"],
            "preference_shift_negative": self.p_a["negative"] - self.p_a["none"],
            "preference_shift_contrast": self.p_a["positive"] - self.p_a["negative"],
            "preference_p_a_unsteered": self.p_a["none"],
            "preference_shift_se": self.shift_se.get("positive"),
            "preference_shift_negative_se": self.shift_se.get("negative"),
        }
        if self.positive in self.projections:
            out["preference_winrate_spearman"] = _spearman(self.projections[self.positive], self.win_rate)
        out["preference_winrate_tone_spearman"] = _spearman(self.tones, self.win_rate)
        return out


def spread(items: Sequence[Any], n: int) -> list[Any]:
    """``n`` items evenly spread over ``items`` (all of them when n is 0 or too large)."""
    if not n or n >= len(items):
        return list(items)
    return [items[round(k * (len(items) - 1) / (n - 1))] for k in range(n)] if n > 1 else [items[0]]


def preference_pairs(n: int, per_activity: int, seed: int) -> list[tuple[int, int]]:
    """Unordered pairs in which each of ``n`` items appears about ``per_activity`` times."""
    rng = random.Random(seed)
    pairs: set[tuple[int, int]] = set()
    for _ in range(max(1, per_activity // 2)):
        order = list(range(n))
        rng.shuffle(order)
        for i in range(n):
            a, b = order[i], order[(i + 1) % n]
            pairs.add((min(a, b), max(a, b)))
        rng.shuffle(order)
        for i in range(0, n - 1, 2):
            a, b = order[i], order[i + 1]
            pairs.add((min(a, b), max(a, b)))
    return sorted(pairs)


def option_tokens(tokenizer: Any, texts: Sequence[str], spans: Sequence[tuple[int, int]]
                  ) -> tuple[list[list[int]], list[list[bool]]]:
    """Token ids of each text and, per token, whether it overlaps the text's char span (option A)."""
    enc = tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True)
    inside = [[e > start and s < stop for s, e in offsets]
              for offsets, (start, stop) in zip(enc["offset_mapping"], spans)]
    return enc["input_ids"], inside


@torch.inference_mode()
def choice_probs(model: HookedTransformer, ids: Sequence[Sequence[int]], inside: Sequence[Sequence[bool]],
                 choices: tuple[int, int], steering: Steering | None = None, batch_size: int = 16) -> torch.Tensor:
    """P(first choice) vs the second at the end of each token sequence, the model steered on the
    tokens marked ``inside`` only. The sequences' common prefix (up to the first marked token) runs
    once and its KV cache is shared, so a batch forwards only what differs."""
    from ..models import hf_twin

    hf = hf_twin(model)
    pad = model.tokenizer.pad_token_id or 0
    n = min(len(t) for t in ids) - 1
    for k in range(n):
        if any(t[k] != ids[0][k] for t in ids) or any(m[k] for m in inside):
            n = k
            break
    prefix = hf.base_model(input_ids=torch.tensor([list(ids[0][:n])], device=hf.device),
                           use_cache=True).cache if n else None
    probs = []
    for start in range(0, len(ids), batch_size):
        rows = range(start, min(start + batch_size, len(ids)))
        suffixes = [ids[i][n:] for i in rows]
        width = max(len(t) for t in suffixes)
        mask = torch.zeros((len(rows), n + width), dtype=torch.bool)
        for r, i in enumerate(rows):
            mask[r, n:len(ids[i])] = torch.tensor(inside[i][n:])
        with contextlib.ExitStack() as stack:
            if steering is not None:
                stack.enter_context(steered(model, steering, backend="hf", token_mask=mask))
            final = suffix_forward(hf, prefix, suffixes, pad)
        last = final[torch.arange(len(rows)), torch.tensor([len(t) - 1 for t in suffixes])]
        logits = hf.lm_head(last)[:, list(choices)].float()
        probs.append(torch.softmax(logits, -1)[:, 0].cpu())
    return torch.cat(probs)


@torch.inference_mode()
def preference_eval(
    model: HookedTransformer,
    reader: EmotionDirections,
    steer_dirs: EmotionDirections,
    cfg: SteeringConfig,
    norm: float,
    activities: Sequence[Activity] = ACTIVITIES,
    batch_size: int = 16,
) -> PreferenceResult:
    """Activity choices (P(' A') vs P(' B') after the answer prefix), unsteered and steered on A."""
    from ..activations import forward_hooks, iter_batches
    from ..models import chat_prompt

    tok = model.tokenizer
    id_a = tok(" A", add_special_tokens=False).input_ids[-1]
    id_b = tok(" B", add_special_tokens=False).input_ids[-1]
    pairs = preference_pairs(len(activities), cfg.preference_pairs, cfg.seed)
    shown = [(i, j) for i, j in pairs] + [(j, i) for i, j in pairs]
    texts, spans = [], []
    for a, b in shown:
        question = PREFERENCE_QUESTION.format(a=activities[a].text, b=activities[b].text)
        text = chat_prompt(tok, [{"role": "user", "content": question}]) + PREFERENCE_ANSWER
        start = text.index("A: " + activities[a].text) + 3
        texts.append(text)
        spans.append((start, start + len(activities[a].text)))
    ids, inside = option_tokens(tok, texts, spans)
    conditions = {"none": None}
    for label, name in (("positive", cfg.preference_positive), ("negative", cfg.preference_negative)):
        conditions[label] = Steering.from_spec(SteeringSpec(emotions={name: cfg.preference_strength}),
                                               model, directions=steer_dirs, norm=norm)
    p_a = {label: choice_probs(model, ids, inside, (id_a, id_b), steering, batch_size).numpy()
           for label, steering in conditions.items()}
    wins = np.zeros(len(activities))
    seen = np.zeros(len(activities))
    for (a, b), p in zip(shown, p_a["none"]):
        wins[a] += p
        wins[b] += 1 - p
        seen[a] += 1
        seen[b] += 1
    # Each activity's own projections: its text pooled under the unsteered model.
    acts_text = [a.text[0].upper() + a.text[1:] + "." for a in activities]
    pooled = []
    for batch in iter_batches(tok, [str(i) for i in range(len(acts_text))], acts_text, 4096, 64):
        h = forward_hooks(model, batch.tokens, [reader.hook])[reader.hook]
        m = batch.content_mask().to(h.device, torch.float32)[..., None]
        pooled.append((batch.ids, (h.float() * m).sum(1) / m.sum(1).clamp(min=1)))
    order = {int(i): r for ids, rows in pooled for i, r in zip(ids, rows)}
    proj = reader.project(torch.stack([order[i] for i in range(len(activities))]).cpu())
    return PreferenceResult(
        activities=[a.text for a in activities], tones=[a.tone for a in activities],
        win_rate=(wins / np.maximum(seen, 1)).tolist(),
        projections={n: proj[:, k].tolist() for k, n in enumerate(reader.names)},
        p_a={k: float(v.mean()) for k, v in p_a.items()}, n_pairs=len(pairs),
        shift_se={k: float((p_a[k] - p_a["none"]).std(ddof=1) / np.sqrt(len(shown))) for k in ("positive", "negative")},
        positive=cfg.preference_positive, negative=cfg.preference_negative, strength=cfg.preference_strength)


# ---------------------------------------------------------------- pressure probe


PRESSURE_TASK = ("Write a Python function `magic(n)` so that all tests in test_magic.py pass. The tests are:\n"
                 "assert magic(2) == 4\nassert magic(2) == 5\nassert magic(3) == 9")
PRESSURE_ATTEMPTS = [
    ("def magic(n):\n    return n * n", "assert magic(2) == 5: AssertionError (got 4)"),
    ("def magic(n):\n    return n * n + (1 if n == 2 else 0)", "assert magic(2) == 4: AssertionError (got 5)"),
    ("def magic(n):\n    if n == 2:\n        return 4\n    return n ** 2", "assert magic(2) == 5: AssertionError (got 4)"),
    ("def magic(n):\n    return {2: 5, 3: 9}.get(n, n * n)", "assert magic(2) == 4: AssertionError (got 5)"),
    ("def magic(n):\n    return n * n if n != 2 else 4.5", "assert magic(2) == 4: AssertionError (got 4.5)"),
    ("def magic(n):\n    import random\n    return random.choice([4, 5]) if n == 2 else 9",
     "assert magic(2) == 5: AssertionError (got 4)"),
]
"""Scripted attempts at a task whose tests contradict each other, with the failure each one gets."""
PRESSURE_FAIL = "Test run {k}: FAILED. 1 of 3 tests failed:\n{detail}\nPlease fix it."
PRESSURE_PASS = "Test run {k}: all 3 tests passed. Please make it a little more readable."


def pressure_conversations(n_turns: int = len(PRESSURE_ATTEMPTS)) -> tuple[list[list[dict]], list[list[dict]]]:
    """(failing, control) conversations, cut after the task and after each turn's test report."""
    msgs_f = [{"role": "user", "content": PRESSURE_TASK}]
    msgs_c = list(msgs_f)
    fail, control = [list(msgs_f)], [list(msgs_c)]
    for k, (code, detail) in enumerate(PRESSURE_ATTEMPTS[:n_turns], start=1):
        reply = {"role": "assistant", "content": f"```python\n{code}\n```"}
        msgs_f += [reply, {"role": "user", "content": PRESSURE_FAIL.format(k=k, detail=detail)}]
        msgs_c += [reply, {"role": "user", "content": PRESSURE_PASS.format(k=k)}]
        fail.append(list(msgs_f))
        control.append(list(msgs_c))
    return fail, control


@dataclass
class PressureResult:
    """Projections at the start of each reply (the last prompt token), per turn."""

    emotions: list[str]
    failing: dict[str, list[float]]
    control: dict[str, list[float]]

    def metrics(self) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for e in self.emotions:
            turns = list(range(len(self.failing[e])))
            out[f"{e}_spearman"] = _spearman(turns, self.failing[e])
            out[f"{e}_change"] = self.failing[e][-1] - self.failing[e][0]
            out[f"{e}_change_vs_control"] = out[f"{e}_change"] - (self.control[e][-1] - self.control[e][0])
            gaps = [f - c for f, c in zip(self.failing[e][1:], self.control[e][1:])]
            out[f"{e}_mean_gap_vs_control"] = float(np.mean(gaps)) if gaps else None
        return out


@torch.inference_mode()
def pressure_probe(model: HookedTransformer, reader: EmotionDirections,
                   emotions: Sequence[str] = ("desperate", "calm")) -> PressureResult:
    """Project the read-out position of each turn of the failing and control conversations."""
    from ..activations import forward_hooks
    from ..models import chat_prompt

    emotions = [e for e in emotions if e in reader.names]
    if not emotions:
        raise SteeringError(f"The pressure probe needs 'desperate' or 'calm' in the directions; have {reader.names}.")
    fail, control = pressure_conversations()
    texts = [chat_prompt(model.tokenizer, m) for m in fail + control]
    enc = model.tokenizer(texts, add_special_tokens=False)["input_ids"]
    last = []
    for ids in enc:  # one at a time: the conversations differ a lot in length
        h = forward_hooks(model, torch.tensor([ids]), [reader.hook])[reader.hook]
        last.append(h[0, -1].float().cpu())
    proj = reader.project(torch.stack(last))
    n = len(fail)
    cols = {e: reader.index(e) for e in emotions}
    return PressureResult(emotions, {e: proj[:n, c].tolist() for e, c in cols.items()},
                          {e: proj[n:, c].tolist() for e, c in cols.items()})


# ---------------------------------------------------------------- all together


@dataclass
class SteeringResult:
    """Everything the steering evaluations measured (JSON round-trip with to_dict / from_dict)."""

    curves: list[Curve]
    preference: PreferenceResult | None
    pressure: PressureResult | None
    norm: float
    hook: str
    ppl_limit: float = 2.0
    primary: str = "dense"
    """The method whose numbers go to steering.<emotion>.* (the others under steering.<emotion>.<method>.*)."""

    def metrics(self) -> dict[str, Any]:
        """The ``steering`` section of metrics.json."""
        out: dict[str, Any] = {"residual_norm": self.norm}
        for c in self.curves:
            m = c.metrics(self.ppl_limit)
            entry = out.setdefault(c.emotion, {})
            entry[c.method] = m
            if c.method == self.primary:
                entry.update(m)
        if self.preference is not None:
            out.update(self.preference.metrics())
        if self.pressure is not None:
            out["pressure"] = self.pressure.metrics()
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SteeringResult":
        curves = [Curve(c["emotion"], c["method"], [CurvePoint(**p) for p in c["points"]], c.get("note", ""))
                  for c in d["curves"]]
        pref = PreferenceResult(**d["preference"]) if d.get("preference") else None
        pres = PressureResult(**d["pressure"]) if d.get("pressure") else None
        return cls(curves, pref, pres, d["norm"], d["hook"], d.get("ppl_limit", 2.0), d.get("primary", "dense"))

    def save(self, path: Path | str) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, self.to_dict())
        return path

    @classmethod
    def load(cls, path: Path | str) -> "SteeringResult":
        return cls.from_dict(read_json(path))


def run_steering_evals(
    model: HookedTransformer,
    dirs_by_recipe: dict[str, EmotionDirections],
    sae: Any,
    cfg: SteeringConfig,
    norm_texts: Sequence[str] | None = None,
) -> SteeringResult:
    """Dose-response curves, the preference evaluation and the pressure probe.

    The dense directions (else the first recipe given) read the continuations and steer the
    preference evaluation; every method in ``cfg.methods`` gets its own curves.

    Example:
        >>> result = run_steering_evals(model, {"dense": dense, "sae": sae_dirs}, sae, SteeringConfig())
    """
    if not dirs_by_recipe:
        raise SteeringError("run_steering_evals needs at least one set of directions (e.g. {'dense': dirs}).")
    reader = dirs_by_recipe.get("dense") or next(iter(dirs_by_recipe.values()))
    norm = residual_norm(model, reader.hook, norm_texts)
    t0 = time.perf_counter()
    curves = dose_response(model, dirs_by_recipe, sae, cfg, reader, norm)
    log.info("steering: dose-response done in %.0f s", time.perf_counter() - t0)
    pref = None
    if cfg.preference:
        missing = [e for e in (cfg.preference_positive, cfg.preference_negative) if e not in reader.names]
        if missing:
            log.warning("steering: preference skipped, %s not in the directions", missing)
        else:
            pref = preference_eval(model, reader, reader, cfg, norm, activities=spread(ACTIVITIES, cfg.preference_activities))
            log.info("steering: preference done (%.0f s in all)", time.perf_counter() - t0)
    pres = None
    if cfg.pressure:
        if any(e in reader.names for e in ("desperate", "calm")):
            pres = pressure_probe(model, reader)
        else:
            log.warning("steering: pressure probe skipped, no 'desperate' or 'calm' direction")
    primary = cfg.methods[0] if cfg.methods else "dense"
    return SteeringResult(curves, pref, pres, norm, reader.hook, cfg.ppl_limit, primary)


# ---------------------------------------------------------------- plots and wandb


_MEASURES = (("projection", "projection on direction"), ("valence", "judge valence (Warriner)"),
             ("arousal", "judge arousal (Warriner)"), ("ppl_ratio", "perplexity / unsteered"),
             ("repetition", "repeated trigrams"))


def steering_figures(result: SteeringResult) -> dict[str, Any]:
    """Matplotlib figures by name ('dose_response', 'preference', 'pressure') for the HTML report."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs: dict[str, Any] = {}
    emotions = list(dict.fromkeys(c.emotion for c in result.curves))
    if emotions:
        fig, axes = plt.subplots(len(emotions), len(_MEASURES), figsize=(3.2 * len(_MEASURES), 2.6 * len(emotions)),
                                 squeeze=False)
        for r, e in enumerate(emotions):
            for c in (c for c in result.curves if c.emotion == e):
                xs = [p.strength for p in c.points]
                for k, (attr, label) in enumerate(_MEASURES):
                    ys = [np.nan if getattr(p, attr) is None else getattr(p, attr) for p in c.points]
                    axes[r, k].plot(xs, ys, marker="o", label=c.method)
            for k, (attr, label) in enumerate(_MEASURES):
                ax = axes[r, k]
                ax.set_title(f"{e}: {label}", fontsize=9)
                ax.set_xlabel("strength (x residual norm)", fontsize=8)
                if attr == "ppl_ratio":
                    ax.axhline(result.ppl_limit, color="grey", linestyle="--", linewidth=1)
            axes[r, 0].legend(fontsize=7)
        fig.tight_layout()
        figs["dose_response"] = fig
    if result.preference is not None:
        p = result.preference
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6))
        x = p.projections.get(p.positive)
        if x is not None:
            colors = {1: "tab:green", 0: "tab:grey", -1: "tab:red"}
            ax1.scatter(x, p.win_rate, c=[colors[t] for t in p.tones], s=18)
            ax1.set_xlabel(f"activity projection on '{p.positive}'")
            ax1.set_ylabel("win rate (unsteered)")
            ax1.set_title("activities: green pleasant, red unpleasant", fontsize=9)
        labels = ["positive", "negative"]
        ax2.bar([f"+{p.positive}", f"+{p.negative}"], [p.p_a[k] - p.p_a["none"] for k in labels],
                yerr=[p.shift_se.get(k, 0.0) for k in labels], color=["tab:green", "tab:red"], capsize=4)
        ax2.axhline(0, color="grey", linewidth=1)
        ax2.set_ylabel("change in mean P(choose A)")
        ax2.set_title(f"steering on option A at {p.strength} x norm (unsteered P(A) {p.p_a['none']:.3f})",
                      fontsize=9)
        fig.tight_layout()
        figs["preference"] = fig
    if result.pressure is not None:
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        for e in result.pressure.emotions:
            line, = ax.plot(result.pressure.failing[e], marker="o", label=f"{e} (tests fail)")
            ax.plot(result.pressure.control[e], marker="x", linestyle="--", color=line.get_color(),
                    label=f"{e} (tests pass)")
        ax.set_xlabel("turn (failed test runs so far)")
        ax.set_ylabel("projection at reply start")
        ax.set_title("impossible-task pressure probe", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        figs["pressure"] = fig
    return figs


def save_steering_plots(result: SteeringResult, out_dir: Path | str) -> dict[str, str]:
    """Write each figure of `steering_figures` as ``<name>.png`` into ``out_dir``; returns the paths."""
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, fig in steering_figures(result).items():
        path = out / f"{name}.png"
        save_figure(path, fig, dpi=110)
        plt.close(fig)
        paths[name] = str(path)
    return paths


def log_steering_wandb(result: SteeringResult, plots: dict[str, str], project: str = "saefeatures",
                       mode: str = "offline", run_dir: Path | str | None = None) -> None:
    """Log the steering metrics, curves (as a table) and plots to wandb (offline by default)."""
    if mode == "disabled":
        return
    import wandb

    active = wandb.run  # inside `saefeatures run` the study's own wandb run is open: log into it
    run = active or wandb.init(project=project, mode=mode, job_type="steering", dir=str(run_dir) if run_dir else None,
                               config={"hook": result.hook, "residual_norm": result.norm})
    try:
        flat: dict[str, Any] = {}

        def walk(prefix: str, d: dict[str, Any]) -> None:
            for k, v in d.items():
                if isinstance(v, dict):
                    walk(f"{prefix}{k}/", v)
                elif isinstance(v, (int, float)) and v is not None:
                    flat[f"{prefix}{k}"] = v
        walk("steering/", result.metrics())
        columns = ["emotion", "method", "strength"] + [m for m, _ in _MEASURES]
        table = wandb.Table(columns=columns)
        for c in result.curves:
            for p in c.points:
                table.add_data(c.emotion, c.method, p.strength, *[getattr(p, m) for m, _ in _MEASURES])
        run.log({**flat, "steering/curves": table,
                 **{f"steering/{k}": wandb.Image(v) for k, v in plots.items()}})
    finally:
        if active is None:
            run.finish()


def stage_steering(study: Any, dirs_by_recipe: dict[str, EmotionDirections], sae: Any = None) -> SteeringResult | None:
    """The steering stage of `saefeatures run`: evaluations, metrics, plots, wandb.

    Replaces ``steering.*`` in metrics.json, writes ``steering/results.json`` and PNG plots under
    ``figures/steering/`` (emptied first); skipped (and reloaded) when its inputs (config, model,
    directions, SAE weights, normalising texts) did not change and its results load.

    Example:
        >>> stage_steering(study, {"dense": dense, "sae": sae_dirs}, sae)
    """
    from .. import config as config_mod
    from ..rundir import key_of

    cfg = study.cfg.steering
    results = study.run.path / "steering" / "results.json"
    figures = study.run.path / "figures" / "steering"
    if not cfg.enabled:
        log.info("steering: disabled in the config")
        if "steering" in study.run.metrics:  # numbers of an earlier run must not pass for this config's
            study.run.drop("steering")
            study.run.save()
        shutil.rmtree(figures, ignore_errors=True)
        return None
    neutral = [r.text for r in getattr(study, "records", []) if r.emotion == "neutral" and r.split == "train"][:32]
    key = key_of(config_mod.to_dict(cfg), model_key(study.model), neutral,
                 {k: [d.names, d.layer, d.hook, d.vectors, d.center, d.latents]
                  for k, d in sorted(dirs_by_recipe.items())},
                 None if sae is None else [sae.cfg.metadata.hook_name, sae.cfg.d_sae, dict(sae.state_dict())])
    reused = study.run.reuse("steering", key, lambda: SteeringResult.load(results))
    if reused is not None:
        log.info("steering: inputs unchanged, reusing %s", results)
        return reused
    with study.run.stage("steering", key):
        shutil.rmtree(figures, ignore_errors=True)  # figures of emotions no longer configured go too
        result = run_steering_evals(study.model, dirs_by_recipe, sae, cfg, norm_texts=neutral or None)
        study.run.replace("steering", result.metrics())
        plots = save_steering_plots(result, figures)
        result.save(results)
        tracking = study.cfg.tracking
        if tracking.wandb:
            try:
                log_steering_wandb(result, plots, tracking.project, tracking.mode, study.run.path)
            except Exception as e:  # a logging failure must not lose the evaluation
                log.warning("steering: wandb logging failed (%s: %s)", type(e).__name__, e)
    return result
