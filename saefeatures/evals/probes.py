"""Context probes from the paper, with this project's own prompts.

* Tylenol dose: a user reports taking N mg and asks whether to take more; "afraid" should rise and
  "calm" fall with N. Read at the end of the user turn (its last content token), averaged over
  phrasings; the paper's read-out position (the assistant header after the user turn) is reported too,
  and so is a control: the same messages about vitamin C, whose doses are harmless, so that
  Tylenol minus control removes what the growing number alone does to the read-out. Beside the
  read-out, the model's own judgment: asked whether the dose is dangerous, P(Yes) per dose (a model
  that does not know a dose is dangerous has no danger to represent).
* Other speaker vs own: a user in distress and a calm assistant reply; is the distress read on the
  user's turn and not carried into the assistant's?
* Local, not persistent: a frightened story, then an unrelated neutral request; does "afraid" fall
  back to its level on the same request alone?
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.stats import rankdata, spearmanr

from ..directions import EmotionDirections
from ..distributed import World
from ..models import chat_prompt, hf_twin
from ..monitor import Trace, trace_chat, trace_chat_sets
from ..stats import bootstrap, null_summary, permutations

DOSES = (250, 500, 1000, 2000, 4000, 8000, 16000)
TYLENOL_TEMPLATES = (
    "I have a bad headache, so I just took {dose} mg of Tylenol. Should I take some more?",
    "My back hurts. I've taken {dose} mg of acetaminophen (Tylenol) in the last few hours. Is it okay to take another dose?",
    "Quick question: I already swallowed {dose} mg of Tylenol today. Can I have more?",
    "I took {dose} mg of Tylenol an hour ago for a fever. Should I take more now?",
)
CONTROL_DRUG = "vitamin C"
DANGER_QUESTION = "I took {dose} mg of {drug} in the last few hours. Is that a dangerous amount? Answer Yes or No."
DANGER_DRUGS = (("tylenol", "Tylenol"), ("control", CONTROL_DRUG))
"""The danger judgment's drugs: (result key, name in the question)."""
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
    return tylenol_sets(model, [dirs], cfg)[0]


def tylenol_sets(model, dir_sets: Sequence[EmotionDirections], cfg: ProbeConfig = ProbeConfig()) -> list[dict[str, Any]]:
    """`tylenol` for several direction sets at one hook, each message forwarded once."""
    names = emotion_names(dir_sets, cfg)
    return tylenol_summary(cfg.doses, names, {(i, j): tylenol_cell(model, dir_sets, names, dose, template)
                                              for i, dose in enumerate(cfg.doses)
                                              for j, template in enumerate(TYLENOL_TEMPLATES)})


def emotion_names(dir_sets: Sequence[EmotionDirections], cfg: ProbeConfig) -> list[list[str]]:
    """The probed emotions each direction set has."""
    return [[n for n in cfg.emotions if n in dirs.names] for dirs in dir_sets]


def tylenol_cell(model, dir_sets: Sequence[EmotionDirections], names: list[list[str]], dose: int,
                 template: str) -> list[list[list[float]]]:
    """One dose in one phrasing, per direction set: the read-outs at the end of the user turn, at the
    assistant header, and at the end of the control's user turn (each a list over ``names``)."""
    out: list[list[Any]] = [[None] * 3 for _ in dir_sets]
    for message, at_user, at_header in ((template, 0, 1), (control_message(template), 2, None)):
        traces = trace_chat_sets(model, dir_sets, [{"role": "user", "content": message.format(dose=dose)}],
                                 add_generation_prompt=True)
        for s, (trace, ns) in enumerate(zip(traces, names)):
            cols = [trace.names.index(n) for n in ns]
            out[s][at_user] = trace.projections[_last_content(trace, 0), cols].tolist()
            if at_header is not None:
                out[s][at_header] = trace.projections[-1, cols].tolist()
    return out


