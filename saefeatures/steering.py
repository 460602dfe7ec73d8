"""Steer a model by clamping emotion latents of an SAE or adding emotion directions.

Two ways to intervene, at any TransformerLens hook point of the residual stream:
  * **clamp**: splice the SAE at its hook with its error term kept (an unclamped pass is
    unchanged) and set, add to or scale chosen latents; the residual becomes
    ``x + decode(z_edited) - decode(z)``, the exact error-term-preserving edit.
  * **direction**: add ``alpha x R x direction`` where ``R`` is the mean residual norm at the hook
    on neutral text (first token left out: it is an attention sink ~100x the others), so alpha
    compares across models (the paper moved behaviour at 0.05-0.1 and showed text at 0.5).

Either applies at all positions, prompt positions only, or generated positions only, also while
generating with a KV cache. Two backends run the same `Steering`:
  * ``"hf"`` (fast, default for generation): PyTorch hooks on the HF twin (`models.hf_twin`)
    addressed by TransformerLens hook names (`hf_hooks`), driving transformers' ``generate``.
  * ``"tl"`` (reference): TransformerLens hooks on the HookedTransformer and SAELens' error-term
    splicing (`saes.spliced` + a hook on ``hook_sae_acts_post``).
Greedy outputs of the two agree (tests/test_steering.py).

Example:
    >>> spec = SteeringSpec(emotions={"happy": 0.3})               # direction, all positions
    >>> steering = Steering.from_spec(spec, model, directions=dirs)
    >>> generate_steered(model, steering, ["Tell me about your day."], max_new_tokens=40)
    >>> clamp = Steering.from_spec(SteeringSpec(latents={1234: 8.0}, positions="generated"), model, sae=sae)
    >>> with steered(model, clamp, backend="tl", prompt_len=12):
    ...     logits = model(tokens)
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from . import emotions as emo
from .directions import EmotionDirections
from .errors import UserError
from .files import write_json
from .hf_hooks import PositionState, parse_hook_name, tl_named_hooks
from .rundir import key_of

if TYPE_CHECKING:
    from sae_lens import SAE
    from transformer_lens import HookedTransformer

log = logging.getLogger(__name__)

METHODS = ("direction", "clamp")
OPS = ("set", "add", "scale")
POSITIONS = ("all", "prompt", "generated")
BACKENDS = ("hf", "tl")

NEUTRAL_TEXTS = (
    "The library opens at nine in the morning and closes at six in the evening on weekdays.",
    "To boil an egg, place it in a pot of cold water, bring the water to a boil and wait ten minutes.",
    "The train from the central station to the airport stops at four stations and takes forty minutes.",
    "A spreadsheet is organised in rows and columns; each cell can hold a number, a date or some text.",
    "The recipe needs two cups of flour, one cup of milk, two eggs and a pinch of salt.",
    "Water freezes at zero degrees Celsius and boils at one hundred degrees at sea level.",
    "The meeting has been moved from Tuesday to Thursday, in the same room on the second floor.",
    "Python lists keep their items in order, and the append method adds an item at the end.",
    "The museum has three floors: paintings on the first, sculpture on the second, maps on the third.",
    "Most bicycles have two wheels, a chain, a set of pedals and brakes on the handlebars.",
    "The report lists the monthly rainfall for each region, measured in millimetres.",
    "A standard deck has fifty-two cards in four suits: hearts, diamonds, clubs and spades.",
    "The bus leaves every fifteen minutes from the stop across the street from the bank.",
    "To change the password, open the settings page, choose security, and follow the steps.",
    "The bridge is four hundred metres long and was painted grey during the last repair.",
    "Tomatoes grow best in full sun and need water two or three times a week in summer.",
)
"""Emotionally flat texts the residual norm is measured on when no others are given."""


class SteeringError(UserError):
    """A steering spec cannot be applied; the message says what to change."""


# ---------------------------------------------------------------- the spec (YAML / CLI)


@dataclass
class SteeringSpec:
    """One steering intervention as written in a config file or on the command line."""

    emotions: dict[str, float] = field(default_factory=dict)
    """Emotion -> strength, a fraction of the mean residual norm at the hook (0.05-0.1 moves
    behaviour, 0.5 for text demos; negative steers away). With method 'clamp' and op 'scale',
    the factor the emotion's latents are multiplied by."""
    latents: dict[int, float] = field(default_factory=dict)
    """SAE latent id -> value in the SAE's own latent units, applied with `op` (needs an SAE)."""
    method: str = "direction"
    """'direction': add the emotions' directions; 'clamp': edit the emotions' SAE latents."""
    op: str = "set"
    """How latent values apply: 'set' (clamp to), 'add' (add to) or 'scale' (multiply by)."""
    positions: str = "all"
    """Token positions steered: 'all', 'prompt' (prompt tokens only) or 'generated' (new tokens only)."""
    hook: str | None = None
    """TransformerLens hook name; None: the directions' hook, or the SAE's when clamping."""
    clamp_latents: int = 8
    """Latents per emotion when clamping with directions that list none (nearest decoder vectors)."""

    def validate(self) -> "SteeringSpec":
        for name, value, allowed in (("method", self.method, METHODS), ("op", self.op, OPS),
                                     ("positions", self.positions, POSITIONS)):
            if value not in allowed:
                raise SteeringError(f"steering {name} must be one of {', '.join(allowed)}; got '{value}'.")
        for name in self.emotions:
            emo.get(name)  # UnknownEmotionError with suggestions
        bad = [f"{k}={v}" for k, v in self.emotions.items() if not math.isfinite(v)]
        bad += [f"latent {k}={v}" for k, v in self.latents.items() if not math.isfinite(v)]
        if bad:
            raise SteeringError(f"Steering values must be finite numbers; got {', '.join(bad)} "
                                "(e.g. desperate=0.05, calm=-0.1).")
        negative = [k for k in self.latents if k < 0]
        if negative:
            raise SteeringError(f"SAE latent ids are 0 or more; got {negative}.")
        if not self.emotions and not self.latents:
            raise SteeringError("The steering spec names no emotion and no latent: give emotions "
                                "(e.g. desperate=0.05) or latents (e.g. 1234=8).")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: Path | str) -> Path:
        path = Path(path)
        write_json(path, self.to_dict())
        return path

    @classmethod
    def load(cls, path: Path | str) -> "SteeringSpec":
        data = json.loads(Path(path).read_text())
        data["latents"] = {int(k): float(v) for k, v in data.get("latents", {}).items()}
        return cls(**data).validate()


