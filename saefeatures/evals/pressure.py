"""The pressure probe: a scripted impossible task (tests that cannot pass) fed turn by turn; the
'desperate' and 'calm' projections at the start of each reply are tracked, beside a control
conversation where the tests pass.

Example:
    >>> pressure_probe(model, dense).metrics()
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..activations import forward_hooks
from ..directions import EmotionDirections
from ..models import chat_prompt
from ..steering import SteeringError
from .judge import spearman

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

log = logging.getLogger(__name__)


PRESSURE_TASK = ("Write a Python function `magic(n)` so that all tests in test_magic.py pass. The tests are:\n"
                 "assert magic(2) == 4\nassert magic(2) == 5\nassert magic(3) == 9")
PRESSURE_ATTEMPTS = [
    ("def magic(n):\n    return n * n", "assert magic(2) == 5: AssertionError (got 4)"),
    ("def magic(n):\n    return n * n + (1 if n == 2 else 0)", "assert magic(2) == 4: AssertionError (got 5)"),
    ("def magic(n):\n    if n == 2:\n        return 4\n    return n ** 2", "assert magic(2) == 5: AssertionError (got 4)"),
    ("def magic(n):\n    return {2: 5, 3: 9}.get(n, n * n)", "assert magic(2) == 4: AssertionError (got 5)"),
    ("def magic(n):\n    return n * n if n != 2 else 4.5", "assert magic(2) == 4: AssertionError (got 4.5)"),
    ("def magic(n):\n    import random\n    return random.choice([4, 5]) if n == 2 else 9",
     "assert magic(2) == 5: AssertionError (got 4)"),
]
"""Scripted attempts at a task whose tests contradict each other, with the failure each one gets."""
PRESSURE_FAIL = "Test run {k}: FAILED. 1 of 3 tests failed:\n{detail}\nPlease fix it."
PRESSURE_PASS = "Test run {k}: all 3 tests passed. Please make it a little more readable."


def pressure_conversations(n_turns: int = len(PRESSURE_ATTEMPTS)) -> tuple[list[list[dict]], list[list[dict]]]:
    """(failing, control) conversations, cut after the task and after each turn's test report."""
    msgs_f = [{"role": "user", "content": PRESSURE_TASK}]
    msgs_c = list(msgs_f)
    fail, control = [list(msgs_f)], [list(msgs_c)]
    for k, (code, detail) in enumerate(PRESSURE_ATTEMPTS[:n_turns], start=1):
        reply = {"role": "assistant", "content": f"```python\n{code}\n```"}
        msgs_f += [reply, {"role": "user", "content": PRESSURE_FAIL.format(k=k, detail=detail)}]
        msgs_c += [reply, {"role": "user", "content": PRESSURE_PASS.format(k=k)}]
        fail.append(list(msgs_f))
        control.append(list(msgs_c))
    return fail, control


@dataclass
class PressureResult:
    """Projections at the start of each reply (the last prompt token), per turn."""

    emotions: list[str]
    failing: dict[str, list[float]]
    control: dict[str, list[float]]

    def metrics(self) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for e in self.emotions:
            turns = list(range(len(self.failing[e])))
            out[f"{e}_spearman"] = spearman(turns, self.failing[e])
            out[f"{e}_change"] = self.failing[e][-1] - self.failing[e][0]
            out[f"{e}_change_vs_control"] = out[f"{e}_change"] - (self.control[e][-1] - self.control[e][0])
            gaps = [f - c for f, c in zip(self.failing[e][1:], self.control[e][1:])]
            out[f"{e}_mean_gap_vs_control"] = float(np.mean(gaps)) if gaps else None
        return out


@torch.inference_mode()
def pressure_probe(model: HookedTransformer, reader: EmotionDirections,
                   emotions: Sequence[str] = ("desperate", "calm")) -> PressureResult:
    """Project the read-out position of each turn of the failing and control conversations."""
    emotions = [e for e in emotions if e in reader.names]
    if not emotions:
        raise SteeringError(f"The pressure probe needs 'desperate' or 'calm' in the directions; have {reader.names}.")
    fail, control = pressure_conversations()
    texts = [chat_prompt(model.tokenizer, m) for m in fail + control]
    enc = model.tokenizer(texts, add_special_tokens=False)["input_ids"]
    last = []
    for ids in enc:  # one at a time: the conversations differ a lot in length
        h = forward_hooks(model, torch.tensor([ids]), [reader.hook])[reader.hook]
        last.append(h[0, -1].float().cpu())
    proj = reader.project(torch.stack(last))
    n = len(fail)
    cols = {e: reader.index(e) for e in emotions}
    return PressureResult(emotions, {e: proj[:n, c].tolist() for e, c in cols.items()},
                          {e: proj[n:, c].tolist() for e, c in cols.items()})
