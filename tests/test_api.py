"""The public API (`import saefeatures as sf`) end to end on the stand-in Llama: build directions,
read plain texts, steer inside a ``with``, generate steered text and trace a chat."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import STANDIN_TEXTS, dtype_tolerance, hooks_left

import saefeatures as sf
from saefeatures.models import hf_twin, resolve_dtype

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.dtype  # directions pool in the dtype 'auto' resolves to


@dataclass(frozen=True)
class Rec:
    id: str
    emotion: str
    text: str
    split: str = "train"


RECORDS = [Rec(f"r{i}", e, t) for i, (e, t) in
           enumerate(zip(["afraid", "neutral", "happy", "sad", "neutral", "happy"], STANDIN_TEXTS))]
RECORDS += [Rec(f"s{i}", e, t[::-1]) for i, (e, t) in enumerate(zip(["afraid", "sad", "neutral"], STANDIN_TEXTS))]


def test_import_is_light_and_the_api_is_explicit():
    code = "import sys, saefeatures; print('torch' in sys.modules, sorted(saefeatures.__all__))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.startswith("False")
    assert not hasattr(sf, "__getattr__")
    for module in pkgutil.walk_packages(sf.__path__, "saefeatures."):  # no subpackage shadows a public name
        if module.name != "saefeatures.__main__":
            importlib.import_module(module.name)
    assert all(inspect.isfunction(getattr(sf, name)) for name in sf.__all__)


@pytest.fixture(scope="module")
def dense(tiny_model):
    return sf.dense_directions(tiny_model, RECORDS, layer=1)


def test_dense_directions_and_reading_plain_texts(tiny_model, dense):
    assert dense.names == ["afraid", "happy", "sad"] and dense.hook == "blocks.1.hook_resid_post"
    assert dense.metadata["concept_weight"] == 2.0 and dense.metadata["n_concept_emotions"] == 3  # the shipped recipe
    torch.testing.assert_close(dense.vectors.norm(dim=1), torch.ones(3))
    scores = dense.read(tiny_model, [STANDIN_TEXTS[2], "The bus is late."])
    assert len(scores) == 2 and set(scores[0]) == {"afraid", "happy", "sad"}
    again = dense.read(tiny_model, [STANDIN_TEXTS[2]])  # one text alone reads as it did in a batch
    assert again[0] == pytest.approx(scores[0], **dtype_tolerance(resolve_dtype("auto"), 1e-4))


def test_steering_applies_inside_the_with_only(tiny_model, dense):
    happy = sf.emotion_steering(tiny_model, dense, emotions={"happy": 2.0})
    tokens = tiny_model.tokenizer(STANDIN_TEXTS[0], return_tensors="pt", add_special_tokens=False).input_ids
    plain = tiny_model(tokens)
    with happy.applied(tiny_model):
        steered = tiny_model(tokens)
    assert not torch.allclose(plain, steered)
    assert hooks_left(tiny_model) == []
    torch.testing.assert_close(tiny_model(tokens), plain)
    with happy.applied(tiny_model, backend="hf"):
        hf_steered = hf_twin(tiny_model)(tokens).logits
    torch.testing.assert_close(hf_steered, steered, atol=1e-4, rtol=1e-4)
    assert hooks_left(tiny_model) == []


def test_generate_steered_and_monitor_chat(tiny_model, dense):
    happy = sf.emotion_steering(tiny_model, dense, emotions={"happy": 2.0})
    replies = sf.generate_steered(tiny_model, happy, ["Tell me about your day."], max_new_tokens=5)
    assert len(replies) == 1 and isinstance(replies[0], str)
    trace = sf.monitor_chat(tiny_model, dense, [{"role": "user", "content": STANDIN_TEXTS[1]}])
    assert trace.names == dense.names and trace.projections.shape == (len(trace.tokens), 3)
