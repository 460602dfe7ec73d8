"""SAEs at the studied layer: load (shipped, local or pretrained), check, splice, evaluate.

SAELens does the work; this module wires it to the toolkit's model, layer and corpus:
  * `load_sae` reads a SAELens directory (the shipped default of the embedded model, or one
    `saefeatures sae train` wrote) or a pretrained release/id (Gemma Scope, Llama Scope,
    ``gpt2-small-res-jb``; needs the hub once), and `check_sae` refuses an SAE whose hook or
    input width does not match the model and layer.
  * `spliced` runs the model with the SAE in the residual stream (error term kept by default,
    so an unclamped pass is unchanged).
  * `evaluate_sae` runs SAELens' evals on held-out text: explained variance, L0, dead and dense
    latents, and the cross-entropy loss recovered with the SAE spliced in.
Training lives in `saefeatures.sae_training`.

Special-token positions (the chat template's ``<|im_start|>``/``<|im_end|>``, the
``<|endoftext|>`` separators and the first position of every context, whose residual norm is
~100x the others) are never trained on nor evaluated.

Example:
    >>> from saefeatures.models import load_model
    >>> from saefeatures.saes import load_sae, spliced
    >>> model = load_model("smollm2-135m-instruct")
    >>> sae = load_sae(None, model, layer=20)          # the shipped default
    >>> with spliced(model, sae):
    ...     logits = model("I can't stop smiling today.")
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .emotions import DATA
from .errors import UserError
from .files import read_json, write_json

if TYPE_CHECKING:
    from sae_lens import SAE
    from transformer_lens import HookedTransformer

log = logging.getLogger(__name__)

SHIPPED_DIR = DATA / "sae"
SHIPPED_SAES = {("smollm2-135m-instruct", 20): SHIPPED_DIR / "smollm2-135m-instruct-L20"}
"""Shipped SAEs by (model name, layer)."""
ARCHITECTURES = ("topk", "batchtopk", "standard", "jumprelu", "gated")
SOURCES = ("local", "pretrained", "train")
CFG_FILE, WEIGHTS_FILE = "cfg.json", "sae_weights.safetensors"  # SAELens' file names
_RESID = re.compile(r"^blocks\.(\d+)\.hook_resid_(pre|mid|post)$")


class SAELoadError(UserError):
    """An SAE could not be loaded; the message says what to do."""


class SAEMismatchError(SAELoadError):
    """An SAE does not fit the model or layer (hook or input width)."""


# ---------------------------------------------------------------- configs


@dataclass
class SAETrainConfig:
    """How `saefeatures sae train` trains an SAE with SAELens' LanguageModelSAETrainingRunner."""

    architecture: str = "topk"
    """SAELens training architecture: 'topk', 'batchtopk', 'standard', 'jumprelu' or 'gated'."""
    width: int = 4608
    """Number of latents (d_sae); 4608 is 8x the embedded model's d_model."""
    k: float = 32
    """Active latents per token (topk); average per token over a batch (batchtopk)."""
    sparsity_coefficient: float = 5.0
    """L1 (standard, gated) or L0 (jumprelu) penalty; unused by topk and batchtopk."""
    aux_loss_coefficient: float = 1 / 32
    """Weight of the AuxK loss that revives dead latents (topk, batchtopk)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Extra fields of the SAELens training-SAE config (e.g. jumprelu_bandwidth, target_l0)."""
    normalize_activations: str = "expected_average_only_in"
    """SAELens input scaling (to norm sqrt(d_in)), folded into the weights after training."""
    training_tokens: int = 2_500_000
    """Token positions trained on (special tokens excluded); more than the corpus means epochs."""
    context_size: int = 256
    """Tokens per packed training context (the first is a special token, never trained on)."""
    skip_positions: int = 2
    """Leading positions of each context never trained on (SAELens seqpos_slice): the start token,
    and the next, which is a second attention sink (norm ~100x) when a context starts mid-text."""
    train_batch_size_tokens: int = 1024
    """SAE batch size in token positions."""
    store_batch_size_prompts: int = 16
    """Contexts per model forward pass when generating activations."""
    n_batches_in_buffer: int = 64
    """Mixing buffer size in units of context_size tokens (must be >= the SAE batch)."""
    lr: float = 8e-4
    """Adam learning rate."""
    lr_warm_up_steps: int = 100
    """Linear warm-up steps."""
    lr_decay_fraction: float = 0.2
    """Fraction of steps, at the end, over which the learning rate decays linearly to 0."""
    dead_feature_window: int = 100
    """Steps without firing after which a latent counts as dead (and joins the AuxK loss)."""
    n_batches_for_norm_estimate: int = 20
    """SAE batches used to estimate the input scaling factor."""
    llm_autocast: bool | str = "auto"
    """Run the model in bfloat16 autocast while generating activations: true, false, or 'auto'
    (where the hardware has bf16 units: faster there, much slower on CPUs without them)."""
    kinds: list[str] = field(default_factory=lambda: ["story", "dialogue", "neutral", "general"])
    """Corpus kinds in the training mix ('general' is model-written text on diverse prompts)."""
    splits: list[str] = field(default_factory=lambda: ["train", "val"])
    """Corpus splits trained on; the 'test' split stays held out for `sae eval`."""
    chat_fraction: float = 0.5
    """Fraction of texts wrapped in the chat template (prompt as user, text as assistant)."""
    n_checkpoints: int = 4
    """Checkpoints written during training (a rerun resumes from the latest)."""
    wandb_log_frequency: int = 20
    """Steps between wandb logs."""
    eval_every_n_wandb_logs: int = 50
    """wandb logs between SAELens' in-training evals (CE loss; costly on CPU)."""
    seed: int = 0
    """Seed of the text mix, packing and SAE initialisation."""
    out: str | None = None
    """Output directory; None: runs/sae/<model>-L<layer>."""


