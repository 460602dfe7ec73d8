"""SAEs at the studied layer: load (shipped, local or pretrained), check against the model, splice.

SAELens does the work; this module wires it to the toolkit's model and layer:
  * `load_sae` reads a SAELens directory (the shipped default of the embedded model, or one
    `saefeatures sae train` wrote) or a pretrained release/id (Gemma Scope, Llama Scope,
    ``gpt2-small-res-jb``; needs the hub once), and `check_sae` refuses an SAE whose hook or
    input width does not match the model and layer.
  * `spliced` runs the model with the SAE in the residual stream (error term kept by default,
    so an unclamped pass is unchanged).
  * `sae_fingerprint` is the one content key of an SAE (hook, width and weights).

Example:
    >>> from saefeatures import load_model, load_sae
    >>> model = load_model("smollm2-135m-instruct")
    >>> sae = load_sae(None, model, layer=18)          # the shipped default
    >>> with spliced(model, sae):
    ...     logits = model("I can't stop smiling today.")
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..emotions import DATA
from ..errors import UserError
from ..hook_names import hook_name, resid_position, same_activation
from ..keys import key_of
from .config import SOURCES, SAEConfig

if TYPE_CHECKING:
    from sae_lens import SAE
    from transformer_lens import HookedTransformer

log = logging.getLogger(__name__)

SHIPPED_DIR = DATA / "sae"
SHIPPED_SAES = {("smollm2-135m-instruct", 18): SHIPPED_DIR / "smollm2-135m-instruct-L18"}
"""Shipped SAEs by (model name, layer)."""
CFG_FILE, WEIGHTS_FILE = "cfg.json", "sae_weights.safetensors"  # SAELens' file names


class SAELoadError(UserError):
    """An SAE could not be loaded; the message says what to do."""


class SAEMismatchError(SAELoadError):
    """An SAE does not fit the model or layer (hook or input width)."""


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
    pos = resid_position(sae_hook)
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
    expected = hook or (hook_name(layer) if layer is not None else None)
    if expected is not None and not same_activation(sae_hook, expected):
        raise SAEMismatchError(
            f"Hook mismatch: the SAE reads '{sae_hook}', but the config studies '{expected}'. "
            f"Set model.layer (or sae.hook) to the SAE's layer, or load an SAE trained at '{expected}'."
        )


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
    runs on the reconstruction. The error term is SAELens' (``x - decode(encode(x))`` of the
    unedited latents), computed here: setting ``sae.use_error_term`` is deprecated in SAELens, whose
    replacement (``HookedSAETransformer.add_sae``) needs its own model class.

    Example:
        >>> with spliced(model, sae, use_error_term=False):
        ...     loss = model(tokens, return_type="loss")
    """
    clean: list[torch.Tensor] = []

    def capture(z: torch.Tensor, hook: Any) -> None:  # noqa: ARG001 - runs before any edit of the latents
        clean.append(z.detach().clone())

    def splice(acts: torch.Tensor, hook: Any) -> torch.Tensor:  # noqa: ARG001
        x = acts.to(sae.device)
        out = sae(x)
        if use_error_term:
            with torch.no_grad():
                out = out + (x - sae.decode(clean.pop()))
        return out.to(acts.device, acts.dtype)

    level = -id(clean)  # a context level of our own: removing it leaves every other hook in place
    latents = sae.hook_sae_acts_post
    if use_error_term:
        latents.add_hook(capture, prepend=True, level=level)
    try:
        with model.hooks(fwd_hooks=[(sae.cfg.metadata.hook_name, splice)]):
            yield sae
    finally:
        latents.remove_hooks("fwd", level=level)


def sae_fingerprint(sae: SAE) -> str:
    """The content key of an SAE: its hook, width and every weight's bytes (what cached results
    computed with it are keyed by)."""
    return key_of(sae.cfg.metadata.hook_name, sae.cfg.d_sae, dict(sae.state_dict()))
