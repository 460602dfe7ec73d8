"""Shared fixtures: the real embedded model is loaded once per test session."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
THREADS = max(1, min(4, os.cpu_count() or 1))
torch.set_num_threads(THREADS)
BASELINE: dict[str, object] = {}
"""`model_state` of the shared model as loaded (see `no_state_leaks`)."""
LIBRARY_CACHES = ("_saefeatures_resid_norms", "_saefeatures_dtype_copies")
"""Caches the library keeps on a model (`steering.residual_norm`, `activations.with_dtype`): emptied
after each test, so no test reads a value another computed."""
DTYPE_QUERIES: list[str] = []
"""Each time the test now running (its fixtures included) asked whether bf16 is fast, unless it had
set the switch itself (`bf16_env`, recorded in PINNED) to a value that decides the answer."""
PINNED: list[str | None] = []


def pytest_configure(config):
    """Count the questions `bf16_is_fast` answers (each goes through `bf16_switch`), so that
    `dtype_tests_are_marked` can tell which tests depend on the compute dtype 'auto' resolves to."""
    from saefeatures import models

    config.addinivalue_line("markers", "dtype: depends on the compute dtype that 'auto' resolves to "
                            "(bf16_is_fast); make test reruns these with SAEFEATURES_BF16 flipped")
    switch = models.bf16_switch

    def counted():
        value = switch()
        if value is None or not PINNED:  # a test that set the switch (bf16_env) chose its path
            DTYPE_QUERIES.append(os.environ.get("PYTEST_CURRENT_TEST", ""))
        return value

    models.bf16_switch = counted


def pytest_runtest_setup(item):
    DTYPE_QUERIES.clear()  # before the test's fixtures, module ones included, are set up
    PINNED.clear()


@pytest.fixture
def bf16_env(monkeypatch):
    """Set ``$SAEFEATURES_BF16`` for this test: ``bf16_env("1")``, ``bf16_env(None)`` to unset it."""
    from saefeatures.models import BF16_ENV

    def pin(value: str | None) -> None:
        PINNED.append(value)
        if value is None:
            monkeypatch.delenv(BF16_ENV, raising=False)
        else:
            monkeypatch.setenv(BF16_ENV, value)

    return pin


@pytest.fixture(scope="session")
def model():
    """SmolLM2-135M-Instruct as a HookedTransformer (float32), with its HF twin kept."""
    from saefeatures.models import load_model

    loaded = load_model("smollm2-135m-instruct")
    BASELINE.update(model_state(loaded))
    return loaded


@pytest.fixture(scope="session")
def tokenizer(model):
    return model.tokenizer


def dtype_tolerance(dtype: str | torch.dtype, abs_float32: float, rel_float32: float = 0.0) -> dict[str, float]:
    """`pytest.approx` tolerances for a value computed in ``dtype``, compared with the same
    computation in other batch shapes: float32 as given; bfloat16 (8 significant bits, rounded at
    every matmul of a forward pass, so a different batch shape changes the rounding) within 3% of
    the value, and 0.1 near zero."""
    if str(dtype).removeprefix("torch.") == "bfloat16":
        return {"rel": 3e-2, "abs": max(abs_float32, 0.1)}
    return {"rel": rel_float32, "abs": abs_float32}


def make_random_sae(d_in: int = 576, d_sae: int = 64, hook: str = "blocks.6.hook_resid_post", seed: int = 0,
                    k: int | None = None):
    """A small SAELens SAE with random weights (mechanics tests; no training): ReLU with random
    encoder and decoder (and encoder bias -0.5, so latents are sparse), or, with ``k``, TopK with unit
    random decoder rows and the transposed encoder (each latent reads what it writes)."""
    from sae_lens import SAE
    from sae_lens.loading.pretrained_sae_loaders import handle_config_defaulting

    arch = {"architecture": "standard"} if k is None else {"architecture": "topk", "k": k}
    sae = SAE.from_dict(handle_config_defaulting({
        **arch, "d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": "cpu",
        "hook_name": hook, "hook_head_index": None, "prepend_bos": False, "context_size": 256,
        "apply_b_dec_to_input": False, "normalize_activations": "none"}))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if k is None:
            sae.W_enc.copy_(torch.randn(d_in, d_sae, generator=g) / d_in**0.5)
            sae.b_enc.fill_(-0.5)
            sae.W_dec.copy_(torch.randn(d_sae, d_in, generator=g) / d_in**0.5)
        else:
            d = torch.nn.functional.normalize(torch.randn(d_sae, d_in, generator=g), dim=1)
            sae.W_dec.copy_(d)
            sae.W_enc.copy_(d.T)
            sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae.eval()


STANDIN_TEXTS = ["She checked the lock three times and still could not sleep.",
                 "The train leaves from platform four at ten past nine.",
                 "He laughed with his friends at the fair all afternoon.",
                 "The letter said the dog had died in the night.",
                 "Water boils at one hundred degrees at sea level.",
                 "They cheered when the results came in, hugging each other."]
"""What the stand-in tokenizer is trained on (and what tests feed the stand-in model)."""
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def standin_tokenizer():
    """A byte-level BPE tokenizer trained here on `STANDIN_TEXTS`, with the ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(STANDIN_TEXTS * 4, trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token="<|im_start|>")
    fast.chat_template = CHATML
    return fast


