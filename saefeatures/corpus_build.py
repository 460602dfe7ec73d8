"""Building the corpus: plan every text, generate it with the model in batches, filter, append.

One batch per atomic append, so an interrupted build resumes at the first unfinished batch and
never duplicates or loses a record; every batch draws its own seed from the build's seed and its key.
Under `torchrun` each rank generates every size-th unfinished batch into its own part file
(``OUT.part<rank>``, resumable like the build file); when all are done rank 0 merges the parts into
the build file in plan order: the records, ids and splits one process writes.

Example:
    >>> from saefeatures.corpus_build import CorpusConfig, build_corpus
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import os
import random
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from . import emotions as emo
from . import prompts
from .corpus import NON_EMOTION, CorpusRecord, clean_text, drop_reason, read_records, trim_tail
from .directions import EmotionDirections
from .distributed import World
from .emotions import emotion_forms
from .errors import ConfigError, UserError, one_line
from .files import atomic_path
from .generation import GenerationConfig, Generator, batch_seed
from .keys import key_of
from .recipes import character_name, get_recipe, read_texts
from .writer_steering import writer_vectors, writing_steered

log = logging.getLogger(__name__)


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
    steer: float = 0.0
    """If > 0, the model writes each emotion's texts with that emotion's direction from
    ``steer_directions`` added to its residual stream, this times the mean residual norm there
    (`saefeatures.writer_steering`; 0.1 raised the reader test of 8 prefill stories per emotion from
    AUROC 0.66 to 0.72-0.73 in two draws: scripts/bench_recipes.py --steer; but a whole corpus so
    built read them no better and weakened the geometry, while its own held-out numbers jumped:
    README, corpus section). Neutral and general texts are unsteered."""
    steer_directions: str | None = None
    """A directions folder (`EmotionDirections.save`), e.g. ``RUN/directions/dense`` of a run on an
    earlier corpus; it must hold every emotion built."""
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


def part_files(out: Path) -> list[Path]:
    """The part files ranks of a distributed build wrote beside ``out`` (any world size)."""
    return sorted(out.parent.glob(f"{out.name}.part*"))


def merge_parts(out: Path, plan: list[Batch]) -> None:
    """Rewrite ``out`` (atomically) with its records and those of its part files, batch by batch in
    plan order (a batch found twice is kept once), then delete the parts."""
    place = {b.key: i for i, b in enumerate(plan)}
    by_batch: dict[str, list[bytes]] = {}
    for path in [out, *part_files(out)] if out.exists() else part_files(out):
        lines: dict[str, list[bytes]] = {}
        for line in path.read_bytes().splitlines(keepends=True):
            lines.setdefault(json.loads(line)["batch"], []).append(line)
        for key, rows in lines.items():
            by_batch.setdefault(key, rows)
    with atomic_path(out) as tmp:
        order = sorted(by_batch, key=lambda k: place.get(k, len(place)))
        Path(tmp).write_bytes(b"".join(line for k in order for line in by_batch[k]))
    for path in part_files(out):
        path.unlink()


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
    recognizer=None, world: World = World(),
) -> BuildReport:
    """Generate the planned texts into ``out`` (plain JSONL), resuming where an earlier build stopped.

    With ``cfg.recognition_rank`` the model (or ``recognizer``: ``(texts, emotions) -> ranks``) reads
    each emotion text of a batch before the batch is written, so a resumed build reads nothing twice.
    Under `torchrun` (``world``) the ranks share the batches (module doc); the report sums them."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = done_batches(out, skip_corrupt).union(*(done_batches(p, skip_corrupt) for p in part_files(out)))
    plan = plan_corpus(cfg)
    todo = world.mine([b for b in plan if b.key not in done])
    world.sync("corpus build")  # every rank has read what is done before any writes
    target = out if world.size == 1 else out.with_name(f"{out.name}.part{world.rank}")
    log.info("corpus build: %d batches done, %d to go -> %s", len(done), len(todo), target)
    t0 = time.perf_counter()
    try:
        report = _generate(cfg, todo, target, generator, model_id, recognizer)
    except Exception as e:
        world.fail("corpus build", e)  # the other ranks raise RankFailure naming this one
        raise
    report.seconds = time.perf_counter() - t0
    counts = world.sync("corpus build", payload=[report.generated, report.kept, report.new_tokens, report.dropped,
                                                 report.recognition_ranks])
    if world.size > 1:
        report.generated, report.kept, report.new_tokens = (sum(c[i] for c in counts) for i in range(3))
        report.dropped = sum((Counter(c[3]) for c in counts), Counter())
        report.recognition_ranks = [k for c in counts for k in c[4]]
    if world.leader and part_files(out):
        merge_parts(out, plan)
    world.sync("corpus merge")
    return report


