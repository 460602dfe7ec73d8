"""Keys: short content hashes of a computation's inputs (what a cached artifact was made from), and
the dotted keys of nested metrics.

Example:
    >>> key_of("blocks.20.hook_resid_post", torch.ones(3))   # 16 hex digits, stable across runs
    >>> flatten({"dense": {"top1": 0.4}})
    {'dense.top1': 0.4}
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch


def _key_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        o = o.detach().cpu()
        if o.dtype == torch.bfloat16:
            o = o.float()
        o = o.contiguous().numpy()
    if isinstance(o, np.ndarray):
        return [str(o.dtype), list(o.shape), hashlib.sha256(np.ascontiguousarray(o).tobytes()).hexdigest()]
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not hashable into a key: {type(o)}")


def key_of(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable inputs; tensors and arrays by their bytes."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=_key_default).encode()).hexdigest()[:16]


def flatten(d: dict[str, Any], sep: str = ".", prefix: str = "") -> dict[str, Any]:
    """The leaves of a nested dict under their joined keys (``{"a": {"b": 1}}`` -> ``{"a.b": 1}``)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, sep, f"{prefix}{k}{sep}"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def lookup(d: dict[str, Any], dotted: str) -> Any:
    """The value under a dotted key of a nested dict (``lookup(m, "dense.top1")``); None if absent."""
    for k in dotted.split("."):
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d
