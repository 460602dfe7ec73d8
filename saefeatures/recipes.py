"""Corpus recipes (issue 14): how emotion texts are asked for, and the model's own reading of them.

A recipe is a user prompt template, an optional start of the assistant's reply (``prefill``: a
135M model continues a started sentence far more reliably than it follows an instruction), whether
the emotion's words are banned while decoding, and how many tokens to generate. `RECIPES` holds the
ones compared by ``scripts/bench_recipes.py``; the corpus build takes one by name
(``corpus_build.CorpusConfig.recipe``).

Two readings of a text by the model itself:

* `recognition_ranks`: the model reads a text followed by a question ("how does the person in this
  text feel?") and the rank of the intended emotion among the 171 words by the calibrated
  log-probability of its first token after "They feel" (minus the same log-probability after a
  content-free text, so a priori likely words like "happy" do not win every story). The corpus
  build can drop texts whose intended emotion ranks below a cut (``dropped='unrecognized'``).
* `emotion_token_mask`: the tokens of a text that spell the emotion's word forms, so pooling can
  leave them out when a recipe lets the text name its feeling.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from . import emotions as emo
from . import prompts
from .emotions import forms_regex

RECOGNITION_QUESTION = "\n\nQ: In one word, how does the person in this text feel?\nA: They feel"
"""Appended to a text for `recognition_ranks` (plain text, no chat template: read as the corpus is)."""
CONTENT_FREE = "N/A"
"""The text whose reading calibrates the candidates' prior log-probabilities."""

CHARACTER_NAMES = ("Maya", "Tom", "Lena", "Omar", "Grace", "Ben", "Priya", "Leo", "Sara", "Jonas",
                   "Amara", "Daniel", "Mei", "Carlos", "Nora", "Sam")
"""Names a prefill gives the main character (drawn per text from the build seed)."""


@dataclass(frozen=True)
class Recipe:
    """How one emotion text is asked for."""

    name: str
    template: str
    """User prompt; ``{topic}`` and ``{emotion}`` are filled in."""
    prefill: str = ""
    """Start of the assistant's reply (``{name}``, ``{emotion}``, ``{topic}``); kept in the text."""
    ban_words: bool = True
    """Forbid the emotion's word forms while decoding, and drop texts that name it."""
    max_new_tokens: int | None = None
    """Tokens to generate (None: the generation config's)."""
    kind: str = "story"

    def render(self, topic: str, emotion: str, name: str = "") -> tuple[str, str]:
        """(user prompt, prefill) for one text."""
        return (self.template.format(topic=topic, emotion=emotion),
                self.prefill.format(topic=topic, emotion=emotion, name=name))


def _recipes() -> dict[str, Recipe]:
    return {r.name: r for r in (
        Recipe("paper", prompts.STORY_TEMPLATE),
        Recipe("cause", prompts.CAUSE_TEMPLATE, ban_words=False),
        Recipe("prefill", prompts.PREFILL_STORY_TEMPLATE, prompts.PREFILL_STORY_START, ban_words=False),
        Recipe("say", prompts.SAY_TEMPLATE, ban_words=False, max_new_tokens=64, kind="utterance"),
        Recipe("diary", prompts.DIARY_TEMPLATE, prompts.DIARY_START, ban_words=False, max_new_tokens=72,
               kind="utterance"),
    )}


RECIPES: dict[str, Recipe] = _recipes()


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"Unknown corpus recipe {name!r}; known: {', '.join(RECIPES)}.")
    return RECIPES[name]


def character_name(seed: int, key: str) -> str:
    return random.Random(f"{seed}:{key}").choice(CHARACTER_NAMES)


# ---------------------------------------------------------------- reading texts


def emotion_token_mask(tokenizer, text: str, emotion: str, max_tokens: int) -> torch.Tensor:
    """Bool (n_tokens,) over ``text``'s tokens (no special tokens, truncated): True where a token
    overlaps a word form of ``emotion`` (`emotions.emotion_forms`)."""
    enc = tokenizer(text, add_special_tokens=False, truncation=True, max_length=max_tokens,
                    return_offsets_mapping=True)
    spans = [m.span() for m in forms_regex(emotion).finditer(text)]
    return torch.tensor([any(s < b and a < e for s, e in spans) for a, b in enc["offset_mapping"]], dtype=torch.bool)


def candidate_first_tokens(tokenizer, candidates: Sequence[str]) -> torch.Tensor:
    """First token id of " word" for each candidate word."""
    return torch.tensor([tokenizer(" " + c, add_special_tokens=False).input_ids[0] for c in candidates])


