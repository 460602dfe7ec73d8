"""The emotion-story corpus: versioned JSONL records, filters, topic-disjoint splits, resumable builds.

A build (`saefeatures.corpus_build`) writes every generated text to one JSONL file, kept or dropped
(``dropped`` names the filter). `load_corpus` returns the kept records.

Example:
    >>> from saefeatures.corpus import load_corpus
    >>> stories = [r for r in load_corpus() if r.emotion == "afraid" and r.split == "train"]
"""

from __future__ import annotations

import gzip
import json
import logging
import re
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from . import emotions as emo
from . import prompts
from .emotions import names_emotion
from .errors import UserError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
DEFAULT_CORPUS = emo.DATA / "corpus" / "smollm2-135m-instruct.jsonl.gz"
KINDS = ("story", "dialogue", "neutral", "general")
NON_EMOTION = ("neutral", "general")


@dataclass(frozen=True)
class CorpusRecord:
    """One generated text and how it was made."""

    id: str
    emotion: str
    """An emotion name, 'neutral' for neutral texts, 'general' for general text (SAE training)."""
    topic: str
    kind: str
    """'story', 'dialogue', 'neutral' or 'general'."""
    split: str
    """'train', 'val' or 'test'; all texts of a topic share one split."""
    prompt: str
    text: str
    model_id: str
    seed: int
    generation: dict[str, Any] = field(default_factory=dict)
    batch: str = ""
    """The build batch this record came from (resume bookkeeping)."""
    dropped: str | None = None
    """The filter that dropped this text, or None if kept."""
    schema: int = SCHEMA_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)


_FIELDS = {f.name for f in fields(CorpusRecord)}
_REQUIRED = _FIELDS - {"generation", "batch", "dropped", "schema"}
_TYPES = {"id": str, "emotion": str, "topic": str, "kind": str, "split": str, "prompt": str, "text": str,
          "model_id": str, "seed": int, "generation": dict, "batch": str, "dropped": (str, type(None)),
          "schema": int}


class CorruptCorpusError(UserError):
    """A corpus file has a line that is not a valid record."""