@dataclass
class SAEEvalConfig:
    """How `evaluate_sae` measures an SAE on held-out text."""

    split: str = "test"
    """Corpus split evaluated on (never trained on by default)."""
    max_tokens: int = 65536
    """Token positions for explained variance, L0 and dead/dense latents."""
    ce_tokens: int = 16384
    """Token positions for the cross-entropy loss recovered (3-4 forward passes each)."""
    batch_size: int = 8
    """Contexts per forward pass."""
    dense_threshold: float = 0.1
    """A latent firing on more than this fraction of tokens counts as dense."""


@dataclass
class SAEConfig:
    """Which SAE reads the studied layer: a local directory, a pretrained release, or trained here."""

    source: str = "local"
    """'local' (a SAELens directory), 'pretrained' (release/sae_id, hub) or 'train'."""
    path: str | None = None
    """Local SAELens directory; None: the SAE shipped for the model and layer."""
    release: str | None = None
    """SAELens pretrained release, e.g. 'gemma-scope-2b-pt-res-canonical'."""
    sae_id: str | None = None
    """SAE id inside the release, e.g. 'layer_12/width_16k/canonical'."""
    hook: str | None = None
    """TransformerLens hook the SAE reads; None: blocks.<layer>.hook_resid_post."""
    device: str | None = None
    """Device of the SAE; None: the model's device."""
    dtype: str = "float32"
    """dtype the SAE computes in."""
    train: SAETrainConfig = field(default_factory=SAETrainConfig)
    eval: SAEEvalConfig = field(default_factory=SAEEvalConfig)


# ---------------------------------------------------------------- hooks and checks


def resid_hook(layer: int) -> str:
    """The hook of the studied residual stream at `layer`."""
    return f"blocks.{layer}.hook_resid_post"


def _resid_position(hook: str) -> float | None:
    """Position in the residual stream, equal for blocks.L.hook_resid_post and blocks.L+1.hook_resid_pre."""
    m = _RESID.match(hook)
    if not m:
        return None
    layer, where = int(m.group(1)), m.group(2)
    return layer + {"pre": 0.0, "mid": 0.5, "post": 1.0}[where]


