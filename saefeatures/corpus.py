"""The emotion-story corpus: versioned JSONL records, filters, topic-disjoint splits, resumable builds.

A build writes every generated text to one JSONL file, kept or dropped (``dropped`` names the
filter), one batch per atomic append, so an interrupted build resumes at the first unfinished
batch and never duplicates or loses a record. `load_corpus` returns the kept records.

Example:
    >>> from saefeatures.corpus import load_corpus
    >>> stories = [r for r in load_corpus() if r.emotion == "afraid" and r.split == "train"]
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import random
import re
import time
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from . import emotions as emo
from . import prompts
from .errors import UserError
from .files import atomic_path
from .emotions import emotion_forms, names_emotion
from .generation import GenerationConfig, Generator, batch_seed
from .recipes import character_name, get_recipe, read_texts

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


# ---------------------------------------------------------------- plan and build


@dataclass
class CorpusConfig:
    """What to generate. Counts are texts requested, before filtering."""

    emotions: list[str] = field(default_factory=lambda: ["all"])
    """Emotion names, or ['all'] for the 171."""
    stories_per_emotion: int = 24
    """Texts per emotion; split train/val/test by `split_fractions` of this count."""
    split_fractions: tuple[float, float] = (2 / 3, 5 / 6)
    """Cumulative fractions of each emotion's texts for train and train+val."""
    dialogue_every: int = 4
    """Every n-th text of an emotion uses the dialogue template (0: none)."""
    neutral_per_topic: int = 2
    """Neutral texts per topic and neutral template (everyday and factual topics)."""
    general_texts: int = 0
    """General texts for SAE training (diverse instructions), 0 for none."""
    topics: int = len(prompts.TOPICS)
    """How many of the everyday topics to use (the first n)."""
    min_words: int = 40
    """Texts shorter than this are dropped."""
    recipe: str = "prefill"
    """How emotion texts are asked for (`saefeatures.recipes.RECIPES`). 'prefill' (default for new
    builds): a short story prompt and a reply that starts "{name} felt {emotion} because" (its dense
    directions read emotion-vector-bench at 19-way AUROC 0.67 / 0.67 in two draws of 8 stories per
    emotion and 0.70 with 16, against 0.57 / 0.60 for the paper recipe's 8 / 16: scripts/bench_recipes.py).
    'paper': the paper's story prompt with the emotion's words banned (how the shipped corpus was
    built). 'cause', 'say', 'diary' were measured and are worse than 'paper'. Only 'paper' uses the
    dialogue template."""
    recognition_rank: int = 0
    """If > 0, the model reads each emotion text and the text is dropped ('unrecognized') unless its
    emotion ranks at most this among the 171 words (`saefeatures.recipes.read_texts`). Too strict for
    the paper recipe: some emotions are never ranked high (issue 14: at <= 10, 4 of 19 kept nothing)."""
    recognition_keep: float = 0.0
    """If > 0, the model reads each emotion text and keeps only the best-recognised fraction of each
    batch (one emotion's texts): the rest is dropped ('unrecognized'). Texts other filters drop count
    towards the fraction dropped. Either option records the rank with every emotion text
    (``generation['recognition_rank']``)."""
    recognition_calibrated: bool = False
    """Rank by the log-probability minus a content-free reading's (True) or as read (False; issue 14:
    the two within noise, uncalibrated slightly ahead)."""
    seed: int = 0
    """Seed of the whole build; each batch derives its own from it and its key."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)


@dataclass(frozen=True)
class PlannedText:
    id: str
    emotion: str
    topic: str
    kind: str
    split: str
    prompt: str
    prefill: str = ""
    """Start of the reply, forced (the record's text begins with it)."""


@dataclass(frozen=True)
class Batch:
    key: str
    emotion: str
    items: tuple[PlannedText, ...]


def _chunks(items: list[PlannedText], size: int, key: str, emotion: str) -> list[Batch]:
    return [Batch(f"{key}/{i // size}", emotion, tuple(items[i : i + size])) for i in range(0, len(items), size)]


def plan_corpus(cfg: CorpusConfig) -> list[Batch]:
    """Every text to generate, grouped into batches (one emotion per batch, so its words can be banned)."""
    names = emo.resolve(cfg.emotions)
    topics = prompts.TOPICS[: cfg.topics]
    by_split = prompts.topics_by_split(topics)
    if any(not v for v in by_split.values()):
        raise ValueError(f"topics={cfg.topics} leaves a split without topics; use at least 10 topics.")

    recipe = get_recipe(cfg.recipe)
    n = cfg.stories_per_emotion
    n_train, n_trainval = round(n * cfg.split_fractions[0]), round(n * cfg.split_fractions[1])
    batches: list[Batch] = []
    size = cfg.generation.batch_size
    for name in names:
        rng = random.Random(f"{cfg.seed}:{name}")
        pools = {s: rng.sample(t, len(t)) for s, t in by_split.items()}
        items = []
        for k in range(n):
            split = "train" if k < n_train else "val" if k < n_trainval else "test"
            pool = pools[split]
            topic = pool[k % len(pool)]
            rid = f"{name.replace(' ', '_')}-{k:03d}"
            if recipe.name == "paper":
                kind = "dialogue" if cfg.dialogue_every and k % cfg.dialogue_every == cfg.dialogue_every - 1 else "story"
                template = prompts.DIALOGUE_TEMPLATE if kind == "dialogue" else prompts.STORY_TEMPLATE
                items.append(PlannedText(rid, name, topic, kind, split, template.format(topic=topic, emotion=name)))
            else:
                prompt, prefill = recipe.render(topic, name, character_name(cfg.seed, rid))
                items.append(PlannedText(rid, name, topic, "story", split, prompt, prefill))
        batches += _chunks(items, size, f"emotion/{name}", name)
    neutral = []
    for topic in (*topics, *prompts.FACTUAL_TOPICS):
        split = prompts.topic_split(topic)
        for t, template in enumerate(prompts.NEUTRAL_TEMPLATES):
            for r in range(cfg.neutral_per_topic):
                neutral.append(PlannedText(f"neutral-{_slug(topic)}-{t}{r}", "neutral", topic, "neutral",
                                           split, template.format(topic=topic)))
    batches += _chunks(neutral, size, "neutral", "neutral")
    rng = random.Random(f"{cfg.seed}:general")
    general = []
    for g in range(cfg.general_texts):
        topic = rng.choice((*topics, *prompts.FACTUAL_TOPICS))
        template = rng.choice(prompts.GENERAL_PROMPTS)
        general.append(PlannedText(f"general-{g:04d}", "general", topic, "general",
                                   prompts.topic_split(topic), template.format(topic=topic)))
    batches += _chunks(general, size, "general", "general")
    return batches


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def done_batches(path: Path, skip_corrupt: bool = False) -> set[str]:
    """Batch keys already written to a build file, after repairing a torn final line."""
    if not path.exists():
        return set()
    _repair_torn_tail(path)
    return {r.batch for r in read_records(path, skip_corrupt)}


def _repair_torn_tail(path: Path) -> None:
    """Cut a final line without its newline: the trace of a build killed mid-append."""
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            log.warning("%s: removing an unfinished last line left by an interrupted build", path)
            f.truncate(cut)


def append_records(path: Path, records: list[CorpusRecord]) -> None:
    """Append a batch of records as one write, flushed to disk (a crash leaves at most a torn tail)."""
    payload = "".join(r.to_json() + "\n" for r in records).encode("utf-8")
    with open(path, "ab") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())