def _parse(line: str, path: Path, lineno: int) -> CorpusRecord:
    try:
        obj = json.loads(line)
        if not isinstance(obj, dict):
            raise ValueError("not a JSON object")
        missing = _REQUIRED - obj.keys()
        if missing:
            raise ValueError(f"missing fields {sorted(missing)}")
        unknown = obj.keys() - _FIELDS
        if unknown:
            raise ValueError(f"unknown fields {sorted(unknown)}")
        wrong = [f"{k}={obj[k]!r}" for k, tp in _TYPES.items()
                 if k in obj and (not isinstance(obj[k], tp) or isinstance(obj[k], bool))]
        if wrong:
            raise ValueError(f"wrong type: {', '.join(wrong)[:120]}")
        if obj.get("schema", SCHEMA_VERSION) > SCHEMA_VERSION:
            raise ValueError(f"schema {obj['schema']} is newer than this saefeatures ({SCHEMA_VERSION})")
        return CorpusRecord(**obj)
    except (ValueError, TypeError) as e:
        raise CorruptCorpusError(
            f"{path}:{lineno}: corrupt corpus line ({e}). Fix or delete that line, or pass "
            "skip_corrupt=True (CLI: --skip-corrupt) to skip such lines."
        ) from None


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def read_records(path: Path | str, skip_corrupt: bool = False) -> Iterator[CorpusRecord]:
    """Every record of a JSONL(.gz) corpus file, dropped ones included, validated line by line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Corpus file not found: {path}. Build one with `saefeatures corpus build`.")
    lineno = 0
    try:
        with _open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield _parse(line, path, lineno)
                except CorruptCorpusError as e:
                    if not skip_corrupt:
                        raise
                    log.warning("skipping %s", e)
    except (EOFError, OSError, UnicodeDecodeError, zlib.error) as e:
        what = "truncated or not gzip" if path.suffix == ".gz" else "unreadable"
        raise CorruptCorpusError(
            f"{path}: {what} after line {lineno} ({type(e).__name__}: {e}). Copy or build the file again "
            "(`saefeatures corpus build --out F --ship F.gz`), or give an intact corpus."
        ) from None


def load_corpus(
    path: Path | str | None = None,
    skip_corrupt: bool = False,
    kinds: Iterable[str] = ("story", "dialogue", "neutral"),
) -> list[CorpusRecord]:
    """The kept records of a corpus; no path means the shipped corpus of the embedded model."""
    kinds = set(kinds)
    path = DEFAULT_CORPUS if path is None else Path(path)
    return [r for r in read_records(path, skip_corrupt) if r.dropped is None and r.kind in kinds]


# ---------------------------------------------------------------- filters

REFUSAL = re.compile(
    r"\b(I'm sorry,? but|I am sorry,? but|I cannot|I can't (?:write|help|do)|as an AI|I'm unable|"
    r"I am unable|I'm not able to|language model)\b", re.IGNORECASE)
def too_short(text: str, min_words: int = 40) -> bool:
    return len(text.split()) < min_words


def is_repetitive(text: str, min_distinct: float = 0.7) -> bool:
    """True when word trigrams repeat a lot or a sentence occurs twice."""
    words = text.lower().split()
    grams = list(zip(words, words[1:], words[2:]))
    if grams and len(set(grams)) / len(grams) < min_distinct:
        return True
    sentences = [s.strip() for s in re.split(r"[.!?]+", text.lower()) if len(s.split()) >= 4]
    return len(sentences) != len(set(sentences))


def is_refusal(text: str) -> bool:
    return bool(REFUSAL.search(text))


def trim_tail(text: str) -> str:
    """Cut a trailing unfinished sentence."""
    text = text.strip()
    end = max(text.rfind(c) for c in '.!?"')
    return text[: end + 1] if 0 < end < len(text) - 1 else text


def clean_text(text: str) -> str:
    """Strip a leading title line and a trailing unfinished sentence."""
    text = text.strip()
    lines = text.split("\n")
    if len(lines) > 1 and (lines[0].lower().startswith(("title", "**", "#")) or len(lines[0].split()) <= 6):
        text = "\n".join(lines[1:]).strip()
    end = max(text.rfind(c) for c in '.!?"')
    if end > 0 and end < len(text) - 1:
        text = text[: end + 1]
    return text


def drop_reason(text: str, emotion: str, min_words: int = 40, allow_naming: bool = False) -> str | None:
    """The first filter a text fails ('refusal', 'too_short', 'repetitive', 'names_emotion'), or None.
    ``allow_naming``: a recipe whose texts may name the emotion (the word check is skipped)."""
    if is_refusal(text):
        return "refusal"
    if too_short(text, min_words):
        return "too_short"
    if is_repetitive(text):
        return "repetitive"
    if not allow_naming and emotion not in NON_EMOTION and names_emotion(text, emotion):
        return "names_emotion"
    return None


# ---------------------------------------------------------------- statistics and checks


def corpus_stats(records: Iterable[CorpusRecord], all_records: Iterable[CorpusRecord] | None = None) -> dict[str, Any]:
    """Counts for a corpus: texts per emotion and split, neutral count, drops per filter."""
    records = list(records)
    per_emotion = Counter(r.emotion for r in records if r.emotion not in NON_EMOTION)
    counts = sorted(per_emotion.values()) or [0]
    stats: dict[str, Any] = {
        "n_stories": sum(per_emotion.values()),
        "n_neutral": sum(r.emotion == "neutral" for r in records),
        "n_emotions": len(per_emotion),
        "min_per_emotion": counts[0],
        "median_per_emotion": counts[len(counts) // 2],
        "splits": dict(Counter(r.split for r in records)),
        "kinds": dict(Counter(r.kind for r in records)),
        "n_words": sum(len(r.text.split()) for r in records),
    }
    if all_records is not None:
        all_records = list(all_records)
        stats["dropped"] = dict(Counter(r.dropped for r in all_records if r.dropped))
        emotional = [r for r in all_records if r.emotion not in NON_EMOTION]
        if emotional:
            stats["kept_fraction"] = round(sum(r.dropped is None for r in emotional) / len(emotional), 4)
        ranks = sorted(r.generation["recognition_rank"] for r in emotional if "recognition_rank" in r.generation)
        if ranks:
            stats["recognition"] = {"n_read": len(ranks), "median_rank": ranks[len(ranks) // 2],
                                    "top10": round(sum(k <= 10 for k in ranks) / len(ranks), 4),
                                    "kept_fraction": round(sum(r.dropped is None for r in emotional
                                                               if "recognition_rank" in r.generation) / len(ranks), 4)}
    return stats


def check_labels(records: Iterable[CorpusRecord], path: Path | str) -> None:
    """Raise `CorruptCorpusError` on a record whose emotion, kind or split is not a known label."""
    for r in records:
        if r.emotion not in NON_EMOTION and r.emotion not in emo.NAMES:
            try:
                emo.get(r.emotion)
            except emo.UnknownEmotionError as e:
                raise CorruptCorpusError(f"{path}: record {r.id}: {e} Relabel or drop such records.") from None
        for name, value, allowed in (("kind", r.kind, KINDS), ("split", r.split, prompts.SPLITS)):
            if value not in allowed:
                raise CorruptCorpusError(f"{path}: record {r.id} has {name} '{value}', expected one of "
                                         f"{', '.join(allowed)}. Fix that record.")


def check_splits(records: Iterable[CorpusRecord]) -> None:
    """Raise if a topic's texts fall in more than one split."""
    seen: dict[str, set[str]] = {}
    for r in records:
        seen.setdefault(r.topic, set()).add(r.split)
    leaks = {t: s for t, s in seen.items() if len(s) > 1}
    if leaks:
        raise CorruptCorpusError(f"Topics in several splits (splits must be topic-disjoint): {leaks}")


