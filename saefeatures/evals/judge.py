"""A judge of generated text that ignores the model's internals: the mean Warriner valence and
arousal of its words, a repetition rate, and a Spearman correlation that skips missing values.

Example:
    >>> judge(["What a wonderful sunny day!"])   # (valence, arousal, rated words)
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from functools import cache

import numpy as np
from scipy.stats import spearmanr

from .. import emotions as emo


log = logging.getLogger(__name__)


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


def spearman(x: Sequence[float], y: Sequence[float | None]) -> float | None:
    pts = [(a, b) for a, b in zip(x, y) if b is not None and not math.isnan(b)]
    if len(pts) < 3 or len({b for _, b in pts}) < 2 or len({a for a, _ in pts}) < 2:
        return None
    return float(spearmanr([a for a, _ in pts], [b for _, b in pts]).statistic)