def parse_assignments(items: Sequence[str], key_type: type = str) -> dict[Any, float]:
    """Parse CLI assignments ``["desperate=0.5", "calm=-0.2"]`` into a mapping.

    Example:
        >>> parse_assignments(["desperate=0.5"])
        {'desperate': 0.5}
    """
    out: dict[Any, float] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SteeringError(f"'{item}' is not NAME=VALUE (e.g. desperate=0.5 or 1234=8).")
        try:
            out[key_type(key.strip())] = number = float(value)
        except ValueError:
            raise SteeringError(f"'{item}': expected NAME=NUMBER, e.g. desperate=0.5.") from None
        if not math.isfinite(number):
            raise SteeringError(f"'{item}': the value must be a finite number, e.g. desperate=0.5.")
    return out


# ---------------------------------------------------------------- residual norm


def residual_norm(model: HookedTransformer, hook: str, texts: Sequence[str] | None = None,
                  max_tokens: int = 128) -> float:
    """Mean L2 norm of the residual stream at ``hook`` over neutral text, first token left out.

    Cached on the model per (hook, texts). The first position of every text (an attention sink
    with ~100x the norm of the others) and padding are excluded.

    Example:
        >>> residual_norm(model, "blocks.20.hook_resid_post")
    """
    from .activations import forward_hooks, iter_batches

    texts = tuple(texts or NEUTRAL_TEXTS)
    check_hook(model, hook)
    cache = getattr(model, "_saefeatures_resid_norms", None)
    if cache is None:
        cache = {}
        object.__setattr__(model, "_saefeatures_resid_norms", cache)
    key = (hook, key_of(list(texts), max_tokens))
    if key not in cache:
        total, count = 0.0, 0
        ids = [str(i) for i in range(len(texts))]
        for batch in iter_batches(model.tokenizer, ids, texts, batch_tokens=2048, max_tokens=max_tokens):
            acts = forward_hooks(model, batch.tokens, [hook])[hook]
            mask = batch.content_mask().to(acts.device)
            total += float(acts.float().norm(dim=-1)[mask].sum())
            count += int(mask.sum())
        if count == 0:
            raise SteeringError("The neutral texts for the residual norm have no tokens after the first.")
        cache[key] = total / count
        log.info("mean residual norm at %s: %.2f (%d tokens)", hook, cache[key], count)
    return cache[key]


