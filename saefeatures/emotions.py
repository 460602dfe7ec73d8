"""The 171 emotion concepts of the paper, with human valence and arousal norms.

Source of the words: the appendix "Full list of emotions" of "Emotion Concepts and their Function
in a Large Language Model" (Anthropic, 2026), shipped as ``data/paper-emotions.txt`` with the
paper's 10 k-means clusters. All 171 words come from the paper; none were added here.

Valence and arousal: Warriner, Kuperman & Brysbaert (2013), 1-9 scales, read at run time from the
unmodified CSV in ``data/warriner/`` (CC BY-NC-ND 3.0). A word missing from the norms falls back to
its lemma by inflection rules (loving -> love, panicked -> panic, trapped -> trap); words still
missing keep ``None`` and are listed by `unrated()`.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from pathlib import Path

from .errors import UserError

DATA = Path(str(files("saefeatures") / "data"))
PAPER_FILE = DATA / "paper-emotions.txt"
WARRINER_FILE = DATA / "warriner" / "Ratings_Warriner_et_al.csv"

# The paper's display emotions, used where a figure or probe needs a short list.
DISPLAY = ("happy", "inspired", "loving", "proud", "calm", "desperate", "angry", "guilty", "sad",
           "afraid", "nervous", "surprised")


@dataclass(frozen=True)
class Emotion:
    """One emotion concept with its human ratings (Warriner 1-9 scale; None where unrated)."""

    name: str
    valence: float | None
    arousal: float | None
    cluster: str
    """The paper's k-means cluster (k=10)."""
    rated_as: str | None
    """The Warriner entry the ratings come from (the word itself or its lemma)."""


class UnknownEmotionError(UserError, KeyError):
    """A name that is not one of the 171 emotions (a KeyError too, for lookups)."""

    def __str__(self) -> str:
        return str(self.args[0])


@cache
def warriner_norms(path: Path = WARRINER_FILE) -> dict[str, tuple[float, float, float]]:
    """Word -> (valence, arousal, dominance) means; case-sensitive, 'null' kept as a word."""
    with open(path, newline="", encoding="utf-8") as f:
        return {
            r["Word"]: (float(r["V.Mean.Sum"]), float(r["A.Mean.Sum"]), float(r["D.Mean.Sum"]))
            for r in csv.DictReader(f)
        }


def lemma_candidates(word: str) -> list[str]:
    """The word, then plausible lemmas by English inflection rules, most specific first."""
    out = [word]
    if word.endswith("ied"):
        out.append(word[:-3] + "y")
    if word.endswith("ed"):
        stem = word[:-2]
        out += [stem + "e", stem]  # relieved -> relieve is tried via word[:-1] below too
        if len(stem) > 2 and stem[-1] == stem[-2]:
            out.append(stem[:-1])  # trapped -> trap
        if stem.endswith("ck"):
            out.append(stem[:-1])  # panicked -> panic
    if word.endswith("d"):
        out.append(word[:-1])  # energized -> energize
    if word.endswith("ing"):
        out += [word[:-3] + "e", word[:-3]]  # loving -> love
    if word.endswith("en"):
        out.append(word[:-1])  # shaken -> shake
    return list(dict.fromkeys(out))


def rate(word: str) -> tuple[float | None, float | None, str | None]:
    """(valence, arousal, entry used) for a word, with the lemma fallback."""
    norms = warriner_norms()
    for cand in lemma_candidates(word):
        if cand in norms:
            v, a, _ = norms[cand]
            return v, a, cand
    return None, None, None


def _load() -> tuple[Emotion, ...]:
    words: list[str] = []
    clusters: dict[str, str] = {}
    for line in PAPER_FILE.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        if "\t" in line:
            cluster, word = line.split("\t")
            clusters[word.strip()] = cluster.strip()
        else:
            words.append(line.strip())
    out = []
    for w in words:
        v, a, used = rate(w)
        out.append(Emotion(w, v, a, clusters.get(w, ""), used))
    return tuple(out)


EMOTIONS: tuple[Emotion, ...] = _load()
NAMES: tuple[str, ...] = tuple(e.name for e in EMOTIONS)
_BY_NAME = {e.name: e for e in EMOTIONS}


def get(name: str) -> Emotion:
    """Look up an emotion by name; unknown names get the closest known ones in the error."""
    try:
        return _BY_NAME[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(name, NAMES, n=3)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise UnknownEmotionError(
            f"Unknown emotion '{name}'.{hint} The {len(NAMES)} known emotions are in "
            "saefeatures.emotions.NAMES."
        ) from None


def resolve(names: list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """Validate a list of emotion names (None or 'all' means all 171)."""
    if names is None or list(names) == ["all"]:
        return NAMES
    return tuple(get(n).name for n in names)


def unrated() -> list[str]:
    """Emotion words with no Warriner rating even after the lemma fallback."""
    return [e.name for e in EMOTIONS if e.valence is None]


def coverage_report() -> str:
    """A short text report of how each emotion got its ratings."""
    fallback = [f"{e.name}->{e.rated_as}" for e in EMOTIONS if e.rated_as not in (None, e.name)]
    missing = unrated()
    return (
        f"{len(EMOTIONS) - len(missing)}/{len(EMOTIONS)} emotions rated "
        f"({len(EMOTIONS) - len(missing) - len(fallback)} exact, {len(fallback)} by lemma).\n"
        f"Lemma fallbacks: {', '.join(fallback)}\nNo rating: {', '.join(missing)}"
    )


_SUFFIXES = ("", "s", "es", "d", "ed", "ly", "ily", "ness", "iness", "ing", "ion", "ation", "ment",
             "ful", "fully", "ity", "ies", "ier", "iest", "ance", "ence", "ant", "ent", "er", "est")


def emotion_forms(name: str) -> set[str]:
    """Surface forms that name an emotion: the word, its lemma, and their inflections."""
    if " " in name or "-" in name:
        return {name, name.replace("-", " "), name.replace(" ", "-")}
    bases = {name, *lemma_candidates(name)[1:]}
    rated = rate(name)[2]
    if rated:
        bases.add(rated)
    stems = set()
    for b in bases:
        if len(b) < 3:
            continue
        stems.add(b)
        if b[-1] in "ey":
            stems.add(b[:-1])
    return {s + suf for s in stems for suf in _SUFFIXES if len(s + suf) >= 3}


def forms_regex(name: str) -> re.Pattern[str]:
    """Matches any surface form of the emotion (`emotion_forms`), case-insensitively."""
    forms = sorted(emotion_forms(name), key=len, reverse=True)
    return re.compile(r"\b(?:" + "|".join(re.escape(f) for f in forms) + r")\b", re.IGNORECASE)


def names_emotion(text: str, name: str) -> bool:
    return bool(forms_regex(name).search(text))
