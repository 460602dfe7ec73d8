"""Steering evaluations: the text measures, the activity set, the preference and pressure inputs,
one real behavioural check, and the pipeline stage end to end on a tiny budget.

The behavioural check builds a 'happy' direction from a few contrasting sentences on the real
model (DiffMean of happy vs sad sentences at layer 20), so it runs without the shipped corpus.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from saefeatures.directions import EmotionDirections
from saefeatures.distributed import World
from saefeatures.evals.activities import ACTIVITIES
from saefeatures.evals.dose_response import Curve, CurvePoint, score_continuations
from saefeatures.evals.judge import judge, repetition_rate
from saefeatures.evals.preference import (PREFERENCE_ANSWER, PREFERENCE_QUESTION, choice_probs, option_tokens,
                                          preference_pairs)
from saefeatures.evals.pressure import pressure_conversations
from saefeatures.evals.steering import SteeringConfig
from saefeatures.evals.steering_suite import SteeringResult
from saefeatures.neutral import NEUTRAL_PROMPTS
from saefeatures.report.steering import steering_figures
from saefeatures.study.probe_stages import stage_steering
from saefeatures.steering import Steering, SteeringSpec, generate_steered_full, steered

from test_steering import HOOK, LAYER, make_sae  # tests/ is on sys.path (pytest rootdir import)

HAPPY = ["I laughed all afternoon with my best friends at the fair.", "We won! Everyone cheered and hugged.",
         "The sun was warm and the children were giggling in the garden.", "She smiled, delighted by the gift.",
         "What a wonderful, joyful day at the beach with the family.", "He grinned from ear to ear at the news."]
SAD = ["I cried alone in my room after the funeral.", "We lost, and nobody said a word on the way home.",
       "The house was cold and empty since she left.", "He stared at the grey sky, heartbroken and tired.",
       "The letter said the dog had died in the night.", "She missed him terribly and could not sleep."]


@pytest.fixture(scope="module")
def happy_dirs(model):
    """Real directions from contrasting sentences: 'happy' = happy - sad, 'afraid' its opposite."""
    from saefeatures.activations import forward_hooks, iter_batches

    def pooled(texts):
        rows = []
        for b in iter_batches(model.tokenizer, [str(i) for i in range(len(texts))], texts, 4096, 64):
            h = forward_hooks(model, b.tokens, [HOOK])[HOOK]
            m = b.content_mask()[..., None].float()
            rows.append((h.float() * m).sum(1) / m.sum(1))
        return torch.cat(rows).mean(0)

    diff = pooled(HAPPY) - pooled(SAD)
    v = diff / diff.norm()
    calm = torch.nn.functional.normalize(torch.randn(576, generator=torch.Generator().manual_seed(0)), dim=0)
    return EmotionDirections(["happy", "afraid", "desperate", "calm"], LAYER,
                             torch.stack([v, -v, -v, calm]), HOOK, "dense", torch.zeros(576))


# ---------------------------------------------------------------- text measures


def test_judge_reads_valence_and_arousal_from_words():
    pos, _, n_pos = judge(["What a lovely, happy, sunny morning with friends."])
    neg, _, _ = judge(["A terrible, painful, lonely night of grief and fear."])
    _, calm_a, _ = judge(["A quiet, slow, peaceful nap."])
    _, hot_a, _ = judge(["A furious, terrifying explosion and panic."])
    assert pos > 7 and neg < 4 and n_pos == 5  # 'friends' is rated through its singular
    assert hot_a > calm_a + 1
    assert judge(["xyzzy qwrt"]) == (None, None, 0)


def test_repetition_rate_counts_repeated_trigrams():
    assert repetition_rate("the cat sat on the mat") == 0.0
    assert repetition_rate("a b c a b c a b c") == pytest.approx(4 / 7)
    assert repetition_rate("too short") == 0.0


def test_curve_metrics_spearman_and_fluency_limit():
    def pt(s, v, ppl):
        return CurvePoint(s, s * 10, v, 5.0, 10, ppl * 10, ppl, 0.0, "")
    c = Curve("happy", "dense", [pt(0, 5.0, 1.0), pt(0.1, 5.2, 1.1), pt(0.2, 5.5, 1.5), pt(0.3, 5.9, 1.9),
                                 pt(0.4, 6.1, 2.5), pt(0.5, 6.0, 4.0)])
    m = c.metrics(2.0)
    assert m["max_strength_ppl_ratio_under_2"] == 0.3 and m["fluency_break_strength"] == 0.4
    assert m["judge_valence_spearman"] == pytest.approx(0.9429, abs=1e-3)
    assert m["judge_valence_spearman_fluent"] == pytest.approx(1.0)
    assert m["valence_change_at_max_fluent"] == pytest.approx(0.9)
    assert m["projection_spearman"] == pytest.approx(1.0)
    assert "ci" not in m and "null" not in m  # no continuations kept: no interval


def test_curve_intervals_from_the_kept_continuations():
    base = ["A plain grey day at the office.", "The bus came and went.", "It was a normal day.", "The room was dim."]
    happy = ["A wonderful happy day with friends and love!", "Joy and laughter, a lovely gift.",
             "We celebrated with delight and cheer.", "Such a beautiful, happy morning."]
    points = [CurvePoint(0.0, 0.0, None, None, 0, 10.0, 1.0, 0.0, base[0], base, [0.1, -0.2, 0.0, 0.1]),
              CurvePoint(0.2, 1.025, None, None, 0, 12.0, 1.2, 0.0, happy[0], happy, [1.1, 0.9, 1.3, 0.8])]
    m = Curve("happy", "dense", points).metrics(2.0)
    for key in ("valence_change_at_max_fluent", "projection_change_at_max_fluent"):
        assert m["ci"][key]["lower"] > 0 and m["null"][key]["percentile"] > 95, key
    assert m["projection_change_at_max_fluent"] == pytest.approx(1.025 - 0.0)
    assert m["ci"]["projection_change_at_max_fluent"]["lower"] <= 1.025 <= m["ci"]["projection_change_at_max_fluent"]["upper"]


# ---------------------------------------------------------------- preference and pressure inputs


def test_activities_are_many_distinct_and_span_valence():
    texts = [a.text for a in ACTIVITIES]
    assert len(texts) >= 40 and len(set(texts)) == len(texts)
    assert {a.tone for a in ACTIVITIES} == {-1, 0, 1}
    assert min(sum(a.tone == t for a in ACTIVITIES) for t in (-1, 0, 1)) >= 10


def test_preference_pairs_cover_every_activity_without_self_pairs():
    pairs = preference_pairs(44, 6, seed=0)
    assert all(a < b for a, b in pairs) and len(set(pairs)) == len(pairs)
    counts = torch.bincount(torch.tensor(pairs).flatten(), minlength=44)
    assert counts.min() >= 4 and counts.max() <= 9
    assert preference_pairs(44, 6, seed=0) == pairs != preference_pairs(44, 6, seed=1)


def _preference_texts(tokenizer, pairs):
    from saefeatures.models import chat_prompt

    texts, spans = [], []
    for a, b in pairs:
        text = chat_prompt(tokenizer, [{"role": "user", "content": PREFERENCE_QUESTION.format(a=a.text, b=b.text)}])
        text += PREFERENCE_ANSWER
        start = text.index("A: " + a.text) + 3
        texts.append(text)
        spans.append((start, start + len(a.text)))
    return texts, spans


def test_option_tokens_mark_exactly_option_a(tokenizer):
    pairs = [(ACTIVITIES[0], ACTIVITIES[30]), (ACTIVITIES[17], ACTIVITIES[2])]
    ids, inside = option_tokens(tokenizer, *_preference_texts(tokenizer, pairs))
    for row, (a, _) in enumerate(pairs):
        marked = tokenizer.decode([t for t, m in zip(ids[row], inside[row]) if m])
        assert marked.strip() == a.text
        assert not any(inside[row][-3:])  # the answer prefix is never steered


def test_pressure_conversations_fail_every_turn_and_grow():
    fail, control = pressure_conversations()
    assert len(fail) == len(control) >= 6
    assert all(len(fail[k + 1]) == len(fail[k]) + 2 for k in range(len(fail) - 1))
    assert all("FAILED" in f[-1]["content"] and "passed" in c[-1]["content"]
               for f, c in zip(fail[1:], control[1:]))


# ---------------------------------------------------------------- behaviour on the real model


def test_happy_direction_raises_judge_valence(model, happy_dirs):
    prompts = NEUTRAL_PROMPTS[:3]
    rows = [None, Steering.from_spec(SteeringSpec(emotions={"happy": 0.3}), model, directions=happy_dirs),
            Steering.from_spec(SteeringSpec(emotions={"afraid": 0.3}), model, directions=happy_dirs)]
    gens = generate_steered_full(model, Steering.stack(rows, repeat=len(prompts)), prompts * 3,
                                 max_new_tokens=24, batch_size=9)
    plain, up, down = (judge([g.text for g in gens[k * 3:(k + 1) * 3]])[0] for k in range(3))
    assert up > plain > down, (up, plain, down, [g.text for g in gens])


def test_stage_steering_records_metrics_plots_and_reuses(model, happy_dirs, tmp_path):
    from saefeatures.study.config import RunConfig
    from saefeatures.study.rundir import RunDir

    cfg = RunConfig()
    cfg.tracking.wandb = False
    cfg.steering = SteeringConfig(emotions=["happy", "proud"], strengths=[0.0, 0.2, 0.4],
                                  methods=["dense", "sae_clamp"], prompts=NEUTRAL_PROMPTS[:2], max_new_tokens=8,
                                  preference_activities=8, preference_pairs=2)
    study = SimpleNamespace(cfg=cfg, run=RunDir.open(tmp_path / "run"), model=model, records=[], world=World())
    result = stage_steering(study, {"dense": happy_dirs}, make_sae())
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())["steering"]
    happy = metrics["happy"]
    assert isinstance(happy["judge_valence_spearman"], float)
    assert happy["max_strength_ppl_ratio_under_2"] in (0.0, 0.2, 0.4)
    assert set(happy) >= {"dense", "sae_clamp", "projection_spearman"}
    assert "proud" not in metrics  # not in the directions: skipped, not an error
    assert isinstance(metrics["preference_shift"], float) and -1 < metrics["preference_shift"] < 1
    assert set(metrics["pressure"]) >= {"desperate_spearman", "calm_spearman"}
    assert "nearest" in next(c.note for c in result.curves if c.method == "sae_clamp")
    for name in ("dose_response", "preference", "pressure"):
        assert (tmp_path / "run" / "figures" / "steering" / f"{name}.png").stat().st_size > 1000
    again = stage_steering(study, {"dense": happy_dirs}, make_sae())
    assert again.metrics() == result.metrics()
    assert SteeringResult.load(tmp_path / "run" / "steering" / "results.json").metrics() == result.metrics()
    assert set(steering_figures(again)) == {"dose_response", "preference", "pressure"}


def test_choice_probs_with_a_shared_prefix_match_plain_forward_passes(model, happy_dirs):
    from saefeatures.models import hf_twin

    tok = model.tokenizer
    pairs = [(ACTIVITIES[0], ACTIVITIES[30]), (ACTIVITIES[17], ACTIVITIES[2]), (ACTIVITIES[5], ACTIVITIES[9])]
    ids, inside = option_tokens(tok, *_preference_texts(tok, pairs))
    choices = (tok(" A", add_special_tokens=False).input_ids[-1], tok(" B", add_special_tokens=False).input_ids[-1])
    steering = Steering.from_spec(SteeringSpec(emotions={"happy": 0.5}), model, directions=happy_dirs)
    for s in (None, steering):
        shared = choice_probs(model, ids, inside, choices, s, batch_size=2)
        for row, (t, m) in enumerate(zip(ids, inside)):
            with contextlib.ExitStack() as stack, torch.no_grad():
                if s is not None:
                    stack.enter_context(steered(model, s, backend="hf", token_mask=torch.tensor([m])))
                logits = hf_twin(model)(torch.tensor([t])).logits[0, -1, list(choices)]
            assert float(shared[row]) == pytest.approx(float(logits.softmax(-1)[0]), abs=1e-4)
    assert not torch.allclose(shared, choice_probs(model, ids, inside, choices, None))  # steering moved it


def test_continuation_scores_match_a_plain_forward_pass(model):
    gens = generate_steered_full(model, None, ["Say something short.", "Describe a quiet street at night."],
                                 max_new_tokens=12, batch_size=2)
    # a shorter continuation of the same prompt shares its prefix pass and is padded in the batch
    gens.append(replace(gens[0], new_ids=gens[0].new_ids[:5]))
    gens.append(replace(gens[0], new_ids=[]))  # an empty continuation scores nothing
    pooled, nll, count = score_continuations(model, gens, HOOK)
    for i, g in enumerate(gens[:3]):
        p, n = len(g.prompt_ids), len(g.new_ids)
        tokens = torch.tensor([g.prompt_ids + g.new_ids])
        with torch.no_grad():
            logits, cache = model.run_with_cache(tokens, names_filter=HOOK)
        logp = logits[0].log_softmax(-1)[p - 1:p + n - 1].gather(1, torch.tensor(g.new_ids)[:, None])
        assert count[i] == n
        assert nll[i] == pytest.approx(float(-logp.sum()), rel=1e-4)
        torch.testing.assert_close(pooled[i], cache[HOOK][0, p:p + n].mean(0), atol=1e-3, rtol=1e-4)
    assert count[3] == 0 and nll[3] == 0.0 and not pooled[3].any()


def test_disabled_steering_drops_an_earlier_runs_section(tmp_path):
    from saefeatures.study.config import RunConfig
    from saefeatures.study.rundir import RunDir

    run = RunDir.open(tmp_path / "run")
    run.record("steering", {"happy": {"judge_valence_spearman": 0.9}})
    (tmp_path / "run" / "figures" / "steering").mkdir(parents=True)
    cfg = RunConfig()
    cfg.steering.enabled = False
    assert stage_steering(SimpleNamespace(cfg=cfg, run=run, model=None, records=[], world=World()), {}) is None
    assert "steering" not in json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert not (tmp_path / "run" / "figures" / "steering").exists()