def check_hook(model: HookedTransformer, hook: str) -> str:
    """The hook name if the HookedTransformer has it, else a clear error with examples."""
    if hook not in model.hook_dict:
        n = model.cfg.n_layers
        raise SteeringError(
            f"Hook '{hook}' does not exist in {model.cfg.model_name}. Use a TransformerLens hook name "
            f"such as blocks.L.hook_resid_post or blocks.L.hook_resid_pre with L in 0..{n - 1}."
        )
    return hook


# ---------------------------------------------------------------- the resolved intervention


@dataclass
class Steering:
    """A steering intervention resolved to tensors at one hook, ready to attach.

    Per-row tensors (first axis 1, or one row per sequence of the batch) let one batch carry
    several strengths; rows with ``active`` False are left untouched.
    """

    hook: str
    positions: str = "all"
    vector: Float[Tensor, "rows d_model"] | None = None
    """Added to the residual (absolute units: already scaled by strength x residual norm)."""
    sae: Any = None
    latent_ids: Int[Tensor, " n"] | None = None
    latent_values: Float[Tensor, "rows n"] | None = None
    op: str = "set"
    active: torch.Tensor | None = None
    """Bool per row: False rows are not steered (None: all rows)."""
    label: str = ""
    """What this steers, for logs and plots (e.g. 'happy=0.3 direction')."""

    def __post_init__(self) -> None:
        if self.positions not in POSITIONS:
            raise SteeringError(f"positions must be one of {', '.join(POSITIONS)}; got '{self.positions}'.")
        if self.op not in OPS:
            raise SteeringError(f"op must be one of {', '.join(OPS)}; got '{self.op}'.")
        if self.vector is not None and self.vector.ndim == 1:
            self.vector = self.vector[None]
        if self.latent_ids is not None:
            if self.sae is None:
                raise SteeringError("Latent edits need an SAE: pass sae=load_sae(...).")
            d_sae = self.sae.cfg.d_sae
            bad = [int(i) for i in self.latent_ids if not 0 <= int(i) < d_sae]
            if bad:
                raise SteeringError(f"Latent id(s) {bad} out of range for this SAE (d_sae {d_sae}): use 0..{d_sae - 1}.")
            if self.latent_values is None or self.latent_values.shape[-1] != len(self.latent_ids):
                raise SteeringError("latent_values must have one column per latent id.")
            if self.latent_values.ndim == 1:
                self.latent_values = self.latent_values[None]

    @property
    def n_rows(self) -> int:
        rows = [t.shape[0] for t in (self.vector, self.latent_values, self.active) if t is not None]
        return max(rows, default=1)

    @property
    def has_latents(self) -> bool:
        return self.latent_ids is not None and len(self.latent_ids) > 0

    # ---- building

    @classmethod
    def from_spec(
        cls,
        spec: SteeringSpec,
        model: HookedTransformer,
        directions: EmotionDirections | None = None,
        sae: SAE | None = None,
        norm: float | None = None,
        norm_texts: Sequence[str] | None = None,
    ) -> "Steering":
        """Resolve a spec against directions (for emotions), an SAE (for latents) and the model.

        Args:
            spec: what to steer.
            model: the HookedTransformer (hook names, residual norm).
            directions: emotion directions; their ``latents`` are clamped with method 'clamp'
                (directions without latents: the SAE latents whose decoder vectors are nearest).
            sae: SAELens SAE for clamping or raw latents, spliced at its own hook.
            norm: residual norm at the hook; None: measured on ``norm_texts`` (cached).
        """
        spec.validate()
        from .saes import check_sae, same_activation

        clamping = spec.method == "clamp" and bool(spec.emotions) or bool(spec.latents)
        if clamping and sae is None:
            raise SteeringError("Clamping latents needs an SAE: pass sae=load_sae(...) (CLI: --sae PATH).")
        if spec.emotions and directions is None:
            raise SteeringError("Steering by emotion name needs emotion directions: pass directions= "
                                "(CLI: --directions RUN/directions/dense).")
        hook = spec.hook
        if clamping:
            check_sae(sae, model)
            sae_hook = sae.cfg.metadata.hook_name
            if hook is not None and not same_activation(hook, sae_hook):
                raise SteeringError(f"The SAE reads '{sae_hook}' but the spec steers '{hook}'; latents can "
                                    "only be edited at the SAE's hook.")
            hook = sae_hook
        hook = check_hook(model, hook or (directions.hook if directions is not None else ""))
        if directions is not None and spec.emotions and not same_activation(directions.hook, hook):
            raise SteeringError(f"The directions were built at '{directions.hook}', not at '{hook}'; "
                                "steer at the directions' hook or load directions built there.")
        if directions is not None and directions.d_model != model.cfg.d_model:
            raise SteeringError(f"Directions have d_model {directions.d_model}, the model {model.cfg.d_model}: "
                                "they were built on another model.")
        vector = None
        values: dict[int, float] = {}
        scale = None
        if spec.emotions and (spec.method == "direction" or spec.op != "scale"):
            scale = norm if norm is not None else residual_norm(model, hook, norm_texts)
        for name, strength in spec.emotions.items():
            if spec.method == "direction":
                v = directions.vector(name).float() * strength * scale
                vector = v if vector is None else vector + v
            else:
                for i, value in emotion_latent_values(directions, name, sae, strength, scale,
                                                      spec.op, spec.clamp_latents).items():
                    values[i] = values[i] * value if spec.op == "scale" and i in values else values.get(i, 0.0) + value
        for i, value in spec.latents.items():
            values[i] = values[i] * value if spec.op == "scale" and i in values else values.get(i, 0.0) + value
        label = ", ".join([f"{k}={v:g}" for k, v in spec.emotions.items()] +
                          [f"#{k}={v:g}" for k, v in spec.latents.items()]) + f" {spec.method}"
        ids = torch.tensor(sorted(values), dtype=torch.long) if values else None
        vals = torch.tensor([values[int(i)] for i in ids], dtype=torch.float32) if values else None
        return cls(hook=hook, positions=spec.positions, vector=vector, sae=sae if values else None,
                   latent_ids=ids, latent_values=vals, op=spec.op, label=label)

    @classmethod
    def stack(cls, rows: Sequence["Steering | None"], repeat: int = 1) -> "Steering":
        """One Steering whose rows are ``rows`` (each repeated ``repeat`` times); None rows are unsteered.

        The rows must share hook, positions, op, SAE and latent ids (e.g. one emotion at several
        strengths), so a single batch can carry a whole dose-response curve.
        """
        real = [r for r in rows if r is not None]
        if not real:
            raise SteeringError("Steering.stack needs at least one steering row.")
        ref = real[0]
        for r in real[1:]:
            same_ids = (r.latent_ids is None and ref.latent_ids is None) or (
                r.latent_ids is not None and ref.latent_ids is not None and torch.equal(r.latent_ids, ref.latent_ids))
            if (r.hook, r.positions, r.op) != (ref.hook, ref.positions, ref.op) or r.sae is not ref.sae or not same_ids:
                raise SteeringError("Steering.stack: rows differ in hook, positions, op, SAE or latent ids.")
            if r.n_rows != 1:
                raise SteeringError("Steering.stack takes single-row steerings.")
        d = next((r.vector.shape[1] for r in real if r.vector is not None), None)
        vectors, values, active = [], [], []
        for r in rows:
            for _ in range(repeat):
                active.append(r is not None)
                if d is not None:
                    vectors.append(r.vector[0] if r is not None and r.vector is not None else torch.zeros(d))
                if ref.latent_ids is not None:
                    values.append(r.latent_values[0] if r is not None else torch.zeros(len(ref.latent_ids)))
        return replace(ref, vector=torch.stack(vectors) if vectors else None,
                       latent_values=torch.stack(values) if values else None,
                       active=torch.tensor(active), label="stacked: " + ref.label)

    def take(self, start: int, stop: int) -> "Steering":
        """Rows ``start:stop`` of a per-row steering (single-row steerings are returned as they are)."""
        if self.n_rows == 1:
            return self

        def cut(t: Tensor | None) -> Tensor | None:
            return None if t is None or t.shape[0] == 1 else t[start:stop]
        return replace(self, vector=cut(self.vector), latent_values=cut(self.latent_values), active=cut(self.active))

    # ---- applying

    def edit_latents(self, z: Float[Tensor, "batch pos d_sae"], mask: Tensor | None) -> Tensor:
        """The latents with the chosen ones set / added to / scaled where ``mask`` [batch|1, pos] is True."""
        if not self.has_latents:
            return z
        ids = self.latent_ids.to(z.device)
        vals = self.latent_values.to(z.device, z.dtype)[:, None, :]  # rows, 1, n
        sel = z[..., ids]
        new = vals if self.op == "set" else sel + vals if self.op == "add" else sel * vals
        new = torch.broadcast_to(new, sel.shape)
        mask = self._row_mask(mask, z)
        if mask is not None:
            new = torch.where(mask[..., None], new, sel)
        out = z.clone()
        out[..., ids] = new
        return out

    def apply(self, resid: Float[Tensor, "batch pos d_model"], mask: Tensor | None) -> Tensor:
        """The steered residual: latent edit through the SAE (error term kept), then the vector."""
        out = resid
        if self.has_latents:
            x = resid.to(self.sae.dtype if hasattr(self.sae, "dtype") else resid.dtype)
            z = self.sae.encode(x)
            z_new = self.edit_latents(z, mask)
            out = resid + (self.sae.decode(z_new) - self.sae.decode(z)).to(resid.dtype)
        if self.vector is not None:
            delta = self.vector.to(resid.device, resid.dtype)[:, None, :]  # rows, 1, d
            m = self._row_mask(mask, resid)
            if m is not None:
                delta = delta * m[..., None].to(resid.dtype)
            out = out + delta
        return out

    def _row_mask(self, mask: Tensor | None, like: Tensor) -> Tensor | None:
        if self.active is None or bool(self.active.all()):
            return mask
        rows = self.active.to(like.device)[:, None]
        return rows if mask is None else mask.to(like.device) & rows


