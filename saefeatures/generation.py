"""Batched, seeded text generation with the HuggingFace twin of the subject model.

transformers' ``generate`` with the KV cache runs several times faster than TransformerLens'
generate on CPU (DESIGN.md), so corpus building and steered generation both go through it.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Any

import torch


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

    def render(self, user_prompt: str) -> str:
        messages = [{"role": "user", "content": user_prompt}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

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
    def generate(self, user_prompts: list[str], seed: int, banned: list[str] | None = None) -> list[str]:
        """Replies to ``user_prompts`` (one batch), reproducible for a given seed."""
        cfg = self.config
        tok = self.tokenizer
        side = tok.padding_side
        tok.padding_side = "left"
        try:
            enc = tok([self.render(p) for p in user_prompts], return_tensors="pt", padding=True,
                      add_special_tokens=False).to(self.hf.device)
        finally:
            tok.padding_side = side
        torch.manual_seed(seed)
        sample = cfg.temperature > 0
        out = self.hf.generate(
            **enc,
            max_new_tokens=cfg.max_new_tokens,
            do_sample=sample,
            temperature=cfg.temperature if sample else None,
            top_p=cfg.top_p if sample else None,
            top_k=None,
            repetition_penalty=cfg.repetition_penalty,
            bad_words_ids=self.bad_words_ids(banned) if banned and cfg.ban_words else None,
            pad_token_id=tok.pad_token_id,
        )
        return tok.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
