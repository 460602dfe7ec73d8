"""The latent table of a run: one row per scored SAE latent, read without the model or torch.

A row holds the emotions the latent was selected for and its weight in each (the run's main
SAE-assembled directions), its AUROC and Cohen's d for its emotion (the one it weighs most in,
else the one it separates best), its density (share of scored tokens it fires on), the classes
it is highest on by mean activation, its logit-lens tokens and its top-activating snippets.
``saefeatures run`` builds it in the feature-card stage (`feature_cards.build_latent_table`) and
saves RUN/scores/latents.json, with every latent's AUROC and d for every emotion in
RUN/scores/latents.safetensors; the CLI (`saefeatures latents`, `saefeatures latent`), the report
and wandb read it from there.

Example:
    >>> table = LatentTable.load("runs/smollm2-135m")
    >>> [r["latent"] for r in table.for_emotion("afraid", sort="auroc", top=5)]
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import emotions as emo
from .errors import UserError
from .files import load_safetensors, read_json, save_safetensors, write_json

TABLE_JSON = Path("scores") / "latents.json"
TABLE_TENSORS = Path("scores") / "latents.safetensors"
SORT_KEYS = {"auroc": "auroc", "d": "cohens_d", "weight": "weight", "density": "density"}
"""`for_emotion` sort keys (the CLI's ``--sort``) and the field each sorts by, largest first."""


@dataclass
class Snippet:
    record_id: str
    emotion: str
    tokens: list[str]
    acts: list[float]
    """The latent's activation at each token of the window."""

    def marked(self, mark: tuple[str, str] = ("[", "]"), share: float = 0.5) -> str:
        """The window as text, tokens at or above ``share`` of its largest activation wrapped in ``mark``."""
        top = max(self.acts, default=0.0)
        return "".join(f"{mark[0]}{t}{mark[1]}" if top > 0 and a >= share * top else t
                       for t, a in zip(self.tokens, self.acts))


@dataclass
class LatentRow:
    latent: int
    emotion: str
    """The emotion ``auroc`` and ``cohens_d`` are for: the one it weighs most in, else its best AUROC."""
    auroc: float
    cohens_d: float
    density: float
    """Share of the scored content tokens (all classes) where the latent is active."""
    selected: dict[str, float]
    """Emotion -> the latent's weight in that emotion's SAE-assembled direction."""
    top_emotions: list[tuple[str, float]]
    """Classes with the highest mean pooled activation of the latent."""
    logit_lens: list[str]
    snippets: list[Snippet] = field(default_factory=list)

    @property
    def weight(self) -> float:
        """Its largest weight in any emotion's direction (0: selected for none)."""
        return max(self.selected.values(), default=0.0)


WANDB_COLUMNS: tuple[tuple[str, type], ...] = (
    ("latent", int), ("emotion", str), ("weight", float), ("selected_for", str), ("auroc", float),
    ("cohens_d", float), ("density", float), ("top_emotions", str), ("logit_lens", str), ("top_snippet", str))
"""The flat table's columns and their types (`LatentTable.flat`; one wandb.Table)."""


@dataclass
class LatentTable:
    emotions: list[str]
    """Rows of ``auroc`` and ``cohens_d``: the scored emotions (not neutral)."""
    rows: list[LatentRow]
    """One per scored latent, by latent id."""
    auroc: Any = None
    """(emotions, latents) AUROC of every latent for every emotion (numpy or torch)."""
    cohens_d: Any = None
    """(emotions, latents) Cohen's d likewise."""
    meta: dict[str, Any] = field(default_factory=dict)

    def save(self, run_dir: Path | str) -> None:
        """Write RUN/scores/latents.json and latents.safetensors (the matrices as torch tensors, as built)."""
        run = Path(run_dir)
        (run / TABLE_JSON).parent.mkdir(parents=True, exist_ok=True)
        save_safetensors(run / TABLE_TENSORS, {"auroc": self.auroc, "cohens_d": self.cohens_d})
        write_json(run / TABLE_JSON, {"emotions": self.emotions, "meta": self.meta,
                                      "rows": [asdict(r) for r in self.rows]}, indent=None)

    @classmethod
    def load(cls, run_dir: Path | str) -> LatentTable:
        """The table of a finished run (numpy matrices); a run without one raises `UserError` with the fix."""
        run = Path(run_dir)
        if not run.is_dir():
            raise UserError(f"{run} is not a run directory; pass the --out of a finished `saefeatures run`.")
        missing = [str(run / p) for p in (TABLE_JSON, TABLE_TENSORS) if not (run / p).is_file()]
        if missing:
            raise UserError(f"{missing[0]} is missing: this run has no latent table; finish it (or rerun it with "
                            "this version) with `saefeatures run CONFIG --out RUN`.")
        data = read_json(run / TABLE_JSON)
        rows = [LatentRow(**{**r, "top_emotions": [tuple(x) for x in r["top_emotions"]],
                             "snippets": [Snippet(**s) for s in r["snippets"]]}) for r in data["rows"]]
        mats = load_safetensors(run / TABLE_TENSORS, framework="np")
        return cls(data["emotions"], rows, mats["auroc"], mats["cohens_d"], data.get("meta", {}))

    def row(self, latent: int) -> LatentRow:
        if not 0 <= latent < len(self.rows):
            raise UserError(f"latent {latent} is not in this run's SAE: ids are 0 to {len(self.rows) - 1}.")
        return self.rows[latent]

    def emotion_index(self, name: str) -> int:
        if name not in self.emotions:
            emo.get(name)  # an unknown word raises with the closest known ones
            raise UserError(f"emotion '{name}' was not scored in this run; scored: {', '.join(self.emotions)}.")
        return self.emotions.index(name)

    def for_emotion(self, name: str, sort: str = "auroc", top: int | None = None) -> list[dict[str, Any]]:
        """Every latent's scores for one emotion, largest ``sort`` first (see `SORT_KEYS`), ties by id."""
        if sort not in SORT_KEYS:
            raise UserError(f"unknown sort '{sort}'; use one of {', '.join(SORT_KEYS)}.")
        e = self.emotion_index(name)
        out = [{"latent": r.latent, "weight": r.selected.get(name, 0.0), "auroc": float(self.auroc[e, r.latent]),
                "cohens_d": float(self.cohens_d[e, r.latent]), "density": r.density,
                "top_emotions": [n for n, _ in r.top_emotions[:3]], "logit_lens": r.logit_lens[:6]}
               for r in self.rows]
        out.sort(key=lambda x: (-x[SORT_KEYS[sort]], x["latent"]))
        return out[:top] if top else out

    def emotion_scores(self, latent: int, top: int = 3) -> dict[str, dict[str, float]]:
        """AUROC and d of one latent for the emotions it was selected for, then its ``top`` best by AUROC."""
        row = self.row(latent)
        best = sorted(self.emotions, key=lambda n: -float(self.auroc[self.emotions.index(n), latent]))[:top]
        return {n: {"auroc": float(self.auroc[self.emotions.index(n), latent]),
                    "cohens_d": float(self.cohens_d[self.emotions.index(n), latent])}
                for n in dict.fromkeys([*row.selected, *best]) if n in self.emotions}

    def flat(self) -> tuple[list[str], list[list[Any]], list[type]]:
        """(columns, rows, types): one flat row per latent, numbers as numbers (`WANDB_COLUMNS`);
        the arguments of `Tracker.log_table`."""
        rows = [[r.latent, r.emotion, float(r.weight),
                 ", ".join(f"{n}:{w:.3f}" for n, w in sorted(r.selected.items(), key=lambda x: -x[1])),
                 float(r.auroc), float(r.cohens_d), float(r.density), ", ".join(n for n, _ in r.top_emotions),
                 " ".join(r.logit_lens), r.snippets[0].marked() if r.snippets else ""] for r in self.rows]
        return [c for c, _ in WANDB_COLUMNS], rows, [t for _, t in WANDB_COLUMNS]
