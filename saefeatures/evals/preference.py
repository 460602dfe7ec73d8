"""Activity preference: the model picks between two activities (A or B); each activity's win rate
is related to its emotion projections, and steering toward a positive (negative) emotion on
option A's tokens only should raise (lower) P(A).

Example:
    >>> result = preference_eval(model, dense, dense, SteeringConfig(), norm)
    >>> result.metrics()["preference_shift"]
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..activations import forward_hooks, iter_batches
from ..directions import EmotionDirections
from ..models import chat_prompt, hf_twin
from ..steering import Steering, SteeringSpec, steered
from .activities import ACTIVITIES, Activity
from .dose_response import suffix_forward
from .judge import spearman
from .steering import SteeringConfig

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

log = logging.getLogger(__name__)


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
            out["preference_winrate_spearman"] = spearman(self.projections[self.positive], self.win_rate)
        out["preference_winrate_tone_spearman"] = spearman(self.tones, self.win_rate)
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
