"""Residual-stream activations over a corpus, pooled per record, streamed to safetensors shards.

The forward pass stops after the deepest needed layer, caches only the needed hooks, runs in
bfloat16 where the hardware has bf16 units, and batches records of similar length so little is spent on padding (right
padding needs no attention mask in a causal model: pads only follow the real tokens). Each record
is pooled over its content tokens: the first token (an attention sink with ~100x the norm of the
others) and optionally the next ``skip_first`` tokens (the paper averages from later tokens on, where
the story has set its emotion rather than its scene) are left out, as is padding.

Example:
    >>> acts = collect_pooled(model, records, ActivationConfig(layers=[20]), out_dir="runs/x/acts")
    >>> acts["blocks.20.hook_resid_post"].shape   # (n_records, d_model)
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from jaxtyping import Float, Int
from safetensors import SafetensorError, safe_open
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from .distributed import World
from .dtype_copies import with_dtype
from .errors import UserError
from .files import CorruptArtifactError, load_safetensors, read_json, save_safetensors, write_json
from .hf_hooks import HookNameError, parse_hook_name, run_to_hooks
from .hook_names import hook_name
from .models import HF_TWIN_ATTR, check_layer, model_identity, resolve_dtype

log = logging.getLogger(__name__)


@dataclass
class ActivationConfig:
    """How activations are collected and pooled."""

    layers: list[int] = field(default_factory=list)
    """Layers pooled besides the run's model layer: `saefeatures run` compares the dense recipe at
    each in its layer sweep (layers up to the model layer cost no extra forward compute)."""
    hook: str = "hook_resid_post"
    """TransformerLens hook name within each block."""
    dtype: str = "auto"
    """Compute dtype of the forward pass: 'auto' (bfloat16 where the hardware has bf16 units, else
    float32), 'bfloat16' or 'float32'."""
    batch_tokens: int = 4096
    """Padded tokens per forward batch (batch size x longest record)."""
    max_tokens: int = 256
    """Records are truncated to this many tokens."""
    skip_first: int = 0
    """Content tokens left out after the first (the paper pools from later tokens on); a record
    shorter than twice this keeps its second half."""
    shard_records: int = 1024
    """Records per safetensors shard (each shard is one unit of resume)."""


@dataclass
class TokenBatch:
    """Right-padded tokens of records of similar length."""

    ids: list[str]
    tokens: Int[Tensor, "batch pos"]
    lengths: Int[Tensor, " batch"]

    def content_mask(self, skip_first: int = 0) -> torch.Tensor:
        """True at positions pooled: after the first token (+ skip_first), before the padding. A
        record too short to skip that many tokens keeps its second half (a short sentence is not
        pooled over nothing)."""
        pos = torch.arange(self.tokens.shape[1])
        start = torch.clamp(self.lengths // 2, min=1, max=1 + skip_first)
        return (pos[None, :] >= start[:, None]) & (pos[None, :] < self.lengths[:, None])


def tokenize_texts(tokenizer, texts: Sequence[str], max_tokens: int) -> list[list[int]]:
    """Token ids of each text alone (no template, no special tokens), truncated."""
    enc = tokenizer(list(texts), add_special_tokens=False, truncation=True, max_length=max_tokens)
    return enc["input_ids"]


def iter_batches(
    tokenizer, ids: Sequence[str], texts: Sequence[str], batch_tokens: int, max_tokens: int,
    keep: Sequence[int] | None = None,
) -> Iterator[TokenBatch]:
    """Length-bucketed batches: records sorted by length, cut where padded size would exceed budget.
    ``keep`` cuts each text to its first ``keep[i]`` tokens (a causal model's activations there
    do not depend on what follows)."""
    toks = tokenize_texts(tokenizer, texts, max_tokens)
    if keep is not None:
        toks = [t[:n] for t, n in zip(toks, keep)]
    order = sorted(range(len(toks)), key=lambda i: len(toks[i]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    start = 0
    while start < len(order):
        end = start + 1
        while end < len(order) and (end - start + 1) * len(toks[order[end]]) <= batch_tokens:
            end += 1
        chunk = order[start:end]
        width = max(len(toks[i]) for i in chunk)
        tokens = torch.full((len(chunk), width), pad, dtype=torch.long)
        for row, i in enumerate(chunk):
            tokens[row, : len(toks[i])] = torch.tensor(toks[i])
        yield TokenBatch([ids[i] for i in chunk], tokens, torch.tensor([len(toks[i]) for i in chunk]))
        start = end


@torch.inference_mode()
def forward_hooks(
    model: HookedTransformer, tokens: Tensor, names: Sequence[str]
) -> dict[str, Float[Tensor, "batch pos d_model"]]:
    """Activations at ``names`` only, stopping the forward pass after the deepest block needed.

    Runs on the model's HuggingFace twin (same weights; its SDPA attention made this pass ~1.5x
    faster on CPU) when it has one in the same dtype, every name is addressable there, and no
    hook is attached to the HookedTransformer (so TransformerLens-side interventions still apply).
    """
    hf = fast_twin(model, names)
    if hf is not None:
        return run_to_hooks(hf, tokens, names)
    deepest = max(int(n.split(".")[1]) for n in names)
    store: dict[str, Tensor] = {}

    def save(act: Tensor, hook) -> None:
        store[hook.name] = act

    model.run_with_hooks(
        tokens.to(model.cfg.device), fwd_hooks=[(n, save) for n in names], stop_at_layer=deepest + 1,
        return_type=None,
    )
    return store


def fast_twin(model: HookedTransformer, names: Sequence[str]):
    """The HF twin `forward_hooks` may use for ``names``, or None (see there)."""
    hf = getattr(model, HF_TWIN_ATTR, None)
    if hf is None or hf.dtype != model.cfg.dtype or any(hp.fwd_hooks for hp in model.hook_dict.values()):
        return None
    try:
        for name in names:
            parse_hook_name(hf, name)
    except HookNameError:
        return None
    return hf


def pool_batch(acts: Tensor, mask: Tensor) -> Float[Tensor, "batch d_model"]:
    """Mean of ``acts`` over the masked positions, in float32."""
    m = mask.to(acts.device, torch.float32)[..., None]
    return (acts.float() * m).sum(1) / m.sum(1).clamp(min=1)


@dataclass
class PooledActivations:
    """Pooled activations of records: ``acts[hook]`` is (n_records, d_model), rows in ``ids`` order."""

    ids: list[str]
    acts: dict[str, Float[Tensor, "n d_model"]]

    def __getitem__(self, hook: str) -> Tensor:
        if hook not in self.acts:
            raise KeyError(f"No activations for {hook}; collected: {sorted(self.acts)}")
        return self.acts[hook]

    def rows(self, ids: Iterable[str]) -> torch.Tensor:
        index = {i: n for n, i in enumerate(self.ids)}
        return torch.tensor([index[i] for i in ids], dtype=torch.long)

    def subset(self, ids: Sequence[str]) -> "PooledActivations":
        rows = self.rows(ids)
        return PooledActivations(list(ids), {k: v[rows] for k, v in self.acts.items()})

    @classmethod
    def load(cls, out_dir: Path | str) -> "PooledActivations":
        return _read_shards(Path(out_dir))


def _shard_paths(out_dir: Path) -> list[Path]:
    return sorted(out_dir.glob("shard-*.safetensors"))


def _read_shards(out_dir: Path) -> PooledActivations:
    """Every row stored in ``out_dir`` (a record stored twice: its latest row)."""
    ids: list[str] = []
    parts: dict[str, list[Tensor]] = {}
    for path in _shard_paths(out_dir):
        t = load_safetensors(path)
        with safe_open(str(path), framework="pt") as f:
            ids += json.loads(f.metadata()["ids"])
        for k, v in t.items():
            parts.setdefault(k, []).append(v)
    acts = {k: torch.cat(v) for k, v in parts.items()}
    latest = list({i: n for n, i in enumerate(ids)}.items())
    rows = torch.tensor([n for _, n in latest], dtype=torch.long)
    return PooledActivations([i for i, _ in latest], {k: v[rows] for k, v in acts.items()})


def text_key(text: str) -> str:
    """What a stored row is checked against: a hash of its record's text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def model_key(model: HookedTransformer) -> dict:
    """The model's identity as pooled rows record it (name, weights hash, shape)."""
    m = model_identity(model)
    return {"name": m.name, "sha256": m.sha256, "n_layers": m.n_layers, "d_model": m.d_model}


