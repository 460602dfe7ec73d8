"""Text for SAEs: special tokens, packing texts into contexts, and the training mix.

The training text is the model's own corpus, so the SAE sees what the study feeds the model:
emotion stories and dialogues, neutral texts and a general mix the model wrote (corpus kind
'general'). Each text is rendered either plain or in the chat template (its prompt as the user
turn, the text as the assistant turn) with probability `chat_fraction`; texts are shuffled and
packed into contexts that start with a special token, with special-token separators. Special-token
positions (the first position of every context has ~100x the residual norm of the others) are
never trained on nor evaluated. When training needs more tokens than one pass holds, each further
epoch is re-shuffled and re-rendered with a new seed.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..corpus import load_corpus
from .config import SAETrainConfig

if TYPE_CHECKING:
    from ..corpus import CorpusRecord


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


def render_texts(records: Sequence[CorpusRecord], tokenizer: Any, chat_fraction: float,
                 seed: int) -> list[str]:
    """Each record's text, plain or (with probability `chat_fraction`) as a chat exchange."""
    rng = random.Random(seed)
    texts = []
    for r in records:
        if rng.random() < chat_fraction and getattr(tokenizer, "chat_template", None):
            texts.append(tokenizer.apply_chat_template(
                [{"role": "user", "content": r.prompt}, {"role": "assistant", "content": r.text}],
                tokenize=False))
        else:
            texts.append(r.text)
    return texts


def held_out_texts(corpus_path: str | Path | None, tokenizer: Any, split: str = "test",
                   kinds: Sequence[str] = ("story", "dialogue", "neutral", "general"),
                   chat_fraction: float = 0.5, seed: int = 0) -> list[str]:
    """Texts of one corpus split, rendered like the training mix (for `evaluate_sae`)."""
    records = [r for r in load_corpus(corpus_path, kinds=kinds) if r.split == split]
    if not records:
        raise ValueError(f"The corpus has no kept records of kinds {list(kinds)} in split '{split}'.")
    return render_texts(records, tokenizer, chat_fraction, seed + 10_007)


@dataclass
class TokenData:
    """The packed training contexts and what they hold."""

    contexts: list[list[int]]
    n_texts: int
    texts_per_kind: dict[str, int]
    tokens_per_epoch: int
    epochs: int
    sha256: str
    """Hash of the contexts: a resumed run must see the same data."""


def build_token_data(records: Sequence[CorpusRecord], tokenizer: Any, cfg: SAETrainConfig,
                     n_positions: int) -> TokenData:
    """Pack re-shuffled, re-rendered epochs of `records` until they hold `n_positions` tokens."""
    if not records:
        raise ValueError("No training records: check sae.train.kinds and sae.train.splits against the corpus.")
    contexts: list[list[int]] = []
    epoch, per_epoch = 0, 0
    while len(contexts) * cfg.context_size < n_positions:
        order = list(records)
        random.Random(cfg.seed * 1000 + epoch).shuffle(order)
        packed = pack_texts(tokenizer, render_texts(order, tokenizer, cfg.chat_fraction,
                                                    cfg.seed * 1000 + epoch), cfg.context_size)
        if not packed:
            raise ValueError(f"The corpus holds less than one context of {cfg.context_size} tokens.")
        per_epoch = per_epoch or len(packed) * cfg.context_size
        contexts.extend(packed)
        epoch += 1
    digest = hashlib.sha256(torch.tensor(contexts, dtype=torch.int32).numpy().tobytes()).hexdigest()
    return TokenData(contexts, len(records), dict(Counter(r.kind for r in records)), per_epoch,
                     epoch, digest)