def _generate(cfg: CorpusConfig, batches: list[Batch], target: Path, generator: Generator, model_id: str,
              recognizer=None) -> BuildReport:
    """Generate, filter and append ``batches`` to ``target``, one atomic append per batch."""
    recipe = get_recipe(cfg.recipe)
    reading = cfg.recognition_rank > 0 or cfg.recognition_keep > 0
    if reading and recognizer is None:
        recognizer = model_recognizer(generator, calibrated=cfg.recognition_calibrated)
    report = BuildReport()
    settings = cfg.generation.to_dict()
    steering = writer_steering(cfg, generator, batches)
    for batch in tqdm(batches, desc="corpus", unit="batch"):
        seed = batch_seed(cfg.seed, batch.key)
        emotional = batch.emotion not in NON_EMOTION
        ban = emotional and recipe.ban_words
        banned = sorted(emotion_forms(batch.emotion)) if ban else None
        kwargs = {"prefills": [p.prefill for p in batch.items]} if any(p.prefill for p in batch.items) else {}
        steered = steering is not None and emotional
        with (writing_steered(generator.hf, steering[0][batch.emotion], steering[1]) if steered
              else contextlib.nullcontext()):
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
            if recipe.name != "paper" or rank is not None or steered:
                gen = {**settings, "recipe": recipe.name if emotional else "paper"}
                if planned.prefill:
                    gen["prefill"] = planned.prefill
                if rank is not None:
                    gen["recognition_rank"] = rank
                if steered:
                    gen["steer"] = steering[2]
            records.append(CorpusRecord(
                id=planned.id, emotion=planned.emotion, topic=planned.topic, kind=planned.kind,
                split=planned.split, prompt=planned.prompt, text=text, model_id=model_id, seed=seed,
                generation=gen, batch=batch.key, dropped=reason))
        append_records(target, records)
    return report


def load_steer_directions(cfg: CorpusConfig) -> EmotionDirections | None:
    """``cfg.steer_directions`` loaded, or None when ``cfg.steer`` is 0; a clear error when they are
    missing or lack an emotion of the build (before any model is loaded)."""
    if cfg.steer <= 0:
        return None
    if not cfg.steer_directions:
        raise ConfigError("corpus.build.steer > 0 needs corpus.build.steer_directions: a directions folder "
                          "such as RUN/directions/dense of a run on an earlier corpus.")
    try:
        dirs = EmotionDirections.load(cfg.steer_directions)
    except (OSError, UserError) as e:
        raise ConfigError(f"corpus.build.steer_directions: cannot load directions from {cfg.steer_directions} "
                          f"({one_line(e)}); give a folder written by EmotionDirections.save.") from None
    missing = [n for n in emo.resolve(cfg.emotions) if n not in dirs.names]
    if missing:
        raise ConfigError(f"corpus.build.steer_directions has no direction for {len(missing)} emotion(s) of the "
                          f"build ({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}); use directions "
                          "built on those emotions or build fewer (corpus.build.emotions).")
    return dirs


def writer_steering(cfg: CorpusConfig, generator: Generator, batches: list[Batch]):
    """(vector per emotion, hook, what records note) for a steered build with emotion batches to go, else None."""
    dirs = load_steer_directions(cfg)
    if dirs is None or all(b.emotion in NON_EMOTION for b in batches):
        return None
    vectors = writer_vectors(generator.hf, generator.tokenizer, dirs, cfg.steer)
    note = {"strength": cfg.steer, "hook": dirs.hook, "directions": key_of(dirs.names, dirs.vectors)[:12]}
    return vectors, dirs.hook, note


def compress(src: Path | str, dst: Path | str) -> Path:
    """Gzip a finished build file (atomic: written to a temp name, then renamed)."""
    src, dst = Path(src), Path(dst)
    with atomic_path(dst) as tmp, open(src, "rb") as f, gzip.GzipFile(tmp, "wb", mtime=0) as g:
        g.write(f.read())
    return dst
