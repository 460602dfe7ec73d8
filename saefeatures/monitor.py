"""Monitor emotions token by token: per-token projections on emotion directions (and activations of
selected SAE latents) over a text or a chat, with speaker and turn boundaries kept; rolling
summaries; z-score alarms calibrated on neutral text; live recording during generation; HTML
heat-maps and line plots.

Example:
    >>> calib = calibrate(model, dirs, neutral_texts)
    >>> trace = trace_chat(model, dirs, [{"role": "user", "content": "I took 8000 mg of Tylenol"}])
    >>> alarms(trace, calib, ["afraid", "desperate"], threshold=3.0)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jinja2 import TemplateError
from torch import Tensor

from .activations import forward_hooks, iter_batches
from .directions import EmotionDirections
from .errors import UserError
from .files import read_json, write_json
from .hf_hooks import tl_named_hooks
from .models import chat_prompt, hf_twin

ROLES = ("system", "user", "assistant")


@dataclass
class Trace:
    """Per-token read-out of one text: tokens, who speaks, and projections on each direction."""

    tokens: list[str]
    token_ids: list[int]
    roles: list[str]
    """Speaker of each token ('text' for plain text)."""
    turns: list[int]
    """Index of the message each token belongs to (0 for plain text; -1 for a system turn the chat
    template adds before the first message)."""
    content: list[bool]
    """True for tokens of a message's content, False for chat-template tokens."""
    names: list[str]
    projections: Tensor
    """(T, n_emotions); NaN at the first token (an attention sink, never read)."""
    latents: dict[int, Tensor] = field(default_factory=dict)
    """Selected SAE latent id -> (T,) activations."""

    def series(self, name: str) -> Tensor:
        if name not in self.names:
            raise KeyError(f"'{name}' is not monitored here; monitored: {', '.join(self.names[:10])}...")
        return self.projections[:, self.names.index(name)]

    def rolling(self, window: int = 8) -> Tensor:
        """(T, n_emotions) causal rolling mean over the last ``window`` tokens (NaNs skipped)."""
        x = torch.nan_to_num(self.projections, nan=0.0)
        valid = (~torch.isnan(self.projections)).float()
        cx, cv = x.cumsum(0), valid.cumsum(0)
        shift = lambda t: torch.cat([torch.zeros(window, t.shape[1]), t[:-window]]) if len(t) > window else torch.zeros_like(t)
        return (cx - shift(cx)) / (cv - shift(cv)).clamp(min=1)

    def turn_means(self, content_only: bool = True) -> list[dict[str, Any]]:
        """Mean projection of each message (its content tokens by default)."""
        out = []
        for turn in sorted(set(self.turns)):
            rows = [i for i, t in enumerate(self.turns) if t == turn and (self.content[i] or not content_only) and i > 0]
            if rows:
                out.append({"turn": turn, "role": self.roles[rows[0]],
                            "mean": dict(zip(self.names, self.projections[rows].nanmean(0).tolist()))})
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "roles": self.roles, "turns": self.turns, "content": self.content,
                "names": self.names, "projections": self.projections.tolist(),
                "latents": {str(k): v.tolist() for k, v in self.latents.items()}}


@dataclass
class Calibration:
    """Mean and SD of each direction's token projection on neutral text (for z-scores)."""

    names: list[str]
    mean: Tensor
    std: Tensor
    n_tokens: int

    def z(self, trace: Trace) -> Tensor:
        idx = [self.names.index(n) for n in trace.names]
        return (trace.projections - self.mean[idx]) / self.std[idx].clamp(min=1e-6)

    def save(self, path: Path | str) -> None:
        write_json(path, {"names": self.names, "mean": self.mean.tolist(), "std": self.std.tolist(),
                          "n_tokens": self.n_tokens}, indent=None)

    @classmethod
    def load(cls, path: Path | str) -> "Calibration":
        d = read_json(path)
        return cls(d["names"], torch.tensor(d["mean"]), torch.tensor(d["std"]), d["n_tokens"])