def same_activation(hook_a: str, hook_b: str) -> bool:
    """True when two hooks read the same activation (resid_post of L is resid_pre of L+1)."""
    if hook_a == hook_b:
        return True
    a, b = _resid_position(hook_a), _resid_position(hook_b)
    return a is not None and a == b


def _model_dims(model: Any) -> tuple[int, int, str]:
    cfg = getattr(model, "cfg", model)
    return cfg.d_model, cfg.n_layers, getattr(cfg, "model_name", "the model")


def check_sae(sae: SAE, model: Any, layer: int | None = None, hook: str | None = None) -> None:
    """Raise `SAEMismatchError` unless the SAE reads the residual stream of `model` at `layer`.

    `model` is a HookedTransformer or its config (anything with d_model and n_layers).

    Example:
        >>> check_sae(sae, model, layer=20)   # blocks.20.hook_resid_post, d_in == d_model
    """
    d_model, n_layers, name = _model_dims(model)
    sae_hook = sae.cfg.metadata.hook_name
    if sae_hook is None:
        raise SAEMismatchError(
            "The SAE's config names no hook (metadata.hook_name). Add it to its cfg.json, e.g. "
            '"metadata": {"hook_name": "blocks.20.hook_resid_post"}.'
        )
    pos = _resid_position(sae_hook)
    if pos is None:
        raise SAEMismatchError(
            f"The SAE reads '{sae_hook}', not the residual stream; saefeatures studies "
            "blocks.L.hook_resid_post. Load a residual-stream SAE."
        )
    if pos > n_layers or (pos == n_layers and not sae_hook.endswith("post")):
        raise SAEMismatchError(
            f"The SAE reads '{sae_hook}', but {name} has {n_layers} layers (0..{n_layers - 1}). "
            "Load an SAE trained on this model."
        )
    if sae.cfg.d_in != d_model:
        raise SAEMismatchError(
            f"Width mismatch: the SAE's input width d_in is {sae.cfg.d_in}, but {name} has d_model "
            f"{d_model}. The SAE was trained on another model; load one trained on {name}."
        )
    expected = hook or (resid_hook(layer) if layer is not None else None)
    if expected is not None and not same_activation(sae_hook, expected):
        raise SAEMismatchError(
            f"Hook mismatch: the SAE reads '{sae_hook}', but the config studies '{expected}'. "
            f"Set model.layer (or sae.hook) to the SAE's layer, or load an SAE trained at '{expected}'."
        )


# ---------------------------------------------------------------- loading


def shipped_sae_dir(model_name: str, layer: int) -> Path:
    """The SAE shipped with the package for (model, layer), or a clear error."""
    path = SHIPPED_SAES.get((model_name, layer))
    if path is None:
        known = ", ".join(f"{m} layer {layer_}" for m, layer_ in SHIPPED_SAES)
        raise SAELoadError(
            f"No SAE is shipped for {model_name} layer {layer} (shipped: {known}). Set sae.source "
            "to 'train' (saefeatures sae train) or 'pretrained' (release and sae_id), or sae.path."
        )
    return path