# ---------------------------------------------------------------- emotions -> latents


def emotion_latents(directions: EmotionDirections, name: str, sae: SAE | None = None,
                    k: int = 8) -> list[tuple[int, float]]:
    """(latent id, weight) pairs behind an emotion: the directions' own, else the SAE's nearest.

    SAE-assembled directions list the latents they were built from; for dense directions the k
    latents whose unit decoder vectors have the largest positive cosine with the direction are
    used, weighted by that cosine.
    """
    own = directions.latents.get(name) if directions.latents else None
    directions.index(name)
    if own:
        return [(int(i), float(w)) for i, w in own]
    if sae is None:
        raise SteeringError(f"The directions list no latents for '{name}' and no SAE was given to pick them.")
    w_dec = sae.W_dec.detach().float()
    cos = torch.nn.functional.normalize(w_dec, dim=1) @ directions.vector(name).float().to(w_dec.device)
    top = cos.topk(min(k, len(cos)))
    picked = [(int(i), float(c)) for c, i in zip(top.values, top.indices) if c > 0]
    log.debug("'%s': clamping the %d SAE latents nearest to its %s direction (cosine %.2f-%.2f)", name,
             len(picked), directions.recipe, picked[-1][1] if picked else 0, picked[0][1] if picked else 0)
    return picked