def standin_checkpoint(path, arch: str = "llama", tokenizer=None):
    """Save a tiny random HF checkpoint (3 layers, d_model 64) of ``arch`` ('llama', 'gemma2' or 'gpt2')
    with ``tokenizer`` (default: `standin_tokenizer`) to ``path``, as `load_model` reads local ones."""
    from transformers import AutoModelForCausalLM, Gemma2Config, GPT2Config, LlamaConfig

    tok = tokenizer if tokenizer is not None else standin_tokenizer()
    vocab = len(tok)
    cfg = {
        "llama": lambda: LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                     tie_word_embeddings=True, rope_theta=10000.0, eos_token_id=tok.eos_token_id,
                                     pad_token_id=tok.pad_token_id),
        "gemma2": lambda: Gemma2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                       max_position_embeddings=256, sliding_window=16, query_pre_attn_scalar=16),
        "gpt2": lambda: GPT2Config(vocab_size=vocab, n_embd=64, n_layer=3, n_head=4, n_positions=256),
    }[arch]()
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A stand-in Llama (random weights, 3 layers, d_model 64, the stand-in tokenizer) as a
    HookedTransformer with its HF twin: for numerics that need a model but not the real one."""
    from saefeatures.models import load_model

    return load_model(str(standin_checkpoint(tmp_path_factory.mktemp("standin"))))


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


def model_state(model) -> dict[str, object]:
    """What a test must leave as it found on the shared model, its HF twin and its tokenizer, and in
    torch's global numerics: parameter and buffer dtypes, storage and in-place version, configs,
    attributes (caches the library might hang on them), train/eval mode, and autocast, grad and
    default-dtype state. Cheap: no tensor is read."""
    from saefeatures.models import HF_TWIN_ATTR

    def tensors(module) -> dict[str, tuple]:
        return {name: (t.dtype, str(t.device), t.data_ptr(), t._version)
                for name, t in [*module.named_parameters(), *module.named_buffers()]}

    def attrs(obj) -> dict[str, int]:
        return {k: id(v) for k, v in vars(obj).items()
                if k != "training" and (not k.startswith("_") or k.startswith("_saefeatures"))}

    tok = model.tokenizer
    state: dict[str, object] = {
        "model.tensors": tensors(model), "model.cfg": repr(model.cfg.to_dict()), "model.attrs": attrs(model),
        "model.training": [m.training for m in model.modules()],
        "tokenizer": {a: repr(getattr(tok, a, None)) for a in (
            "padding_side", "truncation_side", "pad_token", "bos_token", "eos_token", "add_bos_token",
            "chat_template", "model_max_length")} | {"len": len(tok)},
        "torch": {"default_dtype": torch.get_default_dtype(), "grad": torch.is_grad_enabled(),
                  "inference_mode": torch.is_inference_mode_enabled(),
                  "autocast_cpu": (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")),
                  "matmul_precision": torch.get_float32_matmul_precision(),
                  "deterministic": torch.are_deterministic_algorithms_enabled(),
                  "threads": torch.get_num_threads()},
    }
    hf = getattr(model, HF_TWIN_ATTR, None)
    if hf is not None:
        state |= {"hf.tensors": tensors(hf), "hf.config": hf.config.to_json_string(use_diff=False),
                  "hf.generation_config": repr(hf.generation_config), "hf.attrs": attrs(hf),
                  "hf.training": [m.training for m in hf.modules()]}
    return state


def state_changes(before: dict, after: dict) -> list[str]:
    """Keys of `model_state` that differ, with the first differing entry of each."""
    out = []
    for key in before.keys() | after.keys():
        a, b = before.get(key), after.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            diff = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
            out.append(f"{key}: {diff[0]} {a.get(diff[0])} -> {b.get(diff[0])}" + (
                f" (+{len(diff) - 1} more)" if len(diff) > 1 else ""))
        else:
            out.append(key)
    return sorted(out)


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


@pytest.fixture(autouse=True)
def no_state_leaks(request):
    """Fail the test that leaves the shared model (or torch's global numerics) other than it was
    loaded: a changed dtype, weight, attribute, cache or mode would change every later test
    (issue 13: tests passed alone and failed after others). Compared with the state at load, so
    a module fixture that changed it is caught at the first test using it; the state is restored.
    `LIBRARY_CACHES` are emptied instead."""
    yield
    if "model" not in request.fixturenames:
        return
    model = request.getfixturevalue("model")
    for cache in LIBRARY_CACHES:  # emptied, not failed: filling them is their job
        vars(model).pop(cache, None)
    changed = state_changes(BASELINE, model_state(model))
    if changed:
        restore_model(model)
        BASELINE.update(model_state(model))  # what the restore could not make identical (storage)
        pytest.fail(f"the shared model's state changed: {changed[:4]}")


def restore_model(model) -> None:
    """Put the shared model back as loaded: weights, dtypes, modes, attributes and tokenizer
    from a fresh load, torch's globals as conftest set them."""
    from saefeatures.models import HF_TWIN_ATTR, load_model

    fresh = load_model("smollm2-135m-instruct")
    for mine, theirs in ((model, fresh), (getattr(model, HF_TWIN_ATTR, None), getattr(fresh, HF_TWIN_ATTR))):
        if mine is None:
            continue
        for k in [k for k in vars(mine) if k.startswith("_saefeatures") and k not in vars(theirs)]:
            delattr(mine, k)
        mine.to(next(theirs.parameters()).dtype).load_state_dict(theirs.state_dict())
        mine.eval()
    vars(model.cfg).update(vars(fresh.cfg))  # in place: tests and fixtures hold these objects
    for attr in ("padding_side", "truncation_side", "pad_token", "chat_template"):
        setattr(model.tokenizer, attr, getattr(fresh.tokenizer, attr))
    torch.set_default_dtype(torch.float32)
    torch.set_grad_enabled(True)
    torch.set_num_threads(THREADS)


@pytest.fixture(autouse=True)
def dtype_tests_are_marked(request):
    """Fail a test that (through its fixtures too) let the hardware choose the compute dtype but is
    not marked ``dtype``: `make test` reruns only marked tests with the bf16 path forced, so an
    unmarked one would never be tested on the other path."""
    yield
    if DTYPE_QUERIES and request.node.get_closest_marker("dtype") is None:
        pytest.fail(f"this test depends on the dtype 'auto' resolves to (bf16_is_fast was asked in "
                    f"{DTYPE_QUERIES[0]!r}): mark it @pytest.mark.dtype so that make test also runs it "
                    "with SAEFEATURES_BF16 flipped")


SMALL_RUN_EMOTIONS = ("happy", "sad", "afraid", "calm", "angry", "grateful", "bored", "proud", "desperate", "excited")
BENCH_STORIES = Path(__file__).resolve().parents[2] / "shared" / "data" / "emotion-vector-bench" / "stories"


@pytest.fixture(scope="session")
def small_run(model, tmp_path_factory):
    """The whole study on ten emotions of the shipped corpus with the shipped SAE: (cfg, out, run).
    Shared by every test that needs a finished run; tests that use it are marked `dtype`."""
    from saefeatures.corpus import load_corpus
    from saefeatures.study.config import RunConfig, from_dict
    from saefeatures.study.pipeline import run_study

    root = tmp_path_factory.mktemp("run")
    records = load_corpus()
    small = [r for r in records if r.emotion in SMALL_RUN_EMOTIONS]
    small += [r for r in records if r.emotion == "neutral"][::8]
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(r.to_json() + "\n" for r in small))
    cfg = from_dict(RunConfig, {
        "corpus": {"path": str(corpus)},
        "activations": {"layers": [12]},  # a two-layer sweep
        "scoring": {"warmup_records": 32},
        "evals": {"emobank_limit": 150, "reader_path": str(BENCH_STORIES), "reader_per_emotion": 3},
        "sae": {"eval": {"max_tokens": 2048, "ce_tokens": 512}},
        "sae_directions": {"recipe": {"ks": [1, 4]}, "main_k": 4, "output_candidates": 4,
                           "cards_per_emotion": 1, "card_snippets": 2},
        "monitor": {"calibration_texts": 8},
        "steering": {"emotions": ["happy", "afraid"], "strengths": [0.0, 0.1, 0.2], "samples_per_prompt": 2,
                     "max_new_tokens": 16, "preference": False,
                     "prompts": ["Tell me about your day.", "Describe your street."]},
        "tracking": {"mode": "offline"},
    })
    out = root / "out"
    run = run_study(cfg, out, model=model)
    return cfg, out, run


@dataclass(frozen=True)
class StandinRecord:
    id: str
    emotion: str
    text: str


STANDIN_RECORDS = [StandinRecord(f"r{i}", emotion, text) for i, (emotion, text) in
                   enumerate(zip(["afraid", "calm", "happy", "sad", "neutral", "happy"], STANDIN_TEXTS))]
"""The stand-in texts as corpus records (id, emotion, text), for scoring on the stand-in model."""


def broken_references(page: str, root: Path) -> list[str]:
    """Every <img src> and href of ``page`` that is neither a data URI, nor a file under ``root``,
    nor an anchor (#id) of the page."""
    ids = set(re.findall(r"\bid=['\"]([^'\"]+)['\"]", page))
    broken = []
    for ref in re.findall(r"<img[^>]*\bsrc=['\"]([^'\"]+)['\"]", page) + re.findall(r"\bhref=['\"]([^'\"]+)['\"]", page):
        if ref.startswith("data:"):
            continue
        if ref.startswith("#"):
            ok = ref[1:] in ids
        else:
            ok = "://" not in ref and (root / ref).is_file()
        if not ok:
            broken.append(ref)
    return broken