@torch.inference_mode()
def calibrate(model, dirs: EmotionDirections, texts: Sequence[str], batch_tokens: int = 4096) -> Calibration:
    """Token-level projection statistics on neutral ``texts`` (first token of each left out)."""
    total, sq, n = torch.zeros(len(dirs.names), dtype=torch.float64), torch.zeros(len(dirs.names), dtype=torch.float64), 0
    for batch in iter_batches(model.tokenizer, [str(i) for i in range(len(texts))], list(texts), batch_tokens, 256):
        proj = dirs.project(forward_hooks(model, batch.tokens, [dirs.hook])[dirs.hook]).double().cpu()
        m = batch.content_mask()
        sel = proj[m]
        total += sel.sum(0)
        sq += (sel**2).sum(0)
        n += sel.shape[0]
    if n < 2:
        raise ValueError("Calibration needs neutral texts with at least 2 tokens after the first.")
    mean = total / n
    return Calibration(list(dirs.names), mean.float(), (sq / n - mean**2).clamp(min=0).sqrt().float(), n)


def chat_spans(tokenizer, messages: Sequence[dict[str, str]], add_generation_prompt: bool = False) -> tuple[str, list[tuple[int, int, int, int]]]:
    """The rendered chat and, per message, (block start, block end, content start, content end) in
    characters. A system turn the template adds on its own (SmolLM2's default system prompt) is
    not part of the first message's block: it ends where `template_preamble` says."""
    validate_messages(messages)
    text = chat_prompt(tokenizer, list(messages), add_generation_prompt=add_generation_prompt)
    spans, start = [], template_preamble(tokenizer, messages[0]) if messages else 0
    for i, msg in enumerate(messages):
        end = len(chat_prompt(tokenizer, list(messages[: i + 1]), add_generation_prompt=False))
        c0 = text.find(msg["content"], start, max(end, start + len(msg["content"])))
        c0 = c0 if c0 >= 0 else start
        spans.append((start, end, c0, c0 + len(msg["content"])))
        start = end
    return text, spans


def template_preamble(tokenizer, first: dict[str, str]) -> int:
    """Characters the chat template writes before the first message's own turn when the chat opens
    without a system message (a default system turn): found by rendering the same message after a
    system message of our own, whose turn replaces the default. 0 when there is none, or when the
    template takes no system message."""
    if first["role"] == "system":
        return 0
    alone = chat_prompt(tokenizer, [first], add_generation_prompt=False)
    system = {"role": "system", "content": "."}
    try:
        sys_only = chat_prompt(tokenizer, [system], add_generation_prompt=False)
        with_sys = chat_prompt(tokenizer, [system, first], add_generation_prompt=False)
    except TemplateError:  # e.g. Gemma's template refuses a system role
        return 0
    own = with_sys[len(sys_only):] if with_sys.startswith(sys_only) else ""
    return len(alone) - len(own) if own and alone.endswith(own) else 0


def load_chat(path: Path | str) -> list[dict[str, str]]:
    """A chat from a JSON file holding a list of {"role", "content"} messages (a ``.jsonl`` file:
    one message a line, `load_transcript`); errors name the file and the message."""
    path = Path(path)
    if path.suffix == ".jsonl":
        return load_transcript(path)
    try:
        messages = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e}); write a list of "
                        '{"role": "user"|"assistant"|"system", "content": "..."} messages.') from None
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{path}: expected a non-empty JSON list of {{\"role\", \"content\"}} messages.")
    validate_messages(messages, where=str(path))
    return messages


def validate_messages(messages: Sequence[Any], where: str = "messages") -> None:
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) - {"role", "content"} or not {"role", "content"} <= set(m):
            raise UserError(f"{where}[{i}]: a message must be an object with exactly 'role' and 'content'; got {m!r}.")
        if m["role"] not in ROLES:
            raise UserError(f"{where}[{i}]: role must be one of {ROLES}, got {m['role']!r}.")
        if not isinstance(m["content"], str):
            raise UserError(f"{where}[{i}]: content must be a string, got {type(m['content']).__name__}.")