def emotion_latent_values(directions: EmotionDirections, name: str, sae: SAE, strength: float,
                          norm: float | None, op: str = "set", k: int = 8) -> dict[int, float]:
    """Latent values that steer ``name`` at ``strength`` in residual-norm units.

    With weights w_i and decoder rows d_i, value_i = strength x norm x w_i / (|d_i| x |sum_j w_j d_j/|d_j||),
    so adding the values moves the residual by exactly strength x norm along the assembled unit
    direction: the same scale as direction steering. With op 'scale' every value is ``strength``.
    """
    pairs = emotion_latents(directions, name, sae, k)
    if not pairs:
        raise SteeringError(f"No SAE latent points along '{name}'; use method 'direction'.")
    if op == "scale":
        return {i: strength for i, _ in pairs}
    ids = torch.tensor([i for i, _ in pairs])
    w = torch.tensor([w for _, w in pairs], dtype=torch.float32)
    d = sae.W_dec.detach().float()[ids].cpu()
    dn = d.norm(dim=1).clamp(min=1e-8)
    u = (w[:, None] * d / dn[:, None]).sum(0)
    vals = strength * norm * w / (dn * u.norm().clamp(min=1e-8))
    return {int(i): float(v) for i, v in zip(ids, vals)}


# ---------------------------------------------------------------- attaching


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
    steerings = [steering] if isinstance(steering, Steering) else list(steering)
    if backend not in BACKENDS:
        raise SteeringError(f"backend must be one of {', '.join(BACKENDS)}; got '{backend}'.")
    saes = [id(s.sae) for s in steerings if s.has_latents]
    if len(saes) != len(set(saes)):
        raise SteeringError("Two steerings clamp the same SAE: merge them into one SteeringSpec.")
    handle = SteeringHandle(steerings, backend, prompt_len, token_mask)
    if backend == "hf":
        from .models import hf_twin

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
    from .saes import spliced

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


# ---------------------------------------------------------------- generation


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
    from .models import chat_prompt

    return [chat_prompt(tokenizer, [{"role": "user", "content": p}]) for p in prompts]


def _left_pad(tokenizer: Any, texts: Sequence[str]) -> dict[str, Tensor]:
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
        enc = _left_pad(tok, texts[start:stop])
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
    from .generation import sampling_kwargs
    from .models import hf_twin

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
    twin; 'tl' runs TransformerLens' ``generate`` (the reference, ~4x slower on CPU).

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
