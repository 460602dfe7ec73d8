"""Batched, seeded text generation with the HuggingFace twin of the subject model.

transformers' ``generate`` with the KV cache runs several times faster than TransformerLens'
generate on CPU (`scripts/bench_steering.py` measures both), so corpus building and steered
generation both go through it.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList


class NucleusSampling(LogitsProcessor):
    """Samples the next token with temperature and top-p (nucleus), as transformers' warpers and
    multinomial draw would, and returns scores in which only that token is finite: run it last,
    with greedy decoding (``do_sample=False``), and ``generate`` takes the drawn token.

    Two costs of transformers' own path on CPU are avoided. The nucleus is found with ``topk``
    (``k`` grows until the top ``k`` tokens hold ``top_p`` of the mass in every row, so the kept set
    is a full sort's) instead of sorting every row, which took as long as the decoding step; and the
    draw is among the nucleus only, instead of one random number per vocabulary entry (15% of a
    batch-64 step here)."""

    def __init__(self, temperature: float, top_p: float, k: int = 256):
        if temperature <= 0 or not 0 < top_p <= 1:
            raise ValueError(f"NucleusSampling needs temperature > 0 and 0 < top_p <= 1, got {temperature}, {top_p}.")
        self.temperature, self.top_p, self.k = temperature, top_p, k

    def _top(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(values, token ids, kept) of the top-k tempered scores, k covering ``top_p`` in every row."""
        scores = scores / self.temperature
        vocab = scores.shape[-1]
        if self.top_p >= 1.0:
            idx = torch.arange(vocab, device=scores.device).expand_as(scores)
            return scores, idx, torch.isfinite(scores)
        lse = scores.float().logsumexp(-1, keepdim=True)
        k = min(self.k, vocab)
        while True:
            vals, idx = scores.topk(k, dim=-1)
            probs = (vals.float() - lse).exp()
            cum = probs.cumsum(-1)
            if k == vocab or bool((cum[:, -1] >= self.top_p).all()):
                break
            k = min(4 * k, vocab)
        keep = (cum - probs) < self.top_p  # the mass above a token is below top_p
        keep[:, 0] = True
        return vals, idx, keep

    def nucleus(self, scores: torch.Tensor) -> torch.Tensor:
        """The tempered scores with every token outside the nucleus at -inf (what is sampled from)."""
        vals, idx, keep = self._top(scores)
        out = torch.full_like(scores, -float("inf"))
        return out.scatter_(1, idx, (vals.masked_fill(~keep, -float("inf"))).to(scores.dtype))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:  # noqa: ARG002
        vals, idx, keep = self._top(scores)
        probs = vals.float().masked_fill(~keep, -float("inf")).softmax(-1)
        token = idx.gather(1, torch.multinomial(probs, 1))
        return torch.full_like(scores, -float("inf")).scatter_(1, token, 0.0)


def sampling_kwargs(temperature: float, top_p: float) -> dict[str, Any]:
    """``generate`` keyword arguments: greedy for temperature 0, else `NucleusSampling` (which
    draws the token itself, so ``generate`` decodes greedily either way)."""
    if temperature <= 0:
        return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None,
            "logits_processor": LogitsProcessorList([NucleusSampling(temperature, top_p)])}


@dataclass
class GenerationConfig:
    """Sampling settings for one generate call; recorded with every corpus record."""

    max_new_tokens: int = 160
    """Tokens generated per text at most."""
    temperature: float = 0.8
    """Sampling temperature; 0 means greedy."""
    top_p: float = 0.95
    """Nucleus sampling mass."""
    repetition_penalty: float = 1.1
    """>1 discourages the loops small models fall into."""
    batch_size: int = 24
    """Prompts generated together."""
    dtype: str = "auto"
    """Dtype the generating model is loaded in; 'auto' is bfloat16 where the hardware has bf16 units
    (~1.5x faster there, ~7x slower on CPUs without them), else float32."""
    ban_words: bool = True
    """Forbid the emotion's own word forms while decoding (the filter still checks)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def batch_seed(seed: int, key: str) -> int:
    """A seed for one batch that depends only on the run seed and the batch key (resume-safe)."""
    return int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:8], 16)


@dataclass
class Generator:
    """Generates chat replies for many prompts with a HF causal LM and its tokenizer."""

    hf: Any
    tokenizer: Any
    config: GenerationConfig = field(default_factory=GenerationConfig)

    def render(self, user_prompt: str, prefill: str = "") -> str:
        """The chat-formatted prompt, with ``prefill`` as the start of the assistant's reply."""
        messages = [{"role": "user", "content": user_prompt}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + prefill

    def bad_words_ids(self, words: list[str]) -> list[list[int]] | None:
        """Token sequences of each word form after a space, lower or capitalised, and capitalised at
        the start of a text (a lowercase form without its space would also ban sub-words)."""
        seqs = set()
        for w in words:
            for variant in {w.capitalize(), " " + w, " " + w.capitalize()}:
                ids = self.tokenizer(variant, add_special_tokens=False).input_ids
                if ids:
                    seqs.add(tuple(ids))
        return [list(s) for s in sorted(seqs)] or None

    @torch.inference_mode()
    def generate(self, user_prompts: list[str], seed: int, banned: list[str] | None = None,
                 prefills: list[str] | None = None) -> list[str]:
        """Replies to ``user_prompts`` (one batch), reproducible for a given seed. With ``prefills``
        each reply starts with its prefill (forced, not generated; a 135M model follows a started
        sentence far more reliably than an instruction); the text returned is the continuation only."""
        if prefills is not None and len(prefills) != len(user_prompts):
            raise ValueError(f"{len(prefills)} prefills for {len(user_prompts)} prompts.")
        cfg = self.config
        tok = self.tokenizer
        side = tok.padding_side
        tok.padding_side = "left"
        try:
            rendered = [self.render(p, f) for p, f in zip(user_prompts, prefills or [""] * len(user_prompts))]
            enc = tok(rendered, return_tensors="pt", padding=True,
                      add_special_tokens=False).to(self.hf.device)
        finally:
            tok.padding_side = side
        torch.manual_seed(seed)
        out = self.hf.generate(
            **enc,
            max_new_tokens=cfg.max_new_tokens,
            **sampling_kwargs(cfg.temperature, cfg.top_p),
            repetition_penalty=cfg.repetition_penalty,
            bad_words_ids=self.bad_words_ids(banned) if banned and cfg.ban_words else None,
            pad_token_id=tok.pad_token_id,
        )
        return tok.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
