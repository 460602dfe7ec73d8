"""A steering intervention resolved to tensors at one hook (`Steering`), and the scales it is built
from: the residual norm at the hook and the SAE latent values that move the residual as far as a
direction would.

Two ways to intervene, at any TransformerLens hook point of the residual stream:
  * **clamp**: edit chosen SAE latents with the SAE's error term kept (an unclamped pass is
    unchanged); the residual becomes ``x + decode(z_edited) - decode(z)``.
  * **direction**: add ``alpha x R x direction`` where ``R`` is the mean residual norm at the hook
    on neutral text (first token left out: it is an attention sink ~100x the others), so alpha
    compares across models (the paper moved behaviour at 0.05-0.1 and showed text at 0.5).

Example:
    >>> steering = Steering.from_spec(SteeringSpec(emotions={"happy": 0.3}), model, directions=dirs)
    >>> with steering.applied(model):
    ...     model.generate("Tell me about your day.", max_new_tokens=20)
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..activations import forward_hooks, iter_batches
from ..directions import EmotionDirections
from ..hook_names import same_activation
from ..keys import key_of
from ..neutral import NEUTRAL_TEXTS
from ..sae.load import check_sae
from .attach import SteeringHandle, check_hook, steered
from .spec import OPS, POSITIONS, SteeringError, SteeringSpec

if TYPE_CHECKING:
    from sae_lens import SAE
    from transformer_lens import HookedTransformer

log = logging.getLogger(__name__)


@torch.inference_mode()
def mean_token_norm(forward: Callable[[Tensor], Tensor], tokenizer, texts: Sequence[str], max_tokens: int,
                    batch_tokens: int = 2048) -> float | None:
    """Mean L2 norm of the activations ``forward(tokens)`` returns for ``texts`` (right-padded
    batches), first token and padding left out; None when no text has a token after its first."""
    total, count = 0.0, 0
    for batch in iter_batches(tokenizer, [str(i) for i in range(len(texts))], texts, batch_tokens, max_tokens):
        acts = forward(batch.tokens)
        mask = batch.content_mask().to(acts.device)
        total += float(acts.float().norm(dim=-1)[mask].sum())
        count += int(mask.sum())
    return total / count if count else None


def residual_norm(model: HookedTransformer, hook: str, texts: Sequence[str] | None = None,
                  max_tokens: int = 128) -> float:
    """Mean L2 norm of the residual stream at ``hook`` over neutral text, first token left out.

    Cached on the model per (hook, texts). The first position of every text (an attention sink
    with ~100x the norm of the others) and padding are excluded.

    Example:
        >>> residual_norm(model, "blocks.20.hook_resid_post")
    """
    texts = tuple(texts or NEUTRAL_TEXTS)
    check_hook(model, hook)
    cache = getattr(model, "_saefeatures_resid_norms", None)
    if cache is None:
        cache = {}
        object.__setattr__(model, "_saefeatures_resid_norms", cache)
    key = (hook, key_of(list(texts), max_tokens))
    if key not in cache:
        norm = mean_token_norm(lambda tokens: forward_hooks(model, tokens, [hook])[hook], model.tokenizer, texts,
                               max_tokens)
        if norm is None:
            raise SteeringError("The neutral texts for the residual norm have no tokens after the first.")
        cache[key] = norm
        log.info("mean residual norm at %s: %.2f (%d texts)", hook, norm, len(texts))
    return cache[key]



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

    def applied(self, model: HookedTransformer, backend: str = "tl", prompt_len: int | None = None,
                token_mask: Tensor | None = None) -> contextlib.AbstractContextManager[SteeringHandle]:
        """This steering attached to ``model`` (backend 'tl') or its HF twin (backend 'hf') inside the
        ``with`` only; see `steered`.

        Example:
            >>> with steering.applied(model):
            ...     model.generate("Tell me about your day.", max_new_tokens=20)
            >>> with steering.applied(model, backend="hf"):
            ...     hf_twin(model).generate(**enc, max_new_tokens=20)
        """
        return steered(model, self, backend, prompt_len, token_mask)

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