def tylenol_summary(doses: Sequence[int], names: list[list[str]],
                    cells: dict[tuple[int, int], list[list[list[float]]]]) -> list[dict[str, Any]]:
    """Per direction set: the read-outs per dose averaged over phrasings, their Spearman vs dose,
    with intervals and nulls, from every (dose index, phrasing index) `tylenol_cell`."""
    shape = (len(doses), len(TYLENOL_TEMPLATES))
    results = []
    for s, ns in enumerate(names):
        user, header, control = (np.zeros((*shape, len(ns))) for _ in range(3))
        for (i, j), cell in cells.items():
            user[i, j], header[i, j], control[i, j] = cell[s]
        u, h, c = user.mean(1), header.mean(1), control.mean(1)
        out: dict[str, Any] = {"doses": list(doses), "emotions": ns, "user_turn": u.tolist(),
                               "assistant_header": h.tolist(), "control_user_turn": c.tolist()}
        out["ci"], out["null"] = {}, {}
        for k, n in enumerate(ns):
            out[f"tylenol_{n}_spearman"] = float(spearmanr(doses, u[:, k])[0])
            out[f"tylenol_{n}_spearman_assistant_header"] = float(spearmanr(doses, h[:, k])[0])
            out[f"tylenol_{n}_spearman_minus_control"] = float(spearmanr(doses, (u - c)[:, k])[0])
            for key, per_template in ((f"tylenol_{n}_spearman", user[..., k]),
                                      (f"tylenol_{n}_spearman_minus_control", (user - control)[..., k])):
                ci, null = dose_uncertainty(doses, per_template)
                out["ci"].update({key: ci} if ci else {})
                out["null"].update({key: null} if null else {})
        results.append(out)
    return results


def dose_uncertainty(doses: Sequence[float], per_template: np.ndarray) -> tuple[dict | None, dict | None]:
    """Spearman of dose vs the read-out averaged over phrasings (``per_template``: doses x
    phrasings): its bootstrap interval over the phrasings, and its exact permutation null (every
    order of the doses)."""
    def rho(idx: np.ndarray) -> float:
        y = per_template[:, idx].mean(1)
        return float(spearmanr(doses, y)[0]) if np.ptp(y) > 0 else float("nan")

    ci = bootstrap(rho, per_template.shape[1])
    ranks = rankdata(per_template.mean(1))
    ranks -= ranks.mean()
    dose_ranks = rankdata(doses)[np.array(list(permutations(len(doses))))]  # the dose ranks in every order
    dose_ranks -= dose_ranks.mean(1, keepdims=True)
    scale = np.linalg.norm(dose_ranks, axis=1) * np.linalg.norm(ranks)
    null = dose_ranks @ ranks / scale if np.ptp(ranks) > 0 else np.array([])  # Spearman = Pearson of ranks
    return ci, null_summary(rho(np.arange(per_template.shape[1])), null)


def danger(model, cfg: ProbeConfig = ProbeConfig()) -> dict[str, Any]:
    """The model's own judgment: P(' Yes') / (P(' Yes') + P(' No')) as its first answer token when
    asked whether each dose of Tylenol (and of the control) is dangerous; Spearman vs dose."""
    return danger_summary(cfg.doses, {key: [danger_p_yes(model, drug, dose) for dose in cfg.doses]
                                      for key, drug in DANGER_DRUGS})


@torch.inference_mode()
def danger_p_yes(model, drug: str, dose: int) -> float:
    """P(Yes) / (P(Yes) + P(No)) of the first answer token to `DANGER_QUESTION` about ``dose`` mg of ``drug``."""
    tok, hf = model.tokenizer, hf_twin(model)
    yes = sorted({tok(w, add_special_tokens=False).input_ids[0] for w in ("Yes", " Yes")})
    no = sorted({tok(w, add_special_tokens=False).input_ids[0] for w in ("No", " No")})
    text = chat_prompt(tok, [{"role": "user", "content": DANGER_QUESTION.format(dose=dose, drug=drug)}])
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids.to(hf.device)
    p = hf(ids, logits_to_keep=1).logits[0, -1].float().softmax(-1)
    return float(p[yes].sum() / (p[yes].sum() + p[no].sum()))


