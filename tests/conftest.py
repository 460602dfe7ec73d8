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