@dataclass
class BuildReport:
    generated: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    new_tokens: int = 0
    seconds: float = 0.0
    recognition_ranks: list[int] = field(default_factory=list)
    """Recognition rank of every emotion text read this run (recognition_rank > 0)."""

    @property
    def kept_fraction(self) -> float:
        return self.kept / self.generated if self.generated else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0


def model_recognizer(generator: Generator, max_tokens: int = 128, calibrated: bool = False):
    """``(texts, emotions) -> ranks``: the generating model's recognition of each text's emotion."""

    def recognize(texts: list[str], emotions: list[str]) -> list[int]:
        out = read_texts(generator.hf, generator.tokenizer, texts, emotions, max_tokens=max_tokens)
        return out["rank" if calibrated else "rank_raw"].tolist()

    return recognize


def build_corpus(
    cfg: CorpusConfig, out: Path | str, generator: Generator, model_id: str, skip_corrupt: bool = False,
    recognizer=None,
) -> BuildReport:
    """Generate the planned texts into ``out`` (plain JSONL), resuming where an earlier build stopped.

    With ``cfg.recognition_rank`` the model (or ``recognizer``: ``(texts, emotions) -> ranks``) reads
    each emotion text of a batch before the batch is written, so a resumed build reads nothing twice."""

    recipe = get_recipe(cfg.recipe)
    reading = cfg.recognition_rank > 0 or cfg.recognition_keep > 0
    if reading and recognizer is None:
        recognizer = model_recognizer(generator, calibrated=cfg.recognition_calibrated)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = done_batches(out, skip_corrupt)
    todo = [b for b in plan_corpus(cfg) if b.key not in done]
    report = BuildReport()
    settings = cfg.generation.to_dict()
    log.info("corpus build: %d batches done, %d to go -> %s", len(done), len(todo), out)
    t0 = time.perf_counter()
    for batch in tqdm(todo, desc="corpus", unit="batch"):
        seed = batch_seed(cfg.seed, batch.key)
        emotional = batch.emotion not in NON_EMOTION
        ban = emotional and recipe.ban_words
        banned = sorted(emotion_forms(batch.emotion)) if ban else None
        kwargs = {"prefills": [p.prefill for p in batch.items]} if any(p.prefill for p in batch.items) else {}
        texts = generator.generate([p.prompt for p in batch.items], seed=seed, banned=banned, **kwargs)
        cleaned, reasons = [], []
        for planned, raw in zip(batch.items, texts):
            report.new_tokens += len(generator.tokenizer(raw, add_special_tokens=False).input_ids)
            text = trim_tail(planned.prefill + raw) if planned.prefill else clean_text(raw)
            cleaned.append(text)
            reasons.append(drop_reason(text, planned.emotion, cfg.min_words if recipe.kind == "story" or not emotional
                                       else min(cfg.min_words, 15), allow_naming=emotional and not ban))
        ranks: list[int | None] = [None] * len(cleaned)
        if emotional and reading:
            ranks = [int(r) for r in recognizer(cleaned, [p.emotion for p in batch.items])]
            report.recognition_ranks += ranks
            if cfg.recognition_rank > 0:
                reasons = [r or ("unrecognized" if k > cfg.recognition_rank else None) for r, k in zip(reasons, ranks)]
            if cfg.recognition_keep > 0:
                n_keep = max(1, round(cfg.recognition_keep * len(ranks)))
                best = sorted(range(len(ranks)), key=lambda i: (reasons[i] is not None, ranks[i], i))[:n_keep]
                reasons = [r or (None if i in best else "unrecognized") for i, r in enumerate(reasons)]
        records = []
        for planned, text, reason, rank in zip(batch.items, cleaned, reasons, ranks):
            report.generated += 1
            if reason:
                report.dropped[reason] += 1
            else:
                report.kept += 1
            gen = settings
            if recipe.name != "paper" or rank is not None:
                gen = {**settings, "recipe": recipe.name if emotional else "paper"}
                if planned.prefill:
                    gen["prefill"] = planned.prefill
                if rank is not None:
                    gen["recognition_rank"] = rank
            records.append(CorpusRecord(
                id=planned.id, emotion=planned.emotion, topic=planned.topic, kind=planned.kind,
                split=planned.split, prompt=planned.prompt, text=text, model_id=model_id, seed=seed,
                generation=gen, batch=batch.key, dropped=reason))
        append_records(out, records)
    report.seconds = time.perf_counter() - t0
    return report


def compress(src: Path | str, dst: Path | str) -> Path:
    """Gzip a finished build file (atomic: written to a temp name, then renamed)."""
    src, dst = Path(src), Path(dst)
    with atomic_path(dst) as tmp, open(src, "rb") as f, gzip.GzipFile(tmp, "wb", mtime=0) as g:
        g.write(f.read())
    return dst


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
