import gzip
import json
from dataclasses import dataclass

import pytest

from saefeatures import corpus as C
from saefeatures import corpus_build as B
from saefeatures.generation import GenerationConfig, Generator
from saefeatures.prompts import TOPICS, topic_split

STORY = ("Maria checked the clock again and again, her fingers drumming on the table while the rain hammered "
         "the window. She dialled the number a third time, whispering please under her breath, and paced the "
         "narrow kitchen until the kettle screamed and she jumped at the sound of it.")


def test_filters_on_crafted_inputs():
    assert C.drop_reason(STORY, "afraid") is None
    assert C.drop_reason("She was so afraid of the dark. " + STORY, "afraid") == "names_emotion"
    assert C.drop_reason(STORY + " Her fear grew.", "afraid") is None  # a synonym, not the word
    assert C.drop_reason(STORY + " He felt happiness.", "happy") == "names_emotion"
    assert C.drop_reason(STORY + " Happily, it ended.", "happy") == "names_emotion"
    assert C.drop_reason(STORY + " She loved him.", "loving") == "names_emotion"
    assert C.drop_reason(STORY + " Panic rose.", "panicked") == "names_emotion"
    assert C.drop_reason(STORY + " He was completely at ease.", "at ease") == "names_emotion"
    assert C.drop_reason(STORY + " He happened to call.", "happy") is None  # not an inflection
    assert C.drop_reason("Too short to count.", "calm") == "too_short"
    assert C.drop_reason("I'm sorry, but I cannot write that story. " + STORY, "calm") == "refusal"
    looped = " ".join(["the dog ran to the park and back again"] * 8)
    assert C.drop_reason(looped, "calm") == "repetitive"
    assert C.drop_reason(STORY + " " + STORY, "calm") == "repetitive"
    # neutral texts are not checked for emotion words
    assert C.drop_reason(STORY + " She felt calm.", "neutral") is None


def test_clean_text_strips_title_and_unfinished_sentence():
    assert C.clean_text("**The Call**\n" + STORY + " And then she") == STORY


def test_splits_are_topic_disjoint_and_cover_every_emotion():
    cfg = B.CorpusConfig(emotions=["calm", "afraid", "happy"], stories_per_emotion=12, neutral_per_topic=1,
                         recipe="paper")
    items = [i for b in B.plan_corpus(cfg) for i in b.items]
    by_topic = {}
    for i in items:
        by_topic.setdefault(i.topic, set()).add(i.split)
        assert i.split == topic_split(i.topic)
    assert all(len(s) == 1 for s in by_topic.values())
    for e in ("calm", "afraid", "happy"):
        splits = [i.split for i in items if i.emotion == e]
        assert splits.count("train") == 8 and splits.count("val") == 2 and splits.count("test") == 2
    assert len({i.id for i in items}) == len(items)
    assert sum(i.kind == "neutral" for i in items) == 2 * (len(TOPICS) + 60)


def test_bad_emotion_name_in_plan():
    with pytest.raises(KeyError, match="Unknown emotion 'hapy'"):
        B.plan_corpus(B.CorpusConfig(emotions=["hapy"]))


@dataclass
class ScriptedGenerator:
    """Deterministic stand-in for the model: a text from the prompt and seed; can fail after n calls."""

    tokenizer: object
    fail_after: int | None = None
    calls: int = 0

    def generate(self, prompts, seed, banned=None):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt
        self.calls += 1
        return [f"{STORY} Seed {seed} prompt {hash(p) % 997}." for p in prompts]


class WordTokenizer:
    def __call__(self, text, add_special_tokens=False):
        return type("Enc", (), {"input_ids": text.split()})()


def _cfg():
    return B.CorpusConfig(emotions=["calm", "afraid"], stories_per_emotion=6, neutral_per_topic=1, topics=12,
                          recipe="paper",
                          generation=GenerationConfig(batch_size=4))