def load_transcript(path: Path | str) -> list[dict[str, str]]:
    """A chat transcript from JSONL, one {"role", "content"} message per line; errors name the line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Transcript not found: {path}")
    messages = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            msg = json.loads(line)
            validate_messages([msg], where="message")
        except (json.JSONDecodeError, ValueError) as e:
            raise UserError(f"{path}:{lineno}: malformed message ({e}). Each line must be "
                             '{"role": "user"|"assistant"|"system", "content": "..."}.') from None
        messages.append(msg)
    if not messages:
        raise UserError(f"{path}: no messages.")
    return messages


@torch.inference_mode()
def _traces(model, dir_sets: Sequence[EmotionDirections], text: str, roles_for_char, sae=None,
            latents: Sequence[int] = ()) -> list[Trace]:
    """One forward pass of ``text``, read by each direction set (all at one hook)."""
    hooks = {d.hook for d in dir_sets}
    if len(hooks) != 1:
        raise ValueError(f"Direction sets read together must share one hook; got {sorted(hooks)}.")
    enc = model.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    hook = hooks.pop()
    resid = forward_hooks(model, torch.tensor([ids]), [hook])[hook]
    lat = {}
    if sae is not None and latents:
        acts = sae.encode(resid.to(sae.device, next(sae.parameters()).dtype))[0].float().cpu()
        lat = {int(i): acts[:, int(i)] for i in latents}
    info = [roles_for_char(s, e) for s, e in offsets]
    tokens = [model.tokenizer.decode([t]) for t in ids]
    out = []
    for dirs in dir_sets:
        proj = dirs.project(resid)[0].float().cpu()
        proj[0] = float("nan")
        out.append(Trace(tokens, ids, [r for r, _, _ in info], [t for _, t, _ in info], [c for _, _, c in info],
                         list(dirs.names), proj, lat))
    return out


def trace_text(model, dirs: EmotionDirections, text: str, sae=None, latents: Sequence[int] = ()) -> Trace:
    """Per-token projections of a plain text."""
    return _traces(model, [dirs], text, lambda s, e: ("text", 0, True), sae, latents)[0]


def trace_chat(model, dirs: EmotionDirections, messages: Sequence[dict[str, str]], sae=None,
               latents: Sequence[int] = (), add_generation_prompt: bool = False) -> Trace:
    """Per-token projections of a chat rendered with the model's template, tokens tagged by speaker."""
    return trace_chat_sets(model, [dirs], messages, sae, latents, add_generation_prompt)[0]


def trace_chat_sets(model, dir_sets: Sequence[EmotionDirections], messages: Sequence[dict[str, str]], sae=None,
                    latents: Sequence[int] = (), add_generation_prompt: bool = False) -> list[Trace]:
    """`trace_chat` for several direction sets at one hook (e.g. dense and SAE-assembled) from one
    forward pass."""
    text, spans = chat_spans(model.tokenizer, messages, add_generation_prompt)

    def who(s: int, e: int) -> tuple[str, int, bool]:
        if spans and s < spans[0][0]:  # the template's own system turn, before the first message
            return "system", -1, False
        for i, (b0, b1, c0, c1) in enumerate(spans):
            if b0 <= s < b1:
                return messages[i]["role"], i, c0 <= s < c1
        return "template", len(messages), False

    return _traces(model, dir_sets, text, who, sae, latents)


@dataclass
class Alarm:
    emotion: str
    start: int
    end: int
    """Token range [start, end) where the rolling z-score stayed above the threshold."""
    peak_z: float
    turn: int
    role: str


def alarms(trace: Trace, calib: Calibration, emotions: Sequence[str], threshold: float = 3.0,
           window: int = 4) -> list[Alarm]:
    """Stretches where an emotion's rolling z-score (vs neutral text) exceeds ``threshold``."""
    z = calib.z(trace)
    zt = Trace(trace.tokens, trace.token_ids, trace.roles, trace.turns, trace.content, trace.names, z)
    roll = zt.rolling(window)
    out = []
    for name in emotions:
        j = trace.names.index(name)
        above = (roll[:, j] > threshold).tolist()
        above[0] = False
        i = 0
        while i < len(above):
            if above[i]:
                k = i
                while k < len(above) and above[k]:
                    k += 1
                out.append(Alarm(name, i, k, float(roll[i:k, j].max()), trace.turns[i], trace.roles[i]))
                i = k
            else:
                i += 1
    return out


class LiveMonitor:
    """Record projections while the HF twin generates (a hook at the directions' layer).

    Example:
        >>> with LiveMonitor(model, dirs) as live:
        ...     out = hf_twin(model).generate(**enc, max_new_tokens=40)
        >>> live.projections(row=0)   # (prompt + generated tokens, n_emotions)
    """

    def __init__(self, model, dirs: EmotionDirections):
        self.hf, self.dirs = hf_twin(model), dirs
        self.steps: list[Tensor] = []
        self._ctx = None

    def _record(self, act: Tensor, positions: Tensor) -> None:
        self.steps.append(self.dirs.project(act.detach().float().cpu()))
        return None

    def __enter__(self) -> "LiveMonitor":
        self._ctx = tl_named_hooks(self.hf, [(self.dirs.hook, self._record)])
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._ctx.__exit__(*exc)

    def projections(self, row: int = 0) -> Tensor:
        """(tokens seen, n_emotions) for one batch row, in order: the prompt, then one per new token."""
        return torch.cat([s[row] for s in self.steps], 0)
