"""The model in another compute dtype: a cast copy, kept on the model and reused.

Pooling and scoring run in bfloat16 where the hardware has bf16 units while the model stays in
float32; each pass reads the same copy instead of casting the weights again.

Example:
    >>> fast = with_dtype(model, "auto")   # the model itself, or its bfloat16 copy
"""

from __future__ import annotations

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from .models import resolve_dtype

DTYPE_COPIES_ATTR = "_saefeatures_dtype_copies"
"""Where `with_dtype` keeps its cast copies on the model: {dtype: (weights stamp, copy)}."""


def with_dtype(model: HookedTransformer, dtype: str | torch.dtype) -> HookedTransformer:
    """The model in ``dtype`` ("auto": see `resolve_dtype`): itself if already so, else a cast copy
    (the original is untouched). The copy is kept on the model and reused while the original's
    weights are unchanged (same storage, no in-place update), so repeated reads build it once."""
    dtype = resolve_dtype(dtype, model.cfg.device)
    if model.cfg.dtype == dtype:
        return model
    stamp = tuple((p.data_ptr(), p._version) for p in model.parameters())
    copies = vars(model).setdefault(DTYPE_COPIES_ATTR, {})
    if dtype in copies and copies[dtype][0] == stamp:
        return copies[dtype][1]
    # A new dict: TransformerLens' to_dict() is the config's own __dict__, and writing the dtype
    # into it turned the original's cfg.dtype to bfloat16 over float32 weights (issue 13).
    # No random initialisation: every parameter is overwritten below (and the global RNG is left alone).
    cfg = {**model.cfg.to_dict(), "dtype": dtype, "init_weights": False}
    copy = HookedTransformer(HookedTransformerConfig(**cfg), tokenizer=None, move_to_device=False)
    # Parameters only: buffers (rotary tables, masks) are rebuilt by the constructor in `dtype`.
    missing = copy.load_state_dict({k: v.to(dtype) for k, v in model.named_parameters()}, strict=False).missing_keys
    assert not set(missing) & dict(copy.named_parameters()).keys(), missing
    copy.tokenizer = model.tokenizer  # cfg (copied above) already says whether it prepends BOS
    for attr in ("_saefeatures_identity",):
        if hasattr(model, attr):
            object.__setattr__(copy, attr, getattr(model, attr))
    copy = copy.to(model.cfg.device, print_details=False).eval()
    copies[dtype] = (stamp, copy)
    return copy
