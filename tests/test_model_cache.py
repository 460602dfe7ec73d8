"""The converted copy of the embedded model under the user cache: a flipped or missing byte is
detected by its recorded SHA-256, named in a warning, and the copy removed (the load converts the
GGUF file again) instead of being loaded."""

from __future__ import annotations

import logging

import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from saefeatures import model_cache as MC

DIGEST = "ab" * 32


class FileTokenizer:
    """Writes one tokenizer file, as a tokenizer's save_pretrained does."""

    def save_pretrained(self, path):
        (path / "tokenizer.json").write_text('{"model": {}}')


@pytest.fixture
def cached(monkeypatch, tmp_path):
    monkeypatch.setenv("SAEFEATURES_CACHE", str(tmp_path))
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2))
    out = MC.save_conversion(hf, FileTokenizer(), DIGEST)
    assert out is not None and MC.cached_conversion(DIGEST) == out  # intact: used
    return out


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "tokenizer edited"])
def test_damaged_cached_copy_is_detected_and_removed(cached, caplog, damage):
    target = cached / ("tokenizer.json" if damage == "tokenizer edited" else "model.safetensors")
    data = bytearray(target.read_bytes())
    if damage == "truncate":
        data = data[:-16]
    else:
        data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="saefeatures.models"):
        assert MC.cached_conversion(DIGEST) is None
    assert f"Cached conversion {cached} is corrupt; converting the GGUF file again." in caplog.text
    assert not cached.exists()


def test_cached_copy_without_its_record_is_not_used(cached):
    (cached / "source.json").unlink()
    assert MC.cached_conversion(DIGEST) is None
