"""What a latent writes: logit-lens tokens of its decoder vector, and the measured change in the
log-probabilities of emotion words when it is clamped.

Features that fire on an emotion are not always the ones that make the model express it (Arad et
al. 2025), so latents can also be ranked by output. Clamping keeps the SAE's error term: at every
position the residual gets ``(value - a_i(x)) * W_dec[i]``, exactly the change the SAE's output
would see. The forward pass restarts at the layer after the SAE (TransformerLens
``start_at_layer``), and each batch row clamps a different latent, so many latents cost one pass.

Example:
    >>> tokens = logit_lens(model, sae, [123, 456])
    >>> out = output_scores(model, sae, scores, candidates=[123, 456])   # (n_emotions, d_sae)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .. import emotions as emo
from ..activations import forward_hooks
from ..hook_names import layer_of
from ..neutral import EFFECT_PROMPTS


@torch.inference_mode()
def logit_lens(model, sae, latents: Sequence[int], top: int = 10, batch: int = 256) -> dict[int, list[str]]:
    """Top tokens each latent's decoder vector promotes, read through the final norm and unembedding
    (``batch`` latents at a time: each holds a vocabulary-sized row of logits)."""
    latents = [int(i) for i in latents]
    ids = []
    for start in range(0, len(latents), batch):
        W = sae.W_dec[latents[start : start + batch]].detach().to(model.cfg.device, model.cfg.dtype)
        ids += model.unembed(model.ln_final(W[:, None, :]))[:, 0].topk(top, dim=-1).indices.tolist()
    text = {t: model.tokenizer.decode([t]) for t in {t for row in ids for t in row}}
    return {i: [text[t] for t in row] for i, row in zip(latents, ids)}


def emotion_token_ids(tokenizer, name: str) -> list[int]:
    """First tokens of the emotion word and its lemma, with a leading space, lower and capitalised."""
    forms = {name}
    rated = emo.get(name).rated_as if name in emo.NAMES else None
    if rated:
        forms.add(rated)
    ids = set()
    for f in forms:
        for v in (" " + f, " " + f.capitalize()):
            toks = tokenizer(v, add_special_tokens=False).input_ids
            if toks:
                ids.add(toks[0])
    return sorted(ids)


@torch.inference_mode()
def clamp_logprob_shift(model, sae, latents: Sequence[int], values: Tensor, targets: dict[str, list[int]],
                        prompts: Sequence[str] = EFFECT_PROMPTS, batch_latents: int = 32) -> Tensor:
    """(n_latents, n_targets) mean change in log-probability of each target token set when each latent
    is clamped to its value at every position of the prompts (first token left out)."""
    hook = sae.cfg.metadata.hook_name
    layer = layer_of(hook)
    tok = model.tokenizer(list(prompts), add_special_tokens=False, return_tensors="pt", padding=True)
    tokens, mask = tok.input_ids, tok.attention_mask.bool()
    mask[:, 0] = False
    if model.tokenizer.padding_side != "right":
        raise ValueError("clamp_logprob_shift expects a right-padding tokenizer.")
    resid = forward_hooks(model, tokens, [hook])[hook]
    acts = sae.encode(resid.to(sae.device, sae.dtype)).to(resid.dtype).cpu()
    base = model(resid, start_at_layer=layer + 1)
    names = list(targets)
    target_sets = [torch.tensor(targets[n]) for n in names]

    def target_logp(logits: Tensor) -> Tensor:
        # (batch, pos, n_targets): log of the total probability of each target set, masked mean over
        # pos; from the logits and their logsumexp (a full log_softmax would write a vocab-sized copy)
        lse = logits.logsumexp(-1, keepdim=True)
        per = torch.stack([logits[..., t].logsumexp(-1) for t in target_sets], -1) - lse
        m = mask.repeat(logits.shape[0] // mask.shape[0], 1)[..., None]
        return (per * m).sum(1) / m.sum(1)

    base_t = target_logp(base).mean(0)
    out = torch.zeros(len(latents), len(names))
    W = sae.W_dec.detach().to(resid.dtype).cpu()
    n_p = tokens.shape[0]
    for start in tqdm(range(0, len(latents), batch_latents), desc="clamp effects", disable=len(latents) <= batch_latents):
        ids = list(latents[start : start + batch_latents])
        vals = values[start : start + batch_latents].to(resid.dtype)
        a = acts[:, :, ids]  # (P, pos, b)
        delta = (vals[None, None, :] - a)[..., None] * W[ids][None, None]  # (P, pos, b, d)
        x = (resid[:, :, None, :] + delta).permute(2, 0, 1, 3).reshape(-1, *resid.shape[1:])
        shifted = target_logp(model(x, start_at_layer=layer + 1)).view(len(ids), n_p, len(names)).mean(1)
        out[start : start + len(ids)] = shifted - base_t
    return out


def output_scores(model, sae, scores, candidates: Sequence[int], scale: float = 1.0,
                  prompts: Sequence[str] = EFFECT_PROMPTS) -> Tensor:
    """(n_classes, d_sae) output score per scored class and latent: the shift in the class's own word
    log-probability minus the mean shift over all emotion words, when the latent is clamped to
    ``scale`` x its largest activation on the corpus. Latents not in ``candidates`` score 0."""
    names = [c for c in scores.classes if c != "neutral"]
    targets = {n: emotion_token_ids(model.tokenizer, n) for n in names}
    candidates = sorted(set(int(c) for c in candidates))
    values = scale * scores.max[:, candidates].max(0).values
    shift = clamp_logprob_shift(model, sae, candidates, values, targets, prompts)
    rel = shift - shift.mean(1, keepdim=True)
    out = torch.zeros(len(scores.classes), scores.n_latents)
    for j, n in enumerate(names):
        out[scores.index(n), candidates] = rel[:, j]
    return out
