"""Corpus recipes (issue 14): prompts, prefills, recognition filter, resumed recipe builds."""

import json
import re
from dataclasses import dataclass

import pytest
import torch

from saefeatures import corpus as C
from saefeatures import corpus_build as B
from saefeatures import recipes as R
from saefeatures.generation import GenerationConfig, Generator

STORY = ("Maria checked the clock again and again, her fingers drumming on the table while the rain hammered "
         "the window. She dialled the number a third time, whispering please under her breath, and paced the "
         "narrow kitchen until the kettle screamed and she jumped at the sound of it.")


class WordTokenizer:
    def __call__(self, text, add_special_tokens=False):
        return type("Enc", (), {"input_ids": text.split()})()


@pytest.mark.parametrize("name", list(R.RECIPES))
def test_recipe_prompts_render(name):
    rec = R.get_recipe(name)
    prompt, prefill = rec.render("a job interview", "grief-stricken", "Tom")
    assert "a job interview" in prompt or "a job interview" in prefill
    assert "grief-stricken" in prompt + prefill
    assert not re.search(r"[{}]", prompt + prefill)
    if rec.prefill:
        assert prefill.startswith(("Tom", "Dear diary")) and "grief-stricken" in prefill
    assert rec.ban_words == (name == "paper")


def test_unknown_recipe_is_named():
    with pytest.raises(ValueError, match="Unknown corpus recipe 'nope'.*prefill"):
        B.plan_corpus(B.CorpusConfig(emotions=["calm"], recipe="nope"))


def test_plan_with_prefill_recipe():
    cfg = B.CorpusConfig(emotions=["calm", "afraid"], stories_per_emotion=8, neutral_per_topic=1, recipe="prefill")
    items = [i for b in B.plan_corpus(cfg) for i in b.items]
    emo_items = [i for i in items if i.emotion != "neutral"]
    assert len(emo_items) == 16 and all(i.kind == "story" for i in emo_items)  # no dialogues
    for i in emo_items:
        assert re.fullmatch(rf"\w+ felt {i.emotion} because", i.prefill)
        assert i.topic in i.prompt
    assert all(i.prefill == "" for i in items if i.emotion == "neutral")
    # the default stays the paper's prompt
    assert B.CorpusConfig().recipe == "prefill"  # the default for new builds (issue 14)
    paper = [i for b in B.plan_corpus(B.CorpusConfig(emotions=["calm"], stories_per_emotion=4, recipe="paper"))
             for i in b.items]
    assert all("Never use the word" in i.prompt and not i.prefill for i in paper if i.kind == "story")


def test_generator_renders_prefill_after_the_assistant_turn():
    class Tok:
        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            return f"<user>{messages[0]['content']}</user><assistant>"

    g = Generator(None, Tok())
    assert g.render("Write.", "Tom felt calm because") == "<user>Write.</user><assistant>Tom felt calm because"
    assert g.render("Write.") == "<user>Write.</user><assistant>"


def test_drop_reason_allows_naming_for_naming_recipes():
    text = "Tom felt calm because " + STORY
    assert C.drop_reason(text, "calm") == "names_emotion"
    assert C.drop_reason(text, "calm", allow_naming=True) is None


def test_rank_of_counts_distinct_first_tokens_above():
    first = torch.tensor([5, 7, 7, 9])  # candidates 1 and 2 share a first token
    scores = torch.tensor([0.5, 0.9, 0.9, 0.1])
    assert R.rank_of(scores, first, 0) == 2  # only token 7 is above
    assert R.rank_of(scores, first, 1) == 1
    assert R.rank_of(scores, first, 2) == 1  # ties with its twin
    assert R.rank_of(scores, first, 3) == 3


@dataclass
class PrefillGenerator:
    """Stand-in model: replies from prompt and seed, records the prefills it got; can fail after n calls."""

    tokenizer: object
    fail_after: int | None = None
    calls: int = 0

    def generate(self, prompts, seed, banned=None, prefills=None):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt
        self.calls += 1
        assert banned is None or all(not p for p in (prefills or []))
        return [f" it was that kind of day. {STORY} Seed {seed} prompt {hash(p) % 997}. And then" for p in prompts]


def crafted_recognizer(calls):
    """Rank 1 for texts with an even seed digit sum, 50 otherwise: a crafted, deterministic reading."""

    def recognize(texts, emotions):
        calls.extend(texts)
        return [1 if sum(map(int, re.search(r"Seed (\d+)", t).group(1))) % 2 == 0 else 50 for t in texts]

    return recognize


def _cfg(**kw):
    return B.CorpusConfig(emotions=["calm", "afraid"], stories_per_emotion=6, neutral_per_topic=1, topics=12,
                          generation=GenerationConfig(batch_size=4), recipe="prefill", recognition_rank=10, **kw)


def test_recognition_filter_drops_and_records_ranks(tmp_path):
    out = tmp_path / "c.jsonl"
    calls = []
    report = B.build_corpus(_cfg(), out, PrefillGenerator(WordTokenizer()), "m", recognizer=crafted_recognizer(calls))
    records = list(C.read_records(out))
    emo_recs = [r for r in records if r.emotion != "neutral"]
    assert len(calls) == len(emo_recs) == 12  # neutral texts are not read
    for r in emo_recs:
        assert r.text.startswith(r.generation["prefill"]) and r.generation["recipe"] == "prefill"
        assert r.text.endswith(".")  # the unfinished tail was cut
        rank = r.generation["recognition_rank"]
        assert (r.dropped == "unrecognized") == (rank > 10)
    assert "recognition_rank" not in next(r for r in records if r.emotion == "neutral").generation
    n_unrec = sum(r.dropped == "unrecognized" for r in emo_recs)
    assert 0 < n_unrec < 12 and report.dropped["unrecognized"] == n_unrec
    stats = C.validate_corpus(out)
    assert stats["kept_fraction"] == pytest.approx((12 - n_unrec) / 12, abs=1e-4)
    assert stats["recognition"]["n_read"] == 12
    assert stats["recognition"]["kept_fraction"] == stats["kept_fraction"]