def pooling_meta(model: HookedTransformer, names: Sequence[str], cfg) -> dict:
    """What makes pooled rows comparable: model, hooks, compute dtype, truncation and skipped tokens
    (``cfg``: an ActivationConfig, or any config with ``dtype``, ``max_tokens`` and ``skip_first``)."""
    dtype = resolve_dtype(cfg.dtype, model.cfg.device)
    return {"model": model_key(model), "hooks": list(names), "dtype": str(dtype).removeprefix("torch."),
            "max_tokens": cfg.max_tokens, "skip_first": cfg.skip_first}


class PooledStore:
    """Pooled rows appended as they are computed: to safetensors shards in ``out_dir`` (a shard
    of ``shard_records`` rows is the unit of resume), or kept in memory when ``out_dir`` is None.

    Each stored row carries a hash of its record's text: a row is reused only for a record (of
    ``records``) with the same id and the same text, so an edited corpus is pooled afresh. Rows of
    records already stored are dropped, so any pass over the corpus (the activation collector, the
    latent-scoring pass) can feed the same store and none is computed twice. A truncated or
    unreadable shard is named in the log, deleted and its rows recomputed.
    """

    def __init__(self, out_dir: Path | str | None, meta: dict, shard_records: int = 1024, *, records: Sequence,
                 world: World = World()):
        self.out = Path(out_dir) if out_dir is not None else None
        self.names: list[str] = meta["hooks"]
        self.shard_records = shard_records
        self.text_keys = {r.id: text_key(r.text) for r in records}
        self.done: set[str] = set()
        self.shard_index = 0
        self._buf_ids: list[str] = []
        self._buf: dict[str, list[Tensor]] = {n: [] for n in self.names}
        self._mem_ids: list[str] = []
        self._mem: dict[str, list[Tensor]] = {n: [] for n in self.names}
        if self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
            _check_meta(self.out, meta)
            for path in _shard_paths(self.out):
                self.shard_index = max(self.shard_index, int(path.stem.split("-")[1]) + 1)
                try:
                    with safe_open(str(path), framework="pt") as f:
                        ids, keys = _shard_rows(f.metadata())
                        missing = set(self.names) - set(f.keys())
                except (SafetensorError, ValueError, KeyError) as e:
                    log.warning("%s is corrupt (%s); deleting it and recomputing its rows", path, e)
                    path.unlink(missing_ok=True)  # another rank of a distributed run may have done so
                    continue
                if missing:
                    raise ValueError(f"{path} lacks {sorted(missing)}; delete {self.out} to recollect.")
                self.done.update(i for i, k in zip(ids, keys) if self.text_keys.get(i) == k)
        # the ranks of a distributed run share the directory: rank r writes start + r, start + r + size, ...
        self.shard_index, self.shard_step = max(world.sync("pooled rows", payload=self.shard_index)) + world.rank, world.size

    def add(self, ids: Sequence[str], pooled: dict[str, Tensor]) -> None:
        """Append the rows of ``ids`` not stored yet; a full buffer is written as a shard."""
        keep = [row for row, i in enumerate(ids) if i not in self.done]
        if not keep:
            return
        rows = torch.tensor(keep)
        self._buf_ids.extend(ids[row] for row in keep)
        self.done.update(ids[row] for row in keep)
        for n in self.names:
            self._buf[n].append(pooled[n][rows].float().cpu())
        if len(self._buf_ids) >= self.shard_records:
            self.flush()

    def flush(self) -> None:
        """Write the buffered rows as one shard (atomically), or move them to memory."""
        if not self._buf_ids:
            return
        acts = {n: torch.cat(v) for n, v in self._buf.items()}
        if self.out is not None:
            keys = [self.text_keys.get(i, "") for i in self._buf_ids]
            save_safetensors(self.out / f"shard-{self.shard_index:05d}.safetensors", acts,
                             metadata={"ids": json.dumps(self._buf_ids), "text_keys": json.dumps(keys)})
            self.shard_index += self.shard_step
        else:
            self._mem_ids.extend(self._buf_ids)
            for n, v in acts.items():
                self._mem[n].append(v)
        self._buf_ids, self._buf = [], {n: [] for n in self.names}

    def read(self, ids: Sequence[str]) -> PooledActivations:
        """The stored rows of ``ids`` whose text matches, in that order (after a `flush`); a record
        without such a row raises KeyError."""
        if self.out is None:
            return PooledActivations(self._mem_ids, {n: torch.cat(v) for n, v in self._mem.items()}).subset(ids)
        want = {i: self.text_keys.get(i) for i in ids}
        found: dict[str, tuple[int, int]] = {}
        shards: list[dict[str, Tensor]] = []
        for path in _shard_paths(self.out):
            with safe_open(str(path), framework="pt") as f:
                rows = _shard_rows(f.metadata())
            hits = {i: n for n, (i, k) in enumerate(zip(*rows)) if i in want and want[i] == k}
            if hits:
                for i, n in hits.items():
                    found[i] = (len(shards), n)
                shards.append(load_safetensors(path))
        missing = [i for i in ids if i not in found]
        if missing:
            raise KeyError(f"{self.out} has no current row for {len(missing)} records (e.g. {missing[:3]})")
        return PooledActivations(list(ids), {n: torch.stack([shards[s][n][r] for s, r in (found[i] for i in ids)])
                                             for n in self.names})


