"""Shared fixtures: the real embedded model is loaded once per test session."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def model():
    """SmolLM2-135M-Instruct as a HookedTransformer (float32), with its HF twin kept."""
    from saefeatures.models import load_model

    return load_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tokenizer(model):
    return model.tokenizer


def make_random_sae(d_in: int = 576, d_sae: int = 64, hook: str = "blocks.6.hook_resid_post", seed: int = 0):
    """A small SAELens ReLU SAE with random weights (mechanics tests; no training)."""
    from sae_lens import SAE
    from sae_lens.loading.pretrained_sae_loaders import handle_config_defaulting

    sae = SAE.from_dict(handle_config_defaulting({
        "architecture": "standard", "d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": "cpu",
        "hook_name": hook, "hook_head_index": None, "prepend_bos": False, "context_size": 256,
        "apply_b_dec_to_input": False, "normalize_activations": "none"}))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, d_sae, generator=g) / d_in**0.5)
        sae.b_enc.fill_(-0.5)
        sae.W_dec.copy_(torch.randn(d_sae, d_in, generator=g) / d_in**0.5)
        sae.b_dec.zero_()
    return sae.eval()


@pytest.fixture(scope="session")
def random_sae():
    return make_random_sae()



def _ours(hook) -> bool:
    """False for transformers' own output-capturing hooks, installed once and left on for good."""
    return "output_capturing_hook" not in getattr(hook, "__qualname__", "")


def hooks_left(model, sae=None) -> list[str]:
    """Names of the hook points and HF modules of `model` (and `sae`) that still carry a hook."""
    from saefeatures.models import hf_twin

    left = [name for name, hp in model.hook_dict.items() if hp.fwd_hooks or hp.bwd_hooks]
    hf = hf_twin(model)
    for name, m in hf.named_modules() if hf is not None else []:
        if any(_ours(h) for h in [*m._forward_hooks.values(), *m._forward_pre_hooks.values()]):
            left.append(name)
    if sae is not None:
        left += [f"sae.{name}" for name, hp in sae.hook_dict.items() if hp.fwd_hooks]
    return left


@pytest.fixture(autouse=True)
def no_hook_leaks(request):
    """Fail the test that leaves a hook on the shared model (it would change every later test)."""
    yield
    if "model" not in request.fixturenames:
        return
    model = request.getfixturevalue("model")
    leaked = hooks_left(model)
    if leaked:
        model.reset_hooks(including_permanent=True)
        pytest.fail(f"hooks left on the shared model: {leaked[:5]}")
