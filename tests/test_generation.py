"""Sampling: the topk nucleus keeps the same tokens as transformers' sort-based warpers, and the
draw among them follows the nucleus' renormalised probabilities."""

from __future__ import annotations

import pytest
import torch
from transformers import TemperatureLogitsWarper, TopPLogitsWarper

from saefeatures.generation import GenerationConfig, Generator, NucleusSampling
from saefeatures.models import hf_twin


def _reference(scores: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    return TopPLogitsWarper(top_p)(None, TemperatureLogitsWarper(temperature)(None, scores))


@pytest.mark.parametrize("spread", [0.5, 3.0, 12.0])  # flat (k must grow) to peaked
def test_nucleus_keeps_the_tokens_a_full_sort_keeps(spread):
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(16, 5000, generator=g) * spread
    scores[:4, :100] = -float("inf")  # banned tokens stay banned
    for temperature, top_p in [(0.8, 0.95), (1.0, 0.5), (1.3, 0.99)]:
        ours = NucleusSampling(temperature, top_p, k=64).nucleus(scores)
        ref = _reference(scores, temperature, top_p)
        assert torch.equal(torch.isfinite(ours), torch.isfinite(ref))
        torch.testing.assert_close(ours[torch.isfinite(ours)], ref[torch.isfinite(ref)])
    assert torch.isfinite(NucleusSampling(1.0, 1e-6).nucleus(scores)).sum(-1).eq(1).all()  # the top token always stays
    drawn = NucleusSampling(0.8, 0.95, k=64)(None, scores)
    assert torch.isfinite(drawn).sum(-1).eq(1).all()  # one token per row, from the nucleus
    assert torch.isfinite(_reference(scores, 0.8, 0.95).gather(1, drawn.argmax(-1, keepdim=True))).all()


@pytest.mark.parametrize("top_p", [0.9, 1.0])
def test_draws_follow_the_nucleus_probabilities(top_p):
    g = torch.Generator().manual_seed(1)
    row = torch.randn(1, 40, generator=g) * 2
    expected = _reference(row, 0.7, top_p).softmax(-1)[0]
    torch.manual_seed(0)
    drawn = NucleusSampling(0.7, top_p, k=8)(None, row.expand(40000, -1)).argmax(-1)
    freq = torch.bincount(drawn, minlength=40) / 40000
    assert (freq - expected).abs().max() < 0.01  # 4 standard errors at most
    assert freq[expected == 0].sum() == 0


def test_bad_sampling_settings_are_errors():
    with pytest.raises(ValueError, match="temperature > 0"):
        NucleusSampling(0.0, 0.9)


def test_generator_is_seeded_and_greedy_at_temperature_zero(model):
    hf, tok = hf_twin(model), model.tokenizer
    prompts = ["Write one sentence about the sea.", "Name a fruit.", "Describe a rainy morning."]
    gen = Generator(hf, tok, GenerationConfig(max_new_tokens=12, temperature=0.8, top_p=0.9, ban_words=False))
    first = gen.generate(prompts, seed=3)
    assert gen.generate(prompts, seed=3) == first != gen.generate(prompts, seed=4)
    greedy = Generator(hf, tok, GenerationConfig(max_new_tokens=12, temperature=0.0, repetition_penalty=1.0))
    tok.padding_side, side = "left", tok.padding_side
    try:
        enc = tok([greedy.render(p) for p in prompts], return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tok.padding_side = side
    with torch.inference_mode():
        out = hf.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    assert greedy.generate(prompts, seed=0) == tok.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