def test_resumed_recipe_build_loses_and_duplicates_nothing(tmp_path):
    full, part = tmp_path / "full.jsonl", tmp_path / "part.jsonl"
    B.build_corpus(_cfg(), full, PrefillGenerator(WordTokenizer()), "m", recognizer=crafted_recognizer([]))
    with pytest.raises(KeyboardInterrupt):
        B.build_corpus(_cfg(), part, PrefillGenerator(WordTokenizer(), fail_after=2), "m",
                       recognizer=crafted_recognizer([]))
    done_before = sum(r.emotion != "neutral" for r in C.read_records(part))
    with open(part, "a") as f:
        f.write('{"id": "afraid-0')  # torn tail of a killed append
    assert 0 < done_before < 12
    calls = []
    B.build_corpus(_cfg(), part, PrefillGenerator(WordTokenizer()), "m", recognizer=crafted_recognizer(calls))
    assert len(calls) == 12 - done_before  # each emotion text is read once, before its batch is written
    a = [json.loads(x) for x in full.read_text().splitlines()]
    b = [json.loads(x) for x in part.read_text().splitlines()]
    assert len({r["id"] for r in b}) == len(b)
    assert {r["id"]: (r["text"], r["dropped"], r["generation"]) for r in a} == \
        {r["id"]: (r["text"], r["dropped"], r["generation"]) for r in b}
    again = B.build_corpus(_cfg(), part, PrefillGenerator(WordTokenizer(), fail_after=0), "m",
                           recognizer=crafted_recognizer([]))
    assert again.generated == 0


def test_config_yaml_takes_recipe(tmp_path):
    from saefeatures.study.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text("corpus:\n  build:\n    recipe: prefill\n    recognition_rank: 20\n")
    cfg = load_config(path)
    assert cfg.corpus.build.recipe == "prefill" and cfg.corpus.build.recognition_rank == 20


# ---------------------------------------------------------------- the real model


@pytest.mark.slow
def test_recognition_on_crafted_stories(model):
    from saefeatures.models import hf_twin

    texts = ["My brother smashed my new bike on purpose and laughed at me. I clenched my fists and shouted at "
             "him until my face turned red, and I slammed the door so hard the pictures fell.",
             "The results came back and I had won first prize. I jumped up and down, laughed, and hugged everyone "
             "in the room; it was the best day of my life.",
             "The results came back and I had won first prize. I jumped up and down, laughed, and hugged everyone "
             "in the room; it was the best day of my life."]
    emotions = ["angry", "happy", "grief-stricken"]
    out = R.read_texts(hf_twin(model), model.tokenizer, texts, emotions, layer=20)
    ranks = out["rank_raw"].tolist()  # what the build filters by (recognition_calibrated=False)
    assert ranks[0] <= 10 and ranks[1] <= 10, ranks  # the intended emotion is among the model's first words
    assert ranks[2] > ranks[1]  # a wrong label ranks worse on the same text
    assert out["pooled"].shape == (3, model.cfg.d_model)
    # the texts do not name the emotion: masking changes nothing
    assert torch.allclose(out["pooled"], out["pooled_masked"])


@pytest.mark.slow
def test_emotion_token_mask_and_masked_pooling(model):
    from saefeatures.models import hf_twin

    text = "Tom felt anxious because the exam was tomorrow. " + STORY + " He was anxiously waiting."
    mask = R.emotion_token_mask(model.tokenizer, text, "anxious", 128)
    toks = model.tokenizer(text, add_special_tokens=False).input_ids[:128]
    masked = model.tokenizer.decode([t for t, m in zip(toks, mask) if m])
    assert "anxious" in masked and "anxiously" in masked.replace(" ", "")
    assert "exam" not in masked
    out = R.read_texts(hf_twin(model), model.tokenizer, [text], ["anxious"], layer=20, recognize=False)
    assert not torch.allclose(out["pooled"], out["pooled_masked"])


def test_recognition_keep_keeps_the_best_fraction_of_each_batch(tmp_path):
    out = tmp_path / "k.jsonl"
    ranks = {}

    def recognize(texts, emotions):
        r = [int(re.search(r"Seed (\d+) prompt (\d+)", t).group(2)) % 37 + 1 for t in texts]
        ranks.update(zip(texts, r))
        return r

    cfg = _cfg(recognition_keep=0.5)
    cfg.recognition_rank = 0
    B.build_corpus(cfg, out, PrefillGenerator(WordTokenizer()), "m", recognizer=recognize)
    records = [r for r in C.read_records(out) if r.emotion != "neutral"]
    for batch in {r.batch for r in records}:
        rs = [r for r in records if r.batch == batch]
        kept = [r for r in rs if r.dropped is None]
        assert len(kept) == round(0.5 * len(rs))
        worst_kept = max(r.generation["recognition_rank"] for r in kept)
        assert all(r.generation["recognition_rank"] >= worst_kept for r in rs if r.dropped == "unrecognized")
    assert C.validate_corpus(out)["kept_fraction"] == 0.5
