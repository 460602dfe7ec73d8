"""Sampling: the topk nucleus keeps the same tokens as transformers' sort-based warpers."""

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
        ours = NucleusSampling(temperature, top_p, k=64)(None, scores)
        ref = _reference(scores, temperature, top_p)
        assert torch.equal(torch.isfinite(ours), torch.isfinite(ref))
        torch.testing.assert_close(ours[torch.isfinite(ours)], ref[torch.isfinite(ref)])
    assert torch.isfinite(NucleusSampling(1.0, 1e-6)(None, scores)).sum(-1).eq(1).all()  # the top token always stays


def test_bad_sampling_settings_are_errors():
    with pytest.raises(ValueError, match="temperature > 0"):
        NucleusSampling(0.0, 0.9)


def test_generator_samples_what_transformers_own_top_p_samples(model):
    hf, tok = hf_twin(model), model.tokenizer
    cfg = GenerationConfig(max_new_tokens=12, temperature=0.8, top_p=0.9, repetition_penalty=1.1, ban_words=False)
    gen = Generator(hf, tok, cfg)
    prompts = ["Write one sentence about the sea.", "Name a fruit.", "Describe a rainy morning."]
    ours = gen.generate(prompts, seed=3)
    tok.padding_side, side = "left", tok.padding_side
    try:
        enc = tok([gen.render(p) for p in prompts], return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tok.padding_side = side
    torch.manual_seed(3)
    with torch.inference_mode():
        out = hf.generate(**enc, max_new_tokens=12, do_sample=True, temperature=0.8, top_p=0.9, top_k=None,
                          repetition_penalty=1.1, pad_token_id=tok.pad_token_id)
    assert ours == tok.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
