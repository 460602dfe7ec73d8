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