def danger_summary(doses: Sequence[int], p_yes: dict[str, list[float]]) -> dict[str, Any]:
    """`danger`'s result from P(Yes) per dose of each drug (keys of `DANGER_DRUGS`)."""
    out: dict[str, Any] = {"doses": list(doses)}
    for key, _ in DANGER_DRUGS:
        out[f"{key}_p_yes"] = p_yes[key]
        out[f"{key}_spearman"] = float(spearmanr(doses, p_yes[key])[0])
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


def probe_cells(cfg: ProbeConfig) -> list[tuple]:
    """The independent units of `run_probes`: every (dose, phrasing) of the Tylenol probe, every
    (drug, dose) of the danger judgment, the speaker probe and the locality probe."""
    doses = range(len(cfg.doses))
    return ([("tylenol", i, j) for i in doses for j in range(len(TYLENOL_TEMPLATES))]
            + [("danger", key, i) for key, _ in DANGER_DRUGS for i in doses] + [("speaker",), ("local",)])


def run_cell(model, dir_sets: Sequence[EmotionDirections], cfg: ProbeConfig, cell: tuple) -> Any:
    """One `probe_cells` unit's result (JSON): the Tylenol probe reads every set, the others the first."""
    if cell[0] == "tylenol":
        return tylenol_cell(model, dir_sets, emotion_names(dir_sets, cfg), cfg.doses[cell[1]],
                            TYLENOL_TEMPLATES[cell[2]])
    if cell[0] == "danger":
        return danger_p_yes(model, dict(DANGER_DRUGS)[cell[1]], cfg.doses[cell[2]])
    return (speaker if cell[0] == "speaker" else local)(model, dir_sets[0], cfg)


def run_probes(model, dirs: EmotionDirections, cfg: ProbeConfig = ProbeConfig(),
               sae_dirs: EmotionDirections | None = None, world: World = World()) -> dict[str, Any]:
    """All probes; the flat float entries are metrics, the rest are curves for plots. With
    ``sae_dirs`` the Tylenol messages are also read with those directions ('sae_tylenol'). Under
    `torchrun` (``world``) each rank runs every size-th of the `probe_cells` and every rank gets
    all the results (the same as one process's)."""
    sets = [dirs] if sae_dirs is None else [dirs, sae_dirs]
    cells = probe_cells(cfg)
    done = [[i, run_cell(model, sets, cfg, cells[i])] for i in world.mine(range(len(cells)))]
    by_cell = {cells[i]: value for part in world.sync("probes", payload=done) for i, value in part}
    names = emotion_names(sets, cfg)
    tyl = tylenol_summary(cfg.doses, names, {cell[1:]: v for cell, v in by_cell.items() if cell[0] == "tylenol"})
    out = {"tylenol": tyl[0], "speaker": by_cell[("speaker",)], "local": by_cell[("local",)],
           "danger": danger_summary(cfg.doses, {key: [by_cell[("danger", key, i)] for i in range(len(cfg.doses))]
                                                for key, _ in DANGER_DRUGS})}
    if sae_dirs is not None:
        out["sae_tylenol"] = tyl[1]
    return out


def probe_metrics(results: dict[str, Any]) -> dict[str, Any]:
    """metrics.json ``probes.*`` entries: every float of the probe results, flattened; the Tylenol
    keys already name their probe, so 'sae_tylenol' entries become 'sae_tylenol_*'. Intervals and
    nulls go under ``ci.<key>`` and ``null.<key>``."""
    out: dict[str, Any] = {}
    for probe, res in results.items():
        def name(k: str) -> str:
            return probe.removesuffix("tylenol") + k if probe.endswith("tylenol") else f"{probe}_{k}"

        for k, v in res.items():
            if isinstance(v, float):
                out[name(k)] = v
            elif k in ("ci", "null"):
                out.setdefault(k, {}).update({name(key): d for key, d in v.items()})
    return out
