"""Attach `Steering` interventions to a model inside a ``with`` only, on either backend:
  * ``"hf"`` (fast, default for generation): PyTorch hooks on the HF twin (`models.hf_twin`)
    addressed by TransformerLens hook names (`hf_hooks`), driving transformers' ``generate``.
  * ``"tl"`` (reference): TransformerLens hooks on the HookedTransformer and SAELens' error-term
    splicing (`sae.spliced` + a hook on ``hook_sae_acts_post``).
Greedy outputs of the two agree (tests/test_steering.py). Nothing stays attached after the ``with``.

Example:
    >>> with steered(model, clamp, backend="tl", prompt_len=12):
    ...     logits = model(tokens)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..hf_hooks import PositionState, parse_hook_name, tl_named_hooks
from ..models import hf_twin
from ..sae.load import spliced
from .spec import BACKENDS, SteeringError

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from .intervention import Steering



def check_hook(model: HookedTransformer, hook: str) -> str:
    """The hook name if the HookedTransformer has it, else a clear error with examples."""
    if hook not in model.hook_dict:
        n = model.cfg.n_layers
        raise SteeringError(
            f"Hook '{hook}' does not exist in {model.cfg.model_name}. Use a TransformerLens hook name "
            f"such as blocks.L.hook_resid_post or blocks.L.hook_resid_pre with L in 0..{n - 1}."
        )
    return hook


@dataclass
class SteeringHandle:
    """What `steered` yields: where the prompt ends, or an explicit token mask, for position modes."""

    steerings: list[Steering]
    backend: str
    prompt_len: int | None = None
    """Padded prompt length: positions below it are 'prompt', the rest 'generated'."""
    token_mask: torch.Tensor | None = None
    """Bool [batch, seq] over absolute positions; when set it overrides every position mode."""
    state: PositionState = field(default_factory=PositionState)

    def mask(self, steering: Steering, positions: Tensor) -> Tensor | None:
        """Bool [batch|1, pos] of the positions to steer, or None for all."""
        if self.token_mask is not None:
            tm = self.token_mask.to(positions.device)
            inside = positions < tm.shape[1]
            out = torch.zeros(tm.shape[0], len(positions), dtype=torch.bool, device=positions.device)
            out[:, inside] = tm[:, positions[inside]]
            return out
        if steering.positions == "all":
            return None
        if self.prompt_len is None:
            raise SteeringError(f"positions='{steering.positions}' needs the prompt length: pass "
                                "prompt_len= to steered(), or use generate_steered().")
        if steering.positions == "prompt":
            return (positions < self.prompt_len)[None]
        return (positions >= self.prompt_len)[None]

    def reset(self) -> None:
        """Start counting positions from 0 again (TransformerLens backend, before a new sequence)."""
        self.state.offset = self.state.seq_len = 0


@contextlib.contextmanager
def steered(
    model: HookedTransformer,
    steering: Steering | Sequence[Steering],
    backend: str = "tl",
    prompt_len: int | None = None,
    token_mask: Tensor | None = None,
) -> Iterator[SteeringHandle]:
    """Run ``model`` (backend 'tl') or its HF twin (backend 'hf') steered, inside the ``with`` only.

    Example:
        >>> with steered(model, steering, backend="tl", prompt_len=tokens.shape[1]):
        ...     out = model.generate(tokens, max_new_tokens=20, do_sample=False)
        >>> with steered(model, steering, backend="hf") as handle:
        ...     logits = hf_twin(model)(input_ids).logits
    """
    steerings = list(steering) if isinstance(steering, (list, tuple)) else [steering]
    if backend not in BACKENDS:
        raise SteeringError(f"backend must be one of {', '.join(BACKENDS)}; got '{backend}'.")
    saes = [id(s.sae) for s in steerings if s.has_latents]
    if len(saes) != len(set(saes)):
        raise SteeringError("Two steerings clamp the same SAE: merge them into one SteeringSpec.")
    handle = SteeringHandle(steerings, backend, prompt_len, token_mask)
    if backend == "hf":
        hf = hf_twin(model)
        for s in steerings:
            parse_hook_name(hf, s.hook)
        hooks = [(s.hook, _hf_fn(s, handle)) for s in steerings]
        with tl_named_hooks(hf, hooks) as state:
            handle.state = state
            yield handle
        return
    with _tl_steered(model, steerings, handle):
        yield handle


def _hf_fn(s: Steering, handle: SteeringHandle):
    def fn(act: Tensor, positions: Tensor) -> Tensor:
        return s.apply(act, handle.mask(s, positions))
    return fn


@contextlib.contextmanager
def _tl_steered(model: HookedTransformer, steerings: list[Steering], handle: SteeringHandle):
    """TransformerLens hooks: a position tracker, SAELens splicing for latents, vector adds."""
    for s in steerings:
        check_hook(model, s.hook)
    state = handle.state

    def track(act: Tensor, hook: Any) -> None:  # noqa: ARG001
        # Every forward pass enters block 0 once. A pass of several tokens starts a sequence; a
        # one-token pass continues it (TransformerLens' generate with its KV cache).
        seq = act.shape[1]
        state.offset = 0 if (seq > 1 or state.seq_len == 0) else state.offset + state.seq_len
        state.seq_len = seq

    with contextlib.ExitStack() as stack:
        stack.enter_context(model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", track)]))
        for s in steerings:
            if s.has_latents:
                stack.enter_context(spliced(model, s.sae, use_error_term=True))
                stack.enter_context(s.sae.hooks(fwd_hooks=[("hook_sae_acts_post", _tl_latent_fn(s, handle))]))
            if s.vector is not None:
                vec_only = replace(s, latent_ids=None, latent_values=None, sae=None)
                stack.enter_context(model.hooks(fwd_hooks=[(s.hook, _tl_vector_fn(vec_only, handle))]))
        yield handle


def _tl_latent_fn(s: Steering, handle: SteeringHandle):
    def fn(z: Tensor, hook: Any) -> Tensor:  # noqa: ARG001
        return s.edit_latents(z, handle.mask(s, handle.state.positions(z.shape[1], z.device)))
    return fn


def _tl_vector_fn(s: Steering, handle: SteeringHandle):
    def fn(act: Tensor, hook: Any) -> Tensor:  # noqa: ARG001
        return s.apply(act, handle.mask(s, handle.state.positions(act.shape[1], act.device)))
    return fn
