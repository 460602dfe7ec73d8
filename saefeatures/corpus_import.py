"""External story sets in the paper's format, read for the reader test or imported as a corpus.

The format is one JSON object per line with ``emotion``, ``topic`` and ``text`` (emotion-vector-bench
adds ``story_index`` and ``perspective``; a ``split`` field, if present, is kept), in one JSONL(.gz)
file or a directory of them (one file per emotion). `import_corpus` writes such a set as a corpus
that `load_corpus` reads, so a study can run on a frozen corpus written by another model.

Example:
    >>> stories = read_story_set("emotion-vector-bench/stories")
    >>> import_corpus("emotion-vector-bench/stories", "bench.jsonl.gz", model_id="claude-sonnet-4.5",
    ...               drop_unknown=True)
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import emotions as emo
from . import prompts
from .corpus import NON_EMOTION, CorpusRecord, check_splits, corpus_stats, validate_corpus
from .errors import UserError

REQUIRED = ("emotion", "topic", "text")
SPLIT_FRACTIONS = (0.7, 0.85)
"""Cumulative shares of topics in train and train+val (as `prompts.topic_split`)."""


class StorySetError(UserError):
    """A story file is missing, malformed, or cannot be imported as a corpus."""


@dataclass(frozen=True)
class Story:
    """One external story: its emotion, topic and text, and where it came from."""

    id: str
    emotion: str
    topic: str
    text: str
    index: int
    """Its position among the stories of the same emotion and topic, in file order."""
    split: str | None = None
    extra: tuple[tuple[str, Any], ...] = ()
    """Other fields of the line (story_index, perspective, ...), kept for provenance."""


def story_files(src: Path | str) -> list[Path]:
    """The JSONL(.gz) files of a story set: ``src`` itself, or every one in directory ``src``."""
    src = Path(src)
    if src.is_dir():
        files = sorted(p for p in src.iterdir() if p.name.endswith((".jsonl", ".jsonl.gz")))
        if not files:
            raise StorySetError(f"{src}: no .jsonl or .jsonl.gz files in this directory; pass a story file or a "
                                "directory of them (one JSON object per line with emotion, topic, text).")
        return files
    if not src.is_file():
        raise StorySetError(f"Story set not found: {src}. Pass a JSONL(.gz) file or a directory of them.")
    return [src]


def story_set_key(src: Path | str) -> str:
    """SHA-256 (16 hex) of the story files' names and bytes: the content a cache is keyed by."""
    h = hashlib.sha256()
    for path in story_files(src):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _open(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def _parse(line: str, where: str) -> dict[str, Any]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise StorySetError(f"{where}: not valid JSON ({e.msg}); each line must be one JSON object.") from None
    if not isinstance(obj, dict):
        raise StorySetError(f"{where}: expected a JSON object with {', '.join(REQUIRED)}, got {type(obj).__name__}.")
    missing = [k for k in REQUIRED if k not in obj]
    if missing:
        raise StorySetError(f"{where}: missing field(s) {', '.join(missing)}; each line needs "
                            f"{', '.join(REQUIRED)} (the paper's story format).")
    for k in REQUIRED:
        if not isinstance(obj[k], str) or not obj[k].strip():
            raise StorySetError(f"{where}: field '{k}' must be a non-empty string, got {obj[k]!r}.")
    split = obj.get("split")
    if split is not None and split not in prompts.SPLITS:
        raise StorySetError(f"{where}: split '{split}' is not one of {prompts.SPLITS}; fix it or drop the field "
                            "to have splits assigned by topic.")
    return obj


def read_story_set(src: Path | str) -> list[Story]:
    """Every story of a file or directory, validated line by line (errors name the file and line)."""
    stories: list[Story] = []
    seen: Counter = Counter()
    for path in story_files(src):
        with _open(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                obj = _parse(line, f"{path}:{lineno}")
                emotion, topic = obj["emotion"].strip(), obj["topic"].strip()
                k = seen[emotion, topic]
                seen[emotion, topic] += 1
                topic_hash = hashlib.sha1(topic.encode()).hexdigest()[:8]
                extra = tuple(sorted((key, v) for key, v in obj.items() if key not in (*REQUIRED, "split")))
                stories.append(Story(f"{emotion.replace(' ', '_')}-{topic_hash}-{k:03d}", emotion, topic,
                                     obj["text"].strip(), k, obj.get("split"), extra))
    if not stories:
        raise StorySetError(f"{src}: no stories (every file is empty).")
    return stories


def cap_per_emotion(stories: list[Story], n: int | None) -> list[Story]:
    """At most ``n`` stories per emotion, spread over topics (each topic's first story, then the
    second, ...); None keeps all."""
    if n is None:
        return list(stories)
    by_emotion: dict[str, list[Story]] = {}
    for s in sorted(stories, key=lambda s: (s.index, s.topic)):
        by_emotion.setdefault(s.emotion, []).append(s)
    keep = {s.id for group in by_emotion.values() for s in group[:n]}
    return [s for s in stories if s.id in keep]


def assign_splits(topics: list[str], fractions: tuple[float, float] = SPLIT_FRACTIONS) -> dict[str, str]:
    """Topic -> split by the build's stable topic hash, cut by rank so that a set of a few topics
    (emotion-vector-bench has 15) still gets train, val and test topics."""
    topics = sorted(set(topics), key=lambda t: hashlib.sha1(t.encode()).hexdigest())
    if len(topics) < 3:
        raise StorySetError(f"Only {len(topics)} topic(s); topic-disjoint train/val/test splits need at least 3.")
    n = len(topics)
    n_train = min(max(1, round(n * fractions[0])), n - 2)
    n_trainval = min(max(n_train + 1, round(n * fractions[1])), n - 1)
    return {t: "train" if i < n_train else "val" if i < n_trainval else "test" for i, t in enumerate(topics)}


@dataclass
class ImportReport:
    """What an import wrote and left out."""

    out: str
    n_records: int
    dropped_unknown: dict[str, int]
    """Unknown emotion -> stories left out (with ``drop_unknown``)."""
    splits_from: str
    """'file' (the lines' own split fields) or 'topics' (assigned by topic)."""
    stats: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"out": self.out, "n_records": self.n_records, "dropped_unknown": self.dropped_unknown,
                "splits_from": self.splits_from, **self.stats}


def to_records(stories: list[Story], model_id: str, source: str, drop_unknown: bool = False,
               fractions: tuple[float, float] = SPLIT_FRACTIONS) -> tuple[list[CorpusRecord], dict[str, int], str]:
    """Corpus records of a story set: emotions checked, splits kept (if every line has one) or
    assigned by topic, topic-disjoint either way. Returns the records, the unknown emotions left
    out (name -> stories) and where the splits came from ('file' or 'topics')."""
    unknown = Counter(s.emotion for s in stories if s.emotion not in NON_EMOTION and s.emotion not in emo.NAMES)
    if unknown and not drop_unknown:
        name = next(iter(unknown))
        try:
            emo.get(name)
        except emo.UnknownEmotionError as e:
            raise StorySetError(f"{source}: {e} ({sum(unknown.values())} stories of unknown emotions "
                                f"{sorted(unknown)}); pass drop_unknown=True (CLI: --drop-unknown) to leave them out.") from None
    kept = [s for s in stories if s.emotion not in unknown]
    if not kept:
        raise StorySetError(f"{source}: no story has one of the {len(emo.NAMES)} known emotions.")
    given = [s.split for s in kept]
    if all(given):
        splits_of, splits_from = {s.id: s.split for s in kept}, "file"
    elif any(given):
        raise StorySetError(f"{source}: some lines have a split field and some do not; give every line one, or none.")
    else:
        by_topic = assign_splits([s.topic for s in kept], fractions)
        splits_of, splits_from = {s.id: by_topic[s.topic] for s in kept}, "topics"
    records = [CorpusRecord(
        id=s.id, emotion=s.emotion, topic=s.topic, kind=s.emotion if s.emotion in NON_EMOTION else "story",
        split=splits_of[s.id], prompt="", text=s.text, model_id=model_id, seed=0,
        generation={"imported_from": source, **dict(s.extra)}, batch="import") for s in kept]
    try:
        check_splits(records)
    except ValueError as e:
        raise StorySetError(f"{source}: {e}. Fix the split fields so each topic has one, or drop them.") from None
    return records, dict(unknown), splits_from


def import_corpus(src: Path | str, out: Path | str, model_id: str = "unknown", drop_unknown: bool = False,
                  fractions: tuple[float, float] = SPLIT_FRACTIONS) -> ImportReport:
    """Write the stories of ``src`` as a corpus file ``out`` (JSONL, gzipped if it ends in .gz;
    atomic), then check it with `validate_corpus`."""
    src, out = Path(src), Path(out)
    if not out.name.endswith((".jsonl", ".jsonl.gz")):
        raise StorySetError(f"--out {out}: the corpus file must end in .jsonl or .jsonl.gz.")
    stories = read_story_set(src)
    source = "/".join(src.resolve().parts[-2:])
    records, unknown, splits_from = to_records(stories, model_id, source, drop_unknown, fractions)
    payload = "".join(r.to_json() + "\n" for r in records).encode("utf-8")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    if out.suffix == ".gz":
        with gzip.GzipFile(tmp, "wb", mtime=0) as g:
            g.write(payload)
    else:
        tmp.write_bytes(payload)
    os.replace(tmp, out)
    validate_corpus(out)
    return ImportReport(str(out), len(records), unknown, splits_from, corpus_stats(records))