def rank_of(scores: torch.Tensor, first: torch.Tensor, target: int) -> int:
    """1 + the number of distinct candidate first tokens scoring above the target's (candidates
    sharing the target's first token tie with it)."""
    own = scores[target]
    distinct = torch.unique(first)
    tok_scores = torch.full((int(first.max()) + 1,), -float("inf"))
    tok_scores[first] = scores
    return 1 + int((tok_scores[distinct] > own).sum())


@torch.inference_mode()
def read_texts(
    hf: Any,
    tokenizer,
    texts: Sequence[str],
    emotions: Sequence[str],
    layer: int | None = None,
    skip_first: int = 16,
    max_tokens: int = 128,
    recognize: bool = True,
    candidates: Sequence[str] = emo.NAMES,
    batch_size: int = 16,
) -> dict[str, torch.Tensor]:
    """The model reads each text (plain, truncated to ``max_tokens``).

    Returns, as asked: ``pooled`` (n, d) the mean residual stream after block ``layer`` over the
    text's tokens after the first ``1 + skip_first`` (a text shorter than twice that keeps its second
    half, as `activations.TokenBatch.content_mask`); ``pooled_masked`` the same without the tokens
    that spell the text's emotion; ``rank`` (n,) the recognition rank of the text's emotion among
    ``candidates`` (1 = first; see the module doc) and ``logp`` (n, len(candidates)) the calibrated
    scores (``rank_raw``: the rank by the uncalibrated log-probability). Emotions not among the
    candidates get rank 0.
    """
    n = len(texts)
    suffix = tokenizer(RECOGNITION_QUESTION, add_special_tokens=False).input_ids if recognize else []
    toks = [tokenizer(t, add_special_tokens=False, truncation=True, max_length=max_tokens).input_ids for t in texts]
    out: dict[str, torch.Tensor] = {}
    first = candidate_first_tokens(tokenizer, candidates) if recognize else None
    index = {c: i for i, c in enumerate(candidates)}
    if recognize:
        free = tokenizer(CONTENT_FREE, add_special_tokens=False).input_ids + suffix
        h = hf.model(input_ids=torch.tensor([free])).last_hidden_state[0, -1]
        prior = hf.lm_head(h).float().log_softmax(-1)[first]
        out["logp"] = torch.zeros(n, len(candidates))
        out["rank"] = torch.zeros(n, dtype=torch.long)
        out["rank_raw"] = torch.zeros(n, dtype=torch.long)
    if layer is not None:
        d = hf.config.hidden_size
        out["pooled"] = torch.zeros(n, d)
        out["pooled_masked"] = torch.zeros(n, d)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    order = sorted(range(n), key=lambda i: len(toks[i]))
    for s in range(0, n, batch_size):
        idx = order[s:s + batch_size]
        seqs = [toks[i] + suffix for i in idx]
        width = max(len(q) for q in seqs)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        for j, q in enumerate(seqs):
            ids[j, :len(q)] = torch.tensor(q)
        # right padding: no mask needed, pads only follow the real tokens in a causal model
        res = hf.model(input_ids=ids, output_hidden_states=layer is not None)
        if recognize:
            last = torch.tensor([len(q) - 1 for q in seqs])
            h = res.last_hidden_state[torch.arange(len(idx)), last]
            raw = hf.lm_head(h).float().log_softmax(-1)[:, first]
            logp = raw - prior
            for j, i in enumerate(idx):
                out["logp"][i] = logp[j]
                if emotions[i] in index:
                    out["rank"][i] = rank_of(logp[j], first, index[emotions[i]])
                    out["rank_raw"][i] = rank_of(raw[j], first, index[emotions[i]])
        if layer is not None:
            hs = res.hidden_states[layer + 1].float()
            for j, i in enumerate(idx):
                m = len(toks[i])
                start = min(max(m // 2, 1), 1 + skip_first)
                keep = torch.zeros(hs.shape[1], dtype=torch.bool)
                keep[start:m] = True
                out["pooled"][i] = hs[j, keep].mean(0) if keep.any() else hs[j, :m].mean(0)
                named = torch.zeros_like(keep)
                named[:m] = emotion_token_mask(tokenizer, texts[i], emotions[i], max_tokens)[:m] \
                    if emotions[i] in index or emotions[i] in emo.NAMES else False
                km = keep & ~named
                out["pooled_masked"][i] = hs[j, km].mean(0) if km.any() else out["pooled"][i]
    return out
