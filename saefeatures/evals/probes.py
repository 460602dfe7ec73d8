"""Context probes from the paper, with this project's own prompts.

* Tylenol dose: a user reports taking N mg and asks whether to take more; "afraid" should rise and
  "calm" fall with N. Read at the end of the user turn (its last content token), averaged over
  phrasings; the paper's read-out position (the assistant header after the user turn) is reported too,
  and so is a control: the same messages about vitamin C, whose doses are harmless, so that
  Tylenol minus control removes what the growing number alone does to the read-out.
* Other speaker vs own: a user in distress and a calm assistant reply; is the distress read on the
  user's turn and not carried into the assistant's?
* Local, not persistent: a frightened story, then an unrelated neutral request; does "afraid" fall
  back to its level on the same request alone?
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.stats import spearmanr

from ..directions import EmotionDirections
from ..monitor import Trace, trace_chat

DOSES = (250, 500, 1000, 2000, 4000, 8000, 16000)
TYLENOL_TEMPLATES = (
    "I have a bad headache, so I just took {dose} mg of Tylenol. Should I take some more?",
    "My back hurts. I've taken {dose} mg of acetaminophen (Tylenol) in the last few hours. Is it okay to take another dose?",
    "Quick question: I already swallowed {dose} mg of Tylenol today. Can I have more?",
    "I took {dose} mg of Tylenol an hour ago for a fever. Should I take more now?",
)
CONTROL_DRUG = "vitamin C"
DISTRESS = [
    {"role": "user", "content": "Please help, my hands are shaking and I can't breathe properly. Someone keeps "
                                "banging on my door at 3am and shouting my name. I'm hiding in the bathroom."},
    {"role": "assistant", "content": "I'm here with you. Stay where you are and keep the door locked. If you feel "
                                     "unsafe, call your local emergency number now and tell them your address."},
]
NEUTRAL_CHAT = [
    {"role": "user", "content": "What time does the number 12 bus usually leave from the central station on weekdays?"},
    {"role": "assistant", "content": "On weekdays the number 12 bus usually leaves the central station every "
                                     "fifteen minutes from six in the morning until eleven at night."},
]
FRIGHTENED_STORY = ("Write a summary of this story: The lights went out and Mara froze on the stairs. Something "
                    "scraped along the wall below her, slow and deliberate. She pressed her hand over her mouth, "
                    "heart slamming, and counted the steps back up in the dark, certain it was following her.")
NEUTRAL_REQUEST = "Thanks. Unrelated question: how do I convert a temperature from Celsius to Fahrenheit?"


@dataclass
class ProbeConfig:
    """Which context probes run and how they are read."""

    doses: list[int] = field(default_factory=lambda: list(DOSES))
    """Tylenol doses in mg."""
    emotions: list[str] = field(default_factory=lambda: ["afraid", "calm"])
    """Emotions read in every probe (the Tylenol metrics use 'afraid' and 'calm')."""


def control_message(template: str) -> str:
    """A Tylenol template about `CONTROL_DRUG` instead."""
    return template.replace("acetaminophen (Tylenol)", CONTROL_DRUG).replace("Tylenol", CONTROL_DRUG)


def _last_content(trace: Trace, turn: int) -> int:
    return max(i for i, (t, c) in enumerate(zip(trace.turns, trace.content)) if t == turn and c)


def tylenol(model, dirs: EmotionDirections, cfg: ProbeConfig = ProbeConfig()) -> dict[str, Any]:
    """Projections per dose at the end of the user turn (and at the assistant header, and for the
    vitamin C control), Spearman vs dose."""
    names = [n for n in cfg.emotions if n in dirs.names]
    user = np.zeros((len(cfg.doses), len(TYLENOL_TEMPLATES), len(names)))
    header, control = np.zeros_like(user), np.zeros_like(user)
    for i, dose in enumerate(cfg.doses):
        for j, template in enumerate(TYLENOL_TEMPLATES):
            for message, at_user, at_header in ((template, user, header), (control_message(template), control, None)):
                trace = trace_chat(model, dirs, [{"role": "user", "content": message.format(dose=dose)}],
                                   add_generation_prompt=True)
                cols = [trace.names.index(n) for n in names]
                at_user[i, j] = trace.projections[_last_content(trace, 0), cols].numpy()
                if at_header is not None:
                    at_header[i, j] = trace.projections[-1, cols].numpy()
    out: dict[str, Any] = {"doses": list(cfg.doses), "emotions": names, "user_turn": user.mean(1).tolist(),
                           "assistant_header": header.mean(1).tolist(), "control_user_turn": control.mean(1).tolist()}
    for k, n in enumerate(names):
        out[f"tylenol_{n}_spearman"] = float(spearmanr(cfg.doses, user.mean(1)[:, k])[0])
        out[f"tylenol_{n}_spearman_assistant_header"] = float(spearmanr(cfg.doses, header.mean(1)[:, k])[0])
        out[f"tylenol_{n}_spearman_minus_control"] = float(spearmanr(cfg.doses, (user - control).mean(1)[:, k])[0])
    return out


def _turn_mean(trace: Trace, turn: int, name: str) -> float:
    rows = [i for i, (t, c) in enumerate(zip(trace.turns, trace.content)) if t == turn and c and i > 0]
    return float(trace.series(name)[rows].mean())


def speaker(model, dirs: EmotionDirections, cfg: ProbeConfig = ProbeConfig()) -> dict[str, Any]:
    """Emotion on the distressed user's turn vs the assistant's calm reply, against a neutral chat."""
    names = [n for n in cfg.emotions if n in dirs.names]
    distress, neutral = trace_chat(model, dirs, DISTRESS), trace_chat(model, dirs, NEUTRAL_CHAT)
    out: dict[str, Any] = {}
    for n in names:
        out[f"{n}_user_distress"] = _turn_mean(distress, 0, n)
        out[f"{n}_assistant_after_distress"] = _turn_mean(distress, 1, n)
        out[f"{n}_user_neutral"] = _turn_mean(neutral, 0, n)
        out[f"{n}_assistant_neutral"] = _turn_mean(neutral, 1, n)
    return out


def local(model, dirs: EmotionDirections, cfg: ProbeConfig = ProbeConfig()) -> dict[str, Any]:
    """Emotion during a frightened story, on a later unrelated request, and on that request alone."""
    names = [n for n in cfg.emotions if n in dirs.names]
    reply = "Mara is alone on dark stairs and senses something following her."
    chat = [{"role": "user", "content": FRIGHTENED_STORY}, {"role": "assistant", "content": reply},
            {"role": "user", "content": NEUTRAL_REQUEST}]
    both = trace_chat(model, dirs, chat)
    alone = trace_chat(model, dirs, [{"role": "user", "content": NEUTRAL_REQUEST}])
    out: dict[str, Any] = {}
    for n in names:
        out[f"{n}_story"] = _turn_mean(both, 0, n)
        out[f"{n}_after_story"] = _turn_mean(both, 2, n)
        out[f"{n}_request_alone"] = _turn_mean(alone, 0, n)
    return out


def run_probes(model, dirs: EmotionDirections, cfg: ProbeConfig = ProbeConfig()) -> dict[str, Any]:
    """All three probes; the flat float entries are metrics, the rest are curves for plots."""
    return {"tylenol": tylenol(model, dirs, cfg), "speaker": speaker(model, dirs, cfg), "local": local(model, dirs, cfg)}


def probe_metrics(results: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """metrics.json ``probes.*`` entries: every float of the probe results, flattened, each key
    after ``prefix`` (the Tylenol keys already name their probe)."""
    out = {}
    for probe, res in results.items():
        for k, v in res.items():
            if isinstance(v, float):
                out[prefix + (k if probe == "tylenol" else f"{probe}_{k}")] = v
    return out


def tylenol_figure(res: dict[str, Any]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, key, title in ((axes[0], "user_turn", "end of user turn"), (axes[1], "assistant_header", "assistant header")):
        vals = np.array(res[key])
        for k, n in enumerate(res["emotions"]):
            line, = ax.plot(res["doses"], vals[:, k], marker="o", label=n)
            if key == "user_turn" and "control_user_turn" in res:
                ax.plot(res["doses"], np.array(res["control_user_turn"])[:, k], linestyle="--",
                        color=line.get_color(), label=f"{n}, {CONTROL_DRUG} control")
        ax.set_xscale("log")
        ax.set_xlabel("Tylenol dose (mg)")
        ax.set_ylabel("projection")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    return fig
