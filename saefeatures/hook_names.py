"""TransformerLens hook names of the residual stream and the block outputs: the one grammar.

Every activation is addressed as ``blocks.{L}.{kind}`` (e.g. ``blocks.20.hook_resid_post``); the
HF hooks, SAEs, directions and steering all parse and build names here.

Example:
    >>> hook_name(20)
    'blocks.20.hook_resid_post'
    >>> parse(hook_name(20))
    (20, 'hook_resid_post')
"""

from __future__ import annotations

import re

RESID_POST = "hook_resid_post"
_NAME = re.compile(r"^blocks\.(\d+)\.(hook_[a-z_]+)$")
_RESID_OFFSET = {"hook_resid_pre": 0.0, "hook_resid_mid": 0.5, "hook_resid_post": 1.0}


def hook_name(layer: int, kind: str = RESID_POST) -> str:
    """The name of ``kind`` (a hook within a block) at ``layer``."""
    return f"blocks.{layer}.{kind}"


def parse(name: str) -> tuple[int, str] | None:
    """(layer, kind) of a ``blocks.L.kind`` name, or None for any other name."""
    m = _NAME.match(name)
    return (int(m.group(1)), m.group(2)) if m else None


def layer_of(name: str) -> int:
    """The block index of a ``blocks.L.kind`` name (ValueError for any other name)."""
    parsed = parse(name)
    if parsed is None:
        raise ValueError(f"'{name}' is not a TransformerLens block hook name (blocks.L.hook_...).")
    return parsed[0]


def resid_position(name: str) -> float | None:
    """Position in the residual stream, equal for blocks.L.hook_resid_post and blocks.L+1.hook_resid_pre;
    None for a hook outside the residual stream."""
    parsed = parse(name)
    if parsed is None or parsed[1] not in _RESID_OFFSET:
        return None
    return parsed[0] + _RESID_OFFSET[parsed[1]]


def same_activation(a: str, b: str) -> bool:
    """True when two hooks read the same activation (resid_post of L is resid_pre of L+1)."""
    if a == b:
        return True
    pa, pb = resid_position(a), resid_position(b)
    return pa is not None and pa == pb
