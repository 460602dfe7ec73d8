"""PyTorch hooks on a HuggingFace causal LM, addressed by TransformerLens hook names.

The fast steering path runs transformers' ``generate`` (with its KV cache; `scripts/bench_steering.py`
measures it against TransformerLens') on the HF twin of the HookedTransformer (`models.hf_twin`).
Because `load_model` converts weights without processing, ``blocks.L.hook_resid_post`` of the
HookedTransformer is the output of HF decoder layer L, ``blocks.L.hook_resid_pre`` its input, and
so on; this module maps those names (`hook_names`) to module hooks, so one steering intervention runs unchanged on either model.

Every hook function receives the activation and the absolute token positions of its sequence
axis (counted in the padded sequence, past KV-cache entries included), so an intervention can
tell prompt tokens from generated ones while the cache feeds the model one token at a time.

Example:
    >>> def add(act, positions):
    ...     return act + 0.1
    >>> with tl_named_hooks(hf_twin(model), [("blocks.20.hook_resid_post", add)]):
    ...     out = hf_twin(model).generate(**enc, max_new_tokens=20)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .hook_names import parse

HookFn = Callable[[Tensor, Tensor], Tensor | None]
"""(activation [batch, pos, d_model], absolute positions [pos]) -> new activation or None."""

KINDS = ("hook_resid_pre", "hook_resid_post", "hook_attn_out", "hook_mlp_out")
SUPPORTED = ("blocks.L.hook_resid_pre", "blocks.L.hook_resid_post", "blocks.L.hook_attn_out",
             "blocks.L.hook_mlp_out")
"""TransformerLens hook names the fast path can address (L = layer index)."""
# Sub-module names of the attention and MLP outputs per architecture (model_type). Gemma 2 norms
# those outputs again before the residual add, so TransformerLens' hook_attn_out has no HF module.
_SUBMODULES = {"llama": ("self_attn", "mlp"), "gpt2": ("attn", "mlp")}


class HookNameError(KeyError):
    """A hook name the fast HF path cannot address; the message lists the ones it can."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass
class PositionState:
    """Where the sequence axis of the current forward pass starts (KV-cache entries before it)."""

    offset: int = 0
    seq_len: int = 0

    def positions(self, seq_len: int, device: torch.device | str = "cpu") -> Tensor:
        return torch.arange(self.offset, self.offset + seq_len, device=device)


def decoder_layers(hf: Any) -> torch.nn.ModuleList:
    """The decoder blocks of a HF causal LM (Llama/Gemma 2: ``model.layers``; GPT-2: ``transformer.h``)."""
    base = hf.base_model
    for attr in ("layers", "h"):
        layers = getattr(base, attr, None)
        if isinstance(layers, torch.nn.ModuleList):
            return layers
    raise HookNameError(f"Cannot find the decoder layers of {type(hf).__name__}; supported: Llama, Gemma 2, GPT-2.")


def parse_hook_name(hf: Any, name: str) -> tuple[int, str]:
    """(layer, kind) of a TransformerLens hook name the fast path supports, or a clear error."""
    n_layers = len(decoder_layers(hf))
    parsed = parse(name)
    if parsed is None or parsed[1] not in KINDS:
        raise HookNameError(
            f"Hook '{name}' is not supported on the fast (transformers) path. Supported: "
            f"{', '.join(SUPPORTED)} with L in 0..{n_layers - 1}; use backend='tl' for other hook points."
        )
    layer, kind = parsed
    if not 0 <= layer < n_layers:
        raise HookNameError(f"Hook '{name}': layer {layer} does not exist; the model has layers 0..{n_layers - 1}.")
    if kind in ("hook_attn_out", "hook_mlp_out") and hf.config.model_type not in _SUBMODULES:
        raise HookNameError(
            f"Hook '{name}' has no exact equivalent in {hf.config.model_type} on the fast path; use "
            "blocks.L.hook_resid_pre / hook_resid_post, or backend='tl'."
        )
    return layer, kind