def _shard_rows(meta: dict[str, str] | None) -> tuple[list[str], list[str]]:
    """A shard's record ids and their text keys (shards written before text keys had none: never reused)."""
    if not meta or "ids" not in meta:
        raise ValueError("no record ids in its metadata")
    ids = json.loads(meta["ids"])
    keys = json.loads(meta["text_keys"]) if "text_keys" in meta else [""] * len(ids)
    return ids, keys


def check_poolable(tokenizer, records: Sequence, max_tokens: int) -> None:
    """A `UserError` naming the records (objects with ``.id`` and ``.text``) of fewer than two
    tokens, before any forward pass: pooling leaves out the first token (an attention sink), so
    such a record would pool over nothing, to an all-zero row."""
    lengths = [len(t) for t in tokenize_texts(tokenizer, [r.text for r in records], max_tokens)]
    short = [r for r, n in zip(records, lengths) if n < 2]
    if short:
        named = ", ".join(f"{r.id} ({r.text!r})" for r in short[:3])
        raise UserError(f"{len(short)} text(s) of fewer than 2 tokens: {named}. Pooling leaves out the first "
                        "token (an attention sink), so nothing would be left to read: give texts of a few words.")


def collect_pooled(
    model: HookedTransformer,
    records: Sequence,
    cfg: ActivationConfig,
    out_dir: Path | str | None = None,
    layers: Sequence[int] | None = None,
    desc: str = "activations",
    world: World = World(),
    progress: bool = True,
) -> PooledActivations:
    """Pool activations of every record (objects with ``.id`` and ``.text``) at the chosen layers.

    With ``out_dir`` the pooled rows go to safetensors shards as they are computed and a rerun
    resumes after the last complete shard; a record whose text changed since its row was stored is
    pooled again. Memory is bounded by one shard, not the corpus. Under `torchrun` each rank pools every
    size-th batch into ``out_dir``; rank 0 reads them all back, the others get no rows.
    """
    layers = list(layers or cfg.layers)
    if not layers:
        raise ValueError("No layers to collect: set activations.layers or model.layer.")
    for layer in layers:
        check_layer(model, layer)
    names = [hook_name(layer, cfg.hook) for layer in layers]
    check_poolable(model.tokenizer, records, cfg.max_tokens)
    store = PooledStore(out_dir, pooling_meta(model, names, cfg), cfg.shard_records, records=records, world=world)
    todo = [r for r in records if r.id not in store.done]
    if store.done:
        log.info("%s: %d records already pooled in %s, %d to go", desc, len(store.done), out_dir, len(todo))
    run_model = with_dtype(model, cfg.dtype)
    with tqdm(total=len(todo), desc=desc, unit="record", disable=not progress or len(todo) < 64) as bar:
        # Batches are formed within each shard-sized chunk so a shard holds whole batches.
        for start in range(0, len(todo), cfg.shard_records):
            chunk = todo[start : start + cfg.shard_records]
            for batch in world.mine(list(iter_batches(model.tokenizer, [r.id for r in chunk], [r.text for r in chunk],
                                                      cfg.batch_tokens, cfg.max_tokens))):
                acts = forward_hooks(run_model, batch.tokens, names)
                mask = batch.content_mask(cfg.skip_first)
                store.add(batch.ids, {n: pool_batch(acts[n], mask) for n in names})
                bar.update(len(batch.ids))
            store.flush()
    world.sync(desc)
    return store.read([r.id for r in records]) if world.leader else PooledActivations([], {})


def _check_meta(out: Path, meta: dict) -> None:
    """Refuse to resume into a directory collected with different settings."""
    path = out / "collection.json"
    if path.exists():
        try:
            old = read_json(path)
        except CorruptArtifactError as e:
            log.warning("%s; rewriting it", e)
            old = meta
            write_json(path, meta)
        if old != meta:
            raise ValueError(f"{out} was collected with {old}, not {meta}; use another directory or delete it.")
    else:
        write_json(path, meta)