def check_sae_files(path: str | Path, hook: str | None = None, d_model: int | None = None) -> dict[str, Any]:
    """Check a SAELens directory from its cfg.json and the weights' safetensors header, without
    loading the weights: both files readable and whole, shapes equal to cfg.json's d_in and d_sae,
    and (when given) the hook read and the model width. Returns the parsed cfg.json.

    Example:
        >>> check_sae_files("runs/sae/smollm2-135m-instruct-L20/sae", hook="blocks.20.hook_resid_post", d_model=576)
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_dir():
        raise SAELoadError(
            f"No SAE directory at {path}. Train one with `saefeatures sae train --config CONFIG`, "
            "point sae.path at a directory saved by SAELens (cfg.json + sae_weights.safetensors), "
            "or use sae.source: pretrained with a release and sae_id."
        )
    missing = [f for f in (CFG_FILE, WEIGHTS_FILE) if not (path / f).is_file()]
    if missing:
        raise SAELoadError(
            f"{path} is not a SAELens SAE directory: {' and '.join(missing)} missing. Save an SAE "
            "with sae.save_model(dir) (SAELens), or rerun `saefeatures sae train` to finish the run."
        )
    try:
        cfg = json.loads((path / CFG_FILE).read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise SAELoadError(f"{path / CFG_FILE}: not valid JSON ({e}). Restore the SAE's cfg.json "
                           "(SAELens writes it with sae.save_model).") from None
    dims = {k: cfg.get(k) if isinstance(cfg, dict) else None for k in ("d_in", "d_sae")}
    bad = [k for k, v in dims.items() if not isinstance(v, int) or isinstance(v, bool) or v <= 0]
    if bad:
        raise SAELoadError(f"{path / CFG_FILE}: {' and '.join(bad)} missing or not a positive integer; "
                           "this is not a SAELens 6 config. Restore it (SAELens writes it with sae.save_model).")
    try:
        with safe_open(str(path / WEIGHTS_FILE), "pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise SAELoadError(f"{path / WEIGHTS_FILE}: unreadable or truncated safetensors file ({e}). "
                           "Copy or save the SAE again.") from None
    d_in, d_sae = dims["d_in"], dims["d_sae"]
    expected = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in)}
    for name, shape in expected.items():
        if name not in shapes:
            raise SAELoadError(f"{path / WEIGHTS_FILE} has no '{name}' tensor (has {sorted(shapes)}); "
                               "it is not a SAELens SAE. Save the SAE again with sae.save_model(dir).")
        if shapes[name] != shape:
            raise SAELoadError(
                f"{path}: {WEIGHTS_FILE} holds {name} of shape {list(shapes[name])}, but {CFG_FILE} says "
                f"d_in {d_in}, d_sae {d_sae} (expects {list(shape)}). Fix d_in/d_sae in {CFG_FILE} to "
                "match the weights, or restore the matching weights.")
    sae_hook = (cfg.get("metadata") or {}).get("hook_name") or cfg.get("hook_name")
    if not sae_hook:
        raise SAELoadError(f"{path / CFG_FILE} names no hook (metadata.hook_name). Add it, e.g. "
                           '"metadata": {"hook_name": "blocks.20.hook_resid_post"}.')
    if hook is not None and not same_activation(sae_hook, hook):
        raise SAEMismatchError(
            f"Hook mismatch: the SAE in {path} reads '{sae_hook}', but the config studies '{hook}'. "
            f"Set model.layer (or sae.hook) to the SAE's layer, or load an SAE trained at '{hook}'.")
    if d_model is not None and d_in != d_model:
        raise SAEMismatchError(
            f"Width mismatch: the SAE in {path} has input width d_in {d_in}, but the model has d_model "
            f"{d_model}. Load an SAE trained on this model.")
    return cfg


def _read_local(path: Path, device: str, dtype: str | None) -> SAE:
    from sae_lens import SAE

    if not path.exists():
        raise FileNotFoundError(
            f"No SAE directory at {path}. Train one with `saefeatures sae train --config CONFIG`, "
            "point sae.path at a directory saved by SAELens (cfg.json + sae_weights.safetensors), "
            "or use sae.source: pretrained with a release and sae_id."
        )
    check_sae_files(path)
    try:
        return SAE.load_from_disk(path, device=device, dtype=dtype)
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise SAELoadError(f"Could not read the SAE in {path} ({type(e).__name__}: {e}); "
                           "its cfg.json is not a SAELens 6 config.") from None
    except RuntimeError as e:  # a state_dict that does not fit the config (check_sae_files covers W_enc/W_dec)
        detail = str(e).splitlines()[-1].strip()
        raise SAELoadError(f"The weights in {path / WEIGHTS_FILE} do not fit its {CFG_FILE} ({detail}). "
                           "Restore the matching cfg.json and weights.") from None


def _read_pretrained(release: str, sae_id: str, device: str, dtype: str) -> SAE:
    from sae_lens import SAE

    try:
        return SAE.from_pretrained(release, sae_id, device=device, dtype=dtype)
    except ValueError as e:
        raise SAELoadError(f"SAELens pretrained SAE {release}/{sae_id}: {e}") from None
    except Exception as e:  # offline mode, not cached, no connection, gated repo
        hub = type(e).__module__.split(".")[0] in ("huggingface_hub", "httpx", "requests", "urllib3")
        if not (hub or isinstance(e, OSError)):
            raise
        raise SAELoadError(
            f"Could not fetch the pretrained SAE {release}/{sae_id} from the Hugging Face hub "
            f"({type(e).__name__}). It is downloaded once and cached: run once with network access "
            "and HF_HUB_OFFLINE unset, or save it with sae.save_model(dir) and set sae.path."
        ) from None


def load_sae(
    spec: SAEConfig | str | Path | tuple[str, str] | None,
    model: Any = None,
    layer: int | None = None,
    device: str | None = None,
) -> SAE:
    """Load an SAE and, when a model (or its config) is given, check it against the model and layer.

    Args:
        spec: an `SAEConfig`; a local SAELens directory; a (release, sae_id) pair of the SAELens
            pretrained directory; or None for the SAE shipped for the model and layer.
        model: HookedTransformer or HookedTransformerConfig to check the SAE against.
        layer: studied layer (its residual stream, blocks.L.hook_resid_post).
        device: SAE device; default the config's, else the model's, else cpu.

    Example:
        >>> sae = load_sae("runs/sae/smollm2-135m-instruct-L20/sae", model, layer=20)
        >>> sae = load_sae(("gemma-scope-2b-pt-res-canonical", "layer_12/width_16k/canonical"))
    """
    cfg = spec if isinstance(spec, SAEConfig) else SAEConfig()
    model_cfg = getattr(model, "cfg", model)
    device = device or cfg.device or (str(model_cfg.device) if model_cfg is not None and
                                      getattr(model_cfg, "device", None) else "cpu")
    if isinstance(spec, tuple):
        cfg = SAEConfig(source="pretrained", release=spec[0], sae_id=spec[1], dtype=cfg.dtype)
    elif isinstance(spec, (str, Path)):
        cfg = SAEConfig(source="local", path=str(spec))
    if cfg.source not in SOURCES:
        raise SAELoadError(f"sae.source must be one of {', '.join(SOURCES)}, got '{cfg.source}'.")
    if cfg.source == "pretrained":
        if not (cfg.release and cfg.sae_id):
            raise SAELoadError("sae.source is 'pretrained' but sae.release or sae.sae_id is missing; "
                               "set both (see SAELens' pretrained_saes.yaml).")
        sae = _read_pretrained(cfg.release, cfg.sae_id, device, cfg.dtype)
    else:
        if cfg.path is not None:
            path = Path(cfg.path)
        elif cfg.source == "train":
            raise SAELoadError("sae.source is 'train': train it first (saefeatures sae train), "
                               "or use `prepare_sae`, which trains or resumes, then loads.")
        else:
            if model_cfg is None or layer is None:
                raise SAELoadError("No SAE path given: pass the model and layer to find the shipped SAE.")
            path = shipped_sae_dir(getattr(model_cfg, "model_name", ""), layer)
        sae = _read_local(path, device, cfg.dtype)
    if model_cfg is not None:
        check_sae(sae, model_cfg, layer=layer, hook=cfg.hook)
        _warn_processing(sae)
    sae.eval()
    return sae


def _warn_processing(sae: SAE) -> None:
    kwargs = sae.cfg.metadata.model_from_pretrained_kwargs or {}
    processed = {k: v for k, v in kwargs.items() if k in
                 ("center_writing_weights", "fold_ln", "center_unembed", "fold_value_biases") and v}
    if processed:
        log.warning(
            "This SAE was trained on a model loaded with %s; saefeatures loads models without weight "
            "processing, so the SAE's inputs differ (center_writing_weights: by each token's mean over "
            "d_model). Reading latents still works, but check reconstruction with `saefeatures sae eval`.",
            processed)


def sae_info(path: str | Path) -> dict[str, Any]:
    """What a SAELens directory holds (config, and evals/training records if present), without loading weights."""
    path = Path(path)
    if not (path / CFG_FILE).is_file():
        raise FileNotFoundError(f"No SAE config at {path / CFG_FILE}. Give a SAELens SAE directory.")
    try:
        cfg = json.loads((path / CFG_FILE).read_text(encoding="utf-8"))
        meta = cfg.get("metadata", {})
    except (ValueError, AttributeError) as e:
        raise SAELoadError(f"{path / CFG_FILE}: not a SAELens JSON config ({e}). Restore it "
                           "(SAELens writes it with sae.save_model).") from None
    info: dict[str, Any] = {
        "path": str(path), "architecture": cfg.get("architecture"), "d_in": cfg.get("d_in"),
        "d_sae": cfg.get("d_sae"), "k": cfg.get("k"), "dtype": cfg.get("dtype"),
        "hook_name": meta.get("hook_name"), "model_name": meta.get("model_name"),
        "context_size": meta.get("context_size"),
        "weights_bytes": (path / WEIGHTS_FILE).stat().st_size if (path / WEIGHTS_FILE).is_file() else None,
    }
    for name in ("evals.json", "train_info.json"):
        if (path / name).is_file():
            info[name.removesuffix(".json")] = json.loads((path / name).read_text())
    return info


# ---------------------------------------------------------------- splicing


@contextlib.contextmanager
def spliced(model: HookedTransformer, sae: SAE, use_error_term: bool = True) -> Iterator[SAE]:
    """Run `model` with `sae` replacing the activation at its hook, inside the `with` only.

    With the error term (default) the hook's output equals its input, so logits are unchanged
    until a hook on the SAE (e.g. ``sae.hook_sae_acts_post``) edits latents; without it the model
    runs on the reconstruction.

    Example:
        >>> with spliced(model, sae, use_error_term=False):
        ...     loss = model(tokens, return_type="loss")
    """
    hook_name = sae.cfg.metadata.hook_name
    previous = sae.use_error_term

    def hook(acts: torch.Tensor, hook: Any) -> torch.Tensor:  # noqa: ARG001
        return sae(acts.to(sae.device)).to(acts.device, acts.dtype)

    sae.use_error_term = use_error_term
    try:
        with model.hooks(fwd_hooks=[(hook_name, hook)]):
            yield sae
    finally:
        sae.use_error_term = previous


# ---------------------------------------------------------------- evaluation


def special_token_ids(tokenizer: Any) -> list[int]:
    """Every special token id of the tokenizer (never trained on, never evaluated)."""
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(tokenizer, attr, None) is not None:
            ids.add(getattr(tokenizer, attr))
    return sorted(ids)


def pack_texts(tokenizer: Any, texts: Sequence[str], context_size: int,
               whole_texts: bool = False) -> list[list[int]]:
    """Pack texts into contexts of `context_size` tokens.

    Every context starts with the tokenizer's BOS (or first special) token and texts are
    separated by its end-of-text token; both are special, so they are left out of training and
    evals. By default (SAELens' packing) a text continues into the next context; the last partial
    context is dropped. With `whole_texts`, every context starts at the start of a text and the
    tail of a text that does not fit is dropped: no context starts mid-text, where the token after
    the start token becomes a second attention sink (used for evals).
    """
    from sae_lens.tokenization_and_batching import concat_and_batch_sequences

    specials = special_token_ids(tokenizer)
    if not specials:
        raise ValueError("The tokenizer has no special tokens to start contexts and separate texts with.")
    begin = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else specials[0]
    sep = tokenizer.convert_tokens_to_ids("<|endoftext|>") if "<|endoftext|>" in tokenizer.get_vocab() \
        else (tokenizer.eos_token_id if tokenizer.eos_token_id is not None else begin)
    encoded = [ids for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"] if ids]
    if not whole_texts:
        batches = concat_and_batch_sequences(
            tokens_iterator=(torch.tensor(ids, dtype=torch.long) for ids in encoded),
            context_size=context_size, begin_batch_token_id=begin, begin_sequence_token_id=None,
            sequence_separator_token_id=sep)
        return [b.tolist() for b in batches]
    contexts, current = [], []
    for ids in encoded:
        current += ([begin] if ids[0] != begin else []) if not current else [sep]
        current += ids
        if len(current) >= context_size:
            contexts.append(current[:context_size])
            current = []
    return contexts


@dataclass
class SAEEvals:
    """SAE quality on held-out text (SAELens evals); `metrics()` gives the metrics.json keys."""

    explained_variance: float
    l0: float
    dead_fraction: float
    """Latents that never fired on the evaluated tokens."""
    dense_fraction: float
    """Latents firing on more than `dense_threshold` of the tokens."""
    ce_loss_recovered: float
    """(CE zero-ablated - CE with SAE) / (CE zero-ablated - CE clean), SAE without error term."""
    ce_loss_recovered_with_error_term: float
    """The same with the error term kept (1.0 when the splice is exact)."""
    ce_loss_clean: float
    ce_loss_with_sae: float
    ce_loss_with_error_term: float
    ce_loss_zero_ablation: float
    kl_div_with_sae: float
    cossim: float
    n_tokens: int
    n_ce_tokens: int
    dense_threshold: float = 0.1
    extra: dict[str, Any] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        """The keys this stage fills in a run's metrics.json (dotted paths)."""
        return {f"sae.{k}": float(getattr(self, k)) for k in
                ("explained_variance", "l0", "dead_fraction", "ce_loss_recovered")}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> SAEEvals:
        return cls(**read_json(path))


def _token_store(model: HookedTransformer, sae: SAE, contexts: list[list[int]], batch: int,
                 exclude: list[int]) -> Any:
    from datasets import Dataset
    from sae_lens.training.activations_store import ActivationsStore

    return ActivationsStore(
        model=model, dataset=Dataset.from_dict({"tokens": contexts}), streaming=False,
        hook_name=sae.cfg.metadata.hook_name, hook_head_index=None, context_size=len(contexts[0]),
        d_in=sae.cfg.d_in, n_batches_in_buffer=1, total_training_tokens=len(contexts),
        store_batch_size_prompts=batch, train_batch_size_tokens=batch, prepend_bos=False,
        normalize_activations="none", device=torch.device(str(sae.device)), dtype=sae.cfg.dtype,
        exclude_special_tokens=torch.tensor(exclude, dtype=torch.long))


@torch.no_grad()
def evaluate_sae(
    sae: SAE,
    model: HookedTransformer,
    texts: Sequence[str],
    context_size: int = 256,
    config: SAEEvalConfig | None = None,
) -> SAEEvals:
    """SAELens evals of `sae` spliced into `model` on `texts` (held-out, never trained on).

    Texts are packed into contexts that each start at a text's start (see `pack_texts`);
    special-token positions are excluded from every metric and left unreplaced when the SAE is
    spliced in.

    Example:
        >>> evals = evaluate_sae(sae, model, [r.text for r in load_corpus() if r.split == "test"])
        >>> evals.explained_variance, evals.l0, evals.ce_loss_recovered
    """
    from sae_lens.evals import EvalConfig, run_evals
    from sae_lens.training.activation_scaler import ActivationScaler

    cfg = config or SAEEvalConfig()
    contexts = pack_texts(model.tokenizer, texts, context_size, whole_texts=True)
    batch = cfg.batch_size
    n_batches = min(len(contexts), max(1, cfg.max_tokens // context_size)) // batch
    n_ce = min(n_batches, max(1, cfg.ce_tokens // (context_size * batch)))
    if n_batches < 1:
        raise ValueError(f"Too little text to evaluate: {len(contexts)} contexts of {context_size} "
                         f"tokens, need at least {batch}. Pass more texts or a smaller batch_size.")
    exclude = special_token_ids(model.tokenizer)
    was_training = sae.training
    sae.eval()
    ce, _ = run_evals(
        sae, _token_store(model, sae, contexts, batch, exclude), model, ActivationScaler(),
        EvalConfig(batch_size_prompts=batch, n_eval_reconstruction_batches=n_ce, compute_ce_loss=True,
                   compute_kl=True, n_eval_sparsity_variance_batches=1),
        exclude_special_tokens=exclude)
    sparse, features = run_evals(
        sae, _token_store(model, sae, contexts, batch, exclude), model, ActivationScaler(),
        EvalConfig(batch_size_prompts=batch, n_eval_reconstruction_batches=1,
                   n_eval_sparsity_variance_batches=n_batches, compute_sparsity_metrics=True,
                   compute_l2_norms=True,
                   compute_variance_metrics=True, compute_featurewise_density_statistics=True),
        exclude_special_tokens=exclude)
    ce_err = _ce_with_error_term(sae, model, contexts[: n_ce * batch], batch, exclude)
    perf, recon = ce["model_performance_preservation"], sparse["reconstruction_quality"]
    clean, ablated = perf["ce_loss_without_sae"], perf["ce_loss_with_ablation"]
    density = torch.tensor(features["feature_density"])
    is_special = torch.isin(torch.tensor(contexts[: n_batches * batch]), torch.tensor(exclude))
    sae.train(was_training)
    return SAEEvals(
        explained_variance=recon["explained_variance"], l0=sparse["sparsity"]["l0"],
        dead_fraction=float((density == 0).float().mean()),
        dense_fraction=float((density > cfg.dense_threshold).float().mean()),
        ce_loss_recovered=perf["ce_loss_score"],
        ce_loss_recovered_with_error_term=(ablated - ce_err) / (ablated - clean),
        ce_loss_clean=clean, ce_loss_with_sae=perf["ce_loss_with_sae"], ce_loss_with_error_term=ce_err,
        ce_loss_zero_ablation=ablated, kl_div_with_sae=ce["model_behavior_preservation"]["kl_div_with_sae"],
        cossim=recon["cossim"], n_tokens=int((~is_special).sum()),
        n_ce_tokens=int((~is_special[: n_ce * batch]).sum()), dense_threshold=cfg.dense_threshold,
        extra={"mse": recon["mse"], "l2_ratio": sparse.get("shrinkage", {}).get("l2_ratio"),
               "kl_div_score": ce["model_behavior_preservation"]["kl_div_score"],
               "context_size": context_size, "n_latents": int(density.numel())},
    )


def _ce_with_error_term(sae: SAE, model: HookedTransformer, contexts: list[list[int]], batch: int,
                        exclude: list[int]) -> float:
    """Mean next-token CE with the SAE and its error term spliced in, masked as SAELens does."""
    losses = []
    with spliced(model, sae, use_error_term=True):
        for i in range(0, len(contexts), batch):
            tokens = torch.tensor(contexts[i : i + batch], device=model.cfg.device)
            loss = model(tokens, return_type="loss", loss_per_token=True)
            keep = ~torch.isin(tokens, torch.tensor(exclude, device=tokens.device))[:, :-1]
            losses.append(loss[keep])
    return torch.cat(losses).mean().item()


# ---------------------------------------------------------------- run stage


def prepare_sae(run_cfg: Any, model: HookedTransformer, run_dir: str | Path | None = None) -> SAE:
    """The run pipeline's SAE stage: load (local/pretrained) or train-then-load, per `run_cfg.sae`.

    A trained SAE goes to ``<run_dir>/sae-train`` (or sae.train.out); a finished training run is
    reused, an interrupted one resumes from its last checkpoint.

    Example:
        >>> sae = prepare_sae(load_config("configs/smollm2-135m.yaml"), model, "runs/study")
    """
    from .models import default_layer

    layer = run_cfg.model.layer if run_cfg.model.layer is not None else \
        default_layer(run_cfg.model.name, model.cfg.n_layers)
    if run_cfg.sae.source == "train":
        from .sae_training import train_sae

        out = run_cfg.sae.train.out or (str(Path(run_dir) / "sae-train") if run_dir else None)
        result = train_sae(run_cfg, out_dir=out, model=model)
        cfg = SAEConfig(**{**run_cfg.sae.__dict__, "source": "local", "path": str(result.sae_dir)})
        return load_sae(cfg, model, layer=layer)
    return load_sae(run_cfg.sae, model, layer=layer)
