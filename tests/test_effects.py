"""What a latent writes (`sae.effects`), on the stand-in Llama: logit lens and clamp effects."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from conftest import STANDIN_TEXTS, make_random_sae

from saefeatures.activations import ActivationConfig
from saefeatures.sae.effects import clamp_logprob_shift, emotion_token_ids, logit_lens, output_scores
from saefeatures.sae.scoring import ScoringConfig, score_latents

HOOK = "blocks.1.hook_resid_post"


@dataclass(frozen=True)
class Rec:
    id: str
    emotion: str
    text: str


@pytest.fixture(scope="module")
def sae():
    return make_random_sae(d_in=64, d_sae=16, hook=HOOK, seed=3)


def test_logit_lens_reads_each_decoder_row_through_the_unembedding(tiny_model, sae):
    lens = logit_lens(tiny_model, sae, [2, 5], top=4)
    assert set(lens) == {2, 5} and all(len(v) == 4 for v in lens.values())
    with torch.no_grad():
        logits = tiny_model.unembed(tiny_model.ln_final(sae.W_dec[[5]][:, None, :]))[0, 0]
    best = [tiny_model.tokenizer.decode([int(t)]) for t in logits.topk(4).indices]
    assert lens[5] == best
    assert logit_lens(tiny_model, sae, range(16), top=4, batch=3) == logit_lens(tiny_model, sae, range(16), top=4)


def test_emotion_token_ids_are_first_tokens_of_the_word_forms(tiny_model):
    tok = tiny_model.tokenizer
    ids = emotion_token_ids(tok, "happy")
    expected = {tok(v, add_special_tokens=False).input_ids[0] for v in (" happy", " Happy")}
    assert set(ids) >= expected and ids == sorted(ids)


def test_a_latent_that_writes_nothing_shifts_nothing(tiny_model, sae):
    targets = {"happy": emotion_token_ids(tiny_model.tokenizer, "happy"),
               "sad": emotion_token_ids(tiny_model.tokenizer, "sad")}
    with torch.no_grad():
        saved = sae.W_dec[3].clone()
        sae.W_dec[3].zero_()
    try:
        shift = clamp_logprob_shift(tiny_model, sae, [3, 7], torch.tensor([20.0, 20.0]), targets,
                                    prompts=STANDIN_TEXTS[:3], batch_latents=1)
    finally:
        with torch.no_grad():
            sae.W_dec[3].copy_(saved)
    assert shift.shape == (2, 2)
    assert torch.equal(shift[0], torch.zeros(2))  # zero decoder row: the residual is unchanged
    assert shift[1].abs().max() > 1e-4  # a latent clamped high moves the emotion words


def test_output_scores_fill_candidates_only_relative_to_the_other_emotions(tiny_model, sae):
    records = [Rec(f"r{i}", emotion, text) for i, (emotion, text) in
               enumerate(zip(["happy", "sad", "happy", "sad", "neutral", "neutral"], STANDIN_TEXTS))]
    scores = score_latents(tiny_model, sae, records, ScoringConfig(warmup_records=6), ActivationConfig(dtype="float32"))
    out = output_scores(tiny_model, sae, scores, candidates=[1, 4], prompts=STANDIN_TEXTS[:2])
    assert out.shape == (len(scores.classes), 16)
    others = [j for j in range(16) if j not in (1, 4)]
    assert torch.equal(out[:, others], torch.zeros(len(scores.classes), len(others)))
    assert torch.equal(out[scores.index("neutral")], torch.zeros(16))
    emotions = [scores.index(n) for n in ("happy", "sad")]
    torch.testing.assert_close(out[emotions][:, [1, 4]].sum(0), torch.zeros(2), atol=1e-5, rtol=0)