def _replace_first(output: Any, new: Tensor) -> Any:
    if isinstance(output, tuple):
        return (new, *output[1:])
    return new


def _past_length(kwargs: dict[str, Any]) -> int:
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is None or not hasattr(cache, "get_seq_length"):
        return 0
    return int(cache.get_seq_length())


@contextlib.contextmanager
def tl_named_hooks(hf: Any, hooks: Sequence[tuple[str, HookFn]]) -> Iterator[PositionState]:
    """Attach ``hooks`` (TransformerLens name, fn) to the HF model inside the ``with`` only.

    Hooks at the same name run in the order given. Yields the `PositionState` the hooks read
    their positions from (set by a pre-hook on the base model from the KV-cache length).
    """
    parsed = [(parse_hook_name(hf, name), fn) for name, fn in hooks]
    layers = decoder_layers(hf)
    state = PositionState()
    handles: list[Any] = []

    def track(module: Any, args: tuple, kwargs: dict[str, Any]) -> None:  # noqa: ARG001
        x = kwargs.get("input_ids")
        if x is None:
            x = kwargs.get("inputs_embeds")
        if x is None and args:
            x = args[0]
        state.offset = _past_length(kwargs)
        state.seq_len = int(x.shape[1]) if x is not None else 0

    def pre_hook(fn: HookFn) -> Callable:
        def hook(module: Any, args: tuple, kwargs: dict[str, Any]) -> Any:  # noqa: ARG001
            if args:
                act = args[0]
                new = fn(act, state.positions(act.shape[1], act.device))
                return None if new is None else ((new, *args[1:]), kwargs)
            act = kwargs["hidden_states"]
            new = fn(act, state.positions(act.shape[1], act.device))
            return None if new is None else (args, {**kwargs, "hidden_states": new})
        return hook

    def post_hook(fn: HookFn) -> Callable:
        def hook(module: Any, args: tuple, output: Any) -> Any:  # noqa: ARG001
            act = output[0] if isinstance(output, tuple) else output
            new = fn(act, state.positions(act.shape[1], act.device))
            return None if new is None else _replace_first(output, new)
        return hook

    try:
        handles.append(hf.base_model.register_forward_pre_hook(track, with_kwargs=True))
        for (layer, kind), fn in parsed:
            block = layers[layer]
            if kind == "hook_resid_pre":
                handles.append(block.register_forward_pre_hook(pre_hook(fn), with_kwargs=True))
            elif kind == "hook_resid_post":
                handles.append(block.register_forward_hook(post_hook(fn)))
            else:
                attn, mlp = _SUBMODULES[hf.config.model_type]
                sub = getattr(block, attn if kind == "hook_attn_out" else mlp)
                handles.append(sub.register_forward_hook(post_hook(fn)))
        yield state
    finally:
        for h in handles:
            h.remove()


class _Stop(Exception):
    """Ends a forward pass once every requested activation is saved (see `run_to_hooks`)."""


@torch.inference_mode()
def run_to_hooks(hf: Any, tokens: Tensor, names: Sequence[str]) -> dict[str, Tensor]:
    """Activations of the HF model at TransformerLens-named hooks for right-padded ``tokens``,
    stopping the forward pass as soon as the last of them is computed (no attention mask is
    needed: in a causal model right padding only follows the real tokens)."""
    store: dict[str, Tensor] = {}

    def saver(name: str) -> HookFn:
        def fn(act: Tensor, positions: Tensor) -> None:  # noqa: ARG001
            store[name] = act
            if len(store) == len(names):
                raise _Stop
        return fn

    with tl_named_hooks(hf, [(n, saver(n)) for n in names]):
        try:
            hf.base_model(input_ids=tokens.to(hf.device), use_cache=False)
        except _Stop:
            pass
    return store

