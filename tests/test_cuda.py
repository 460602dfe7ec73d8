"""The library on a GPU gives what it gives on the CPU: a small stand-in Llama (random weights, a
BPE tokenizer trained here, ChatML template) loaded on both devices, then pooled activations,
dense directions, continuation scores, steered generation, preference choices and monitor traces
compared. Skipped without CUDA; it needs neither the hub nor the embedded model, so it also runs
on a GPU machine that lacks them. ``SAEFEATURES_TEST_DEVICE`` names another device to compare
(``cpu`` runs the comparisons on one device, to check the test itself).
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import STANDIN_TEXTS, standin_checkpoint

DEVICE = os.environ.get("SAEFEATURES_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU")

TEXTS = STANDIN_TEXTS


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from saefeatures.models import load_model

    path = standin_checkpoint(tmp_path_factory.mktemp("standin"))
    return load_model(str(path), device="cpu"), load_model(str(path), device=DEVICE)


def _records():
    return [type("R", (), {"id": f"r{i}", "text": t})() for i, t in enumerate(TEXTS)]


def test_logits_and_pooled_activations_match_the_cpu(models):
    from saefeatures.activations import ActivationConfig, collect_pooled
    from saefeatures.models import hf_twin

    cpu, gpu = models
    assert next(gpu.parameters()).device.type == hf_twin(gpu).device.type == torch.device(DEVICE).type
    ids = cpu.tokenizer(TEXTS[0], return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(gpu(ids.to(DEVICE)).cpu(), cpu(ids), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(hf_twin(gpu)(ids.to(DEVICE)).logits.cpu(), cpu(ids), atol=1e-4, rtol=1e-4)
    acfg = ActivationConfig(dtype="float32", batch_tokens=64)
    a = collect_pooled(cpu, _records(), acfg, layers=[1, 2])
    b = collect_pooled(gpu, _records(), acfg, layers=[1, 2])
    for hook in ("blocks.1.hook_resid_post", "blocks.2.hook_resid_post"):
        assert b[hook].device.type == "cpu"  # pooled rows come back to the CPU for the stores
        torch.testing.assert_close(b[hook], a[hook], atol=1e-4, rtol=1e-4)


def _directions(model):
    from saefeatures.activations import ActivationConfig, collect_pooled
    from saefeatures.directions import build_dense

    acts = collect_pooled(model, _records(), ActivationConfig(dtype="float32"), layers=[2])["blocks.2.hook_resid_post"]
    return build_dense(acts, ["afraid", "calm", "happy", "sad", "calm", "happy"], acts[[1, 4]], layer=2)


def test_directions_steering_and_scores_match_the_cpu(models):
    from saefeatures.evals.dose_response import score_continuations
    from saefeatures.steering import Steering, SteeringSpec, generate_steered_full

    cpu, gpu = models
    dirs = _directions(cpu)
    torch.testing.assert_close(_directions(gpu).vectors, dirs.vectors, atol=1e-4, rtol=1e-3)
    prompts = ["Tell me about your day.", "Describe the street."]
    out = {}
    for name, model in (("cpu", cpu), ("gpu", gpu)):
        steer = Steering.from_spec(SteeringSpec(emotions={"happy": 2.0}), model, directions=dirs, norm=1.0)
        plain = generate_steered_full(model, None, prompts, max_new_tokens=8, batch_size=2)
        steered = generate_steered_full(model, steer, prompts, max_new_tokens=8, batch_size=2)
        tl = generate_steered_full(model, steer, prompts, max_new_tokens=8, batch_size=2, backend="tl")
        assert [g.new_ids for g in steered] == [g.new_ids for g in tl]  # fast path = TransformerLens
        out[name] = (plain, steered, score_continuations(model, plain + steered, dirs.hook))
    assert [g.new_ids for g in out["gpu"][0]] == [g.new_ids for g in out["cpu"][0]]
    assert [g.new_ids for g in out["gpu"][1]] == [g.new_ids for g in out["cpu"][1]]
    assert [g.new_ids for g in out["cpu"][1]] != [g.new_ids for g in out["cpu"][0]]  # steering changed the text
    (p_cpu, nll_cpu, n_cpu), (p_gpu, nll_gpu, n_gpu) = out["cpu"][2], out["gpu"][2]
    torch.testing.assert_close(p_gpu, p_cpu, atol=1e-4, rtol=1e-3)
    assert n_gpu == n_cpu and nll_gpu == pytest.approx(nll_cpu, rel=1e-4)


def test_sampling_preference_and_monitor_run_on_the_gpu(models):
    from saefeatures.evals.preference import choice_probs, option_tokens
    from saefeatures.monitor import calibrate, trace_chat
    from saefeatures.steering import Steering, SteeringSpec, generate_steered_full

    cpu, gpu = models
    dirs = _directions(cpu)
    sampled = generate_steered_full(gpu, None, ["Tell me about your day."] * 4, max_new_tokens=8, batch_size=4,
                                    temperature=0.8, top_p=0.95)
    assert all(0 < len(g.new_ids) <= 8 for g in sampled)
    texts = ["<|im_start|>user\nA: the fair or B: the train?<|im_end|>\n<|im_start|>assistant\nI pick",
             "<|im_start|>user\nA: the letter or B: the train?<|im_end|>\n<|im_start|>assistant\nI pick"]
    spans = [(t.index("A: ") + 3, t.index(" or")) for t in texts]
    ids, inside = option_tokens(cpu.tokenizer, texts, spans)
    choices = (5, 6)  # any two tokens: the comparison is across devices
    for steering in (None, "happy"):
        probs = [choice_probs(m, ids, inside, choices, steering and Steering.from_spec(
            SteeringSpec(emotions={"happy": 2.0}), m, directions=dirs, norm=1.0)) for m in (cpu, gpu)]
        torch.testing.assert_close(probs[1], probs[0], atol=1e-4, rtol=1e-3)
    chat = [{"role": "user", "content": TEXTS[0]}, {"role": "assistant", "content": TEXTS[1]}]
    a, b = trace_chat(cpu, dirs, chat), trace_chat(gpu, dirs, chat)
    assert a.tokens == b.tokens and a.turns == b.turns and b.projections.device.type == "cpu"
    torch.testing.assert_close(b.projections[1:], a.projections[1:], atol=1e-3, rtol=1e-3)
    ca, cb = calibrate(cpu, dirs, TEXTS), calibrate(gpu, dirs, TEXTS)
    torch.testing.assert_close(cb.mean, ca.mean, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(cb.std, ca.std, atol=1e-3, rtol=1e-3)