def validate_corpus(path: Path | str) -> dict[str, Any]:
    """Read every line strictly, check ids are unique, emotions known, splits topic-disjoint."""
    records = list(read_records(path))
    if not any(r.dropped is None for r in records):
        raise CorruptCorpusError(f"{path} holds no kept records. Build a corpus with `saefeatures corpus build`.")
    ids = Counter(r.id for r in records)
    dup = [i for i, c in ids.items() if c > 1]
    if dup:
        raise CorruptCorpusError(f"Duplicate record ids in {path}: {dup[:5]}. Keep one record per id.")
    check_labels(records, path)
    kept = [r for r in records if r.dropped is None]
    check_splits(kept)
    return corpus_stats(kept, records)


def lexicon_valence_check(records: Iterable[CorpusRecord]) -> dict[str, float]:
    """Spearman rho between each emotion's Warriner valence (arousal) and the mean Warriner rating of
    the words in its stories: a quality check that does not use the model's activations."""
    from scipy.stats import spearmanr

    norms = emo.warriner_norms()
    sums: dict[str, list[float]] = {}
    for r in records:
        if r.emotion in NON_EMOTION:
            continue
        ratings = [norms[w] for w in re.findall(r"[a-z]+", r.text.lower()) if w in norms]
        if ratings:
            s = sums.setdefault(r.emotion, [0.0, 0.0, 0])
            s[0] += sum(v for v, _, _ in ratings)
            s[1] += sum(a for _, a, _ in ratings)
            s[2] += len(ratings)
    rows = [(emo.get(e), s[0] / s[2], s[1] / s[2]) for e, s in sums.items()]
    rows = [r for r in rows if r[0].valence is not None]
    if len(rows) < 3:
        return {}
    return {
        "lexicon_valence_spearman": float(spearmanr([e.valence for e, _, _ in rows], [v for _, v, _ in rows])[0]),
        "lexicon_arousal_spearman": float(spearmanr([e.arousal for e, _, _ in rows], [a for _, _, a in rows])[0]),
        "n_emotions": len(rows),
    }
