"""Steered generation: continuations of chat prompts with `Steering` attached, batched and left-padded,
on the fast HF path (transformers' ``generate`` with its KV cache) or TransformerLens' ``generate``.

Example:
    >>> steering = Steering.from_spec(SteeringSpec(emotions={"desperate": 0.1}), model, directions=dirs)
    >>> generate_steered(model, steering, ["How is the project going?"], max_new_tokens=40)
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..directions import EmotionDirections
from ..generation import sampling_kwargs
from ..models import chat_prompt, hf_twin
from .attach import steered
from .intervention import Steering
from .spec import SteeringError, SteeringSpec

if TYPE_CHECKING:
    from sae_lens import SAE
    from transformer_lens import HookedTransformer


@dataclass
class Generation:
    """One steered continuation with its token ids."""

    prompt: str
    text: str
    prompt_ids: list[int]
    """The prompt's tokens (no padding)."""
    new_ids: list[int]
    """Generated tokens up to and including the first end-of-sequence token."""


def render_prompts(tokenizer: Any, prompts: Sequence[str], chat: bool = True) -> list[str]:
    """User messages rendered with the chat template (or the raw texts when ``chat`` is False)."""
    if not chat:
        return list(prompts)

    return [chat_prompt(tokenizer, [{"role": "user", "content": p}]) for p in prompts]


def left_pad(tokenizer: Any, texts: Sequence[str]) -> dict[str, Tensor]:
    """Token ids of ``texts`` padded on the left (generation continues every row from its end)."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        return tokenizer(list(texts), return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side


def _stop_ids(tokenizer: Any) -> set[int]:
    ids = {tokenizer.eos_token_id}
    for tok in ("<|im_end|>", "<|endoftext|>"):
        if tok in tokenizer.get_vocab():
            ids.add(tokenizer.convert_tokens_to_ids(tok))
    return {i for i in ids if i is not None}


@torch.inference_mode()
def generate_steered_full(
    model: HookedTransformer,
    steering: Steering | Sequence[Steering] | None,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    seed: int = 0,
    batch_size: int = 8,
    chat: bool = True,
    backend: str = "hf",
    min_new_tokens: int | None = None,
) -> list[Generation]:
    """Steered continuations with their token ids; see `generate_steered`."""
    tok = model.tokenizer
    texts = render_prompts(tok, prompts, chat)
    stops = _stop_ids(tok)
    steerings = [] if steering is None else [steering] if isinstance(steering, Steering) else list(steering)
    for s in steerings:
        if s.n_rows not in (1, len(prompts)):
            raise SteeringError(f"A per-row steering has {s.n_rows} rows for {len(prompts)} prompts.")
    out: list[Generation] = []
    for start in range(0, len(texts), batch_size):
        stop = min(start + batch_size, len(texts))
        enc = left_pad(tok, texts[start:stop])
        rows = [s.take(start, stop) for s in steerings]
        prompt_len = enc.input_ids.shape[1]
        torch.manual_seed(seed + start)
        with contextlib.ExitStack() as stack:
            if rows:
                stack.enter_context(steered(model, rows, backend=backend, prompt_len=prompt_len))
            if backend == "hf":
                new = _hf_generate(model, enc, max_new_tokens, temperature, top_p, repetition_penalty,
                                   min_new_tokens)
            else:
                new = _tl_generate(model, enc, max_new_tokens, temperature, top_p, min_new_tokens)
        for row in range(stop - start):
            ids = new[row].tolist()
            cut = next((n + 1 for n, t in enumerate(ids) if t in stops), len(ids))
            ids = ids[:cut]
            prompt_ids = enc.input_ids[row][enc.attention_mask[row].bool()].tolist()
            out.append(Generation(prompts[start + row], tok.decode(ids, skip_special_tokens=True),
                                  prompt_ids, ids))
    return out


def _hf_generate(model, enc, max_new_tokens, temperature, top_p, repetition_penalty, min_new_tokens):
    hf = hf_twin(model)
    kwargs = dict(max_new_tokens=max_new_tokens, **sampling_kwargs(temperature, top_p),
                  repetition_penalty=repetition_penalty, pad_token_id=model.tokenizer.pad_token_id)
    if min_new_tokens:
        kwargs["min_new_tokens"] = min_new_tokens
    out = hf.generate(**enc.to(hf.device), **kwargs)
    return out[:, enc.input_ids.shape[1]:].cpu()


def _tl_generate(model, enc, max_new_tokens, temperature, top_p, min_new_tokens):
    tok = model.tokenizer
    tokens = enc.input_ids.to(model.cfg.device)
    # TransformerLens masks padding by token id: with the tokenizer set to 'left', only leading pad
    # tokens count, so the chat template's own end tokens (= pad here) stay attended.
    first = enc.input_ids.gather(1, enc.attention_mask.argmax(1, keepdim=True))
    if tok.pad_token_id is not None and bool((first == tok.pad_token_id).any()):
        raise SteeringError("A prompt starts with the pad token, which TransformerLens would mask; "
                            "use backend='hf' or batch_size=1.")
    sample = temperature > 0
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        out = model.generate(tokens, max_new_tokens=max_new_tokens, do_sample=sample,
                             temperature=temperature if sample else 1.0, top_p=top_p if sample else None,
                             stop_at_eos=not min_new_tokens, use_past_kv_cache=True, verbose=False,
                             return_type="tokens", prepend_bos=False)
    finally:
        tok.padding_side = side
    return out[:, tokens.shape[1]:].cpu()


def generate_steered(
    model: HookedTransformer,
    steering: Steering | Sequence[Steering] | None,
    prompts: Sequence[str],
    **kwargs: Any,
) -> list[str]:
    """Continuations of ``prompts`` (chat user messages) generated with the steering attached.

    Batches are left-padded; with positions 'prompt' / 'generated' the split is the padded prompt
    length. The default backend 'hf' runs transformers' ``generate`` with the KV cache on the HF
    twin; 'tl' runs TransformerLens' ``generate`` (the reference, slower; `scripts/bench_steering.py`).

    Example:
        >>> steering = Steering.from_spec(SteeringSpec(emotions={"desperate": 0.1}), model, directions=dirs)
        >>> generate_steered(model, steering, ["How is the project going?"], max_new_tokens=40)

    Args:
        steering: one Steering, several (applied together), or None (unsteered).
        max_new_tokens, temperature (0: greedy), top_p, repetition_penalty, seed, batch_size,
        chat (render with the chat template), backend ('hf' or 'tl'), min_new_tokens.
    """
    return [g.text for g in generate_steered_full(model, steering, prompts, **kwargs)]


def steer_prompts(
    model: HookedTransformer,
    spec: SteeringSpec,
    prompts: Sequence[str],
    directions: EmotionDirections | None = None,
    sae: SAE | None = None,
    compare: bool = True,
    **gen_kwargs: Any,
) -> list[dict[str, str]]:
    """Steered (and, with ``compare``, unsteered) replies to ``prompts``: what `saefeatures steer` prints.

    Example:
        >>> steer_prompts(model, SteeringSpec(emotions={"desperate": 0.5}), ["How is it going?"], dirs)
    """
    steering = Steering.from_spec(spec, model, directions=directions, sae=sae)
    out = [{"prompt": p, "steered": t} for p, t in zip(prompts, generate_steered(model, steering, prompts, **gen_kwargs))]
    if compare:
        for row, text in zip(out, generate_steered(model, None, prompts, **gen_kwargs)):
            row["unsteered"] = text
    return out