def test_resume_after_interruption_loses_and_duplicates_nothing(tmp_path):
    full, part = tmp_path / "full.jsonl", tmp_path / "part.jsonl"
    B.build_corpus(_cfg(), full, ScriptedGenerator(WordTokenizer()), "m")
    with pytest.raises(KeyboardInterrupt):
        B.build_corpus(_cfg(), part, ScriptedGenerator(WordTokenizer(), fail_after=3), "m")
    with open(part, "a") as f:  # a torn line, as a kill in the middle of an append leaves
        f.write('{"id": "calm-0')
    report = B.build_corpus(_cfg(), part, ScriptedGenerator(WordTokenizer()), "m")
    assert report.generated > 0
    a = [json.loads(x) for x in full.read_text().splitlines()]
    b = [json.loads(x) for x in part.read_text().splitlines()]
    assert sorted(r["id"] for r in a) == sorted(r["id"] for r in b)
    assert len({r["id"] for r in b}) == len(b)
    assert {r["id"]: r["text"] for r in a} == {r["id"]: r["text"] for r in b}
    # a finished build does nothing more
    again = B.build_corpus(_cfg(), part, ScriptedGenerator(WordTokenizer(), fail_after=0), "m")
    assert again.generated == 0


def test_corrupt_line_is_named_and_skipped_only_when_asked(tmp_path):
    path = tmp_path / "c.jsonl"
    B.build_corpus(_cfg(), path, ScriptedGenerator(WordTokenizer()), "m")
    lines = path.read_text().splitlines(keepends=True)
    lines[2] = "{not json\n"
    path.write_text("".join(lines))
    with pytest.raises(C.CorruptCorpusError, match=r"c.jsonl:3: corrupt corpus line.*skip_corrupt=True"):
        C.load_corpus(path)
    kept = C.load_corpus(path, skip_corrupt=True)
    assert len(kept) == len(lines) - 1
    lines[2] = json.dumps({"id": "x", "emotion": "calm"}) + "\n"
    path.write_text("".join(lines))
    with pytest.raises(C.CorruptCorpusError, match="missing fields"):
        C.load_corpus(path)


def test_validate_and_gzip_roundtrip(tmp_path):
    path = tmp_path / "c.jsonl"
    B.build_corpus(_cfg(), path, ScriptedGenerator(WordTokenizer()), "m")
    stats = C.validate_corpus(path)
    assert stats["n_emotions"] == 2 and stats["min_per_emotion"] == 6
    gz = B.compress(path, tmp_path / "c.jsonl.gz")
    with gzip.open(gz, "rt") as f:
        assert f.read() == path.read_text()
    assert [r.id for r in C.load_corpus(gz)] == [r.id for r in C.load_corpus(path)]


def test_missing_corpus_file():
    with pytest.raises(FileNotFoundError, match="saefeatures corpus build"):
        C.load_corpus("nope.jsonl")


@pytest.mark.slow
def test_real_generation_two_emotions_two_topics(model, tmp_path):
    from saefeatures.models import hf_twin

    cfg = B.CorpusConfig(emotions=["calm", "afraid"], stories_per_emotion=2, neutral_per_topic=0, topics=12,
                         recipe="paper",
                         dialogue_every=0, min_words=10,
                         generation=GenerationConfig(max_new_tokens=48, batch_size=4))
    gen = Generator(hf_twin(model), model.tokenizer, cfg.generation)
    out = tmp_path / "real.jsonl"
    report = B.build_corpus(cfg, out, gen, "smollm2-135m-instruct")
    records = list(C.read_records(out))
    assert report.generated == 4 and len(records) == 4
    assert {r.emotion for r in records} == {"calm", "afraid"}
    assert len({r.topic for r in records}) >= 2
    for r in records:
        assert len(r.text.split()) > 5
        assert not C.names_emotion(r.text, r.emotion)  # its words were banned while decoding
        assert r.generation["max_new_tokens"] == 48 and r.model_id == "smollm2-135m-instruct"
    # same seed, same texts
    again = tmp_path / "again.jsonl"
    B.build_corpus(cfg, again, gen, "smollm2-135m-instruct")
    assert [r.text for r in C.read_records(again)] == [r.text for r in records]
