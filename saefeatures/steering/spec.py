"""What to steer, as written in a config file or on the command line: `SteeringSpec`."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .. import emotions as emo
from ..errors import UserError
from ..files import write_json

METHODS = ("direction", "clamp")
OPS = ("set", "add", "scale")
POSITIONS = ("all", "prompt", "generated")
BACKENDS = ("hf", "tl")


class SteeringError(UserError):
    """A steering spec cannot be applied; the message says what to change."""


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
    """How ``emotions`` apply: 'direction' adds their directions, 'clamp' edits their SAE latents
    (``latents`` are always SAE latents, edited with ``op``)."""
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

    def summary(self) -> list[str]:
        """What the spec does, one line per intervention, e.g. ``['clamp SAE latents (set): 4068=60']``."""
        values = lambda d: ", ".join(f"{k}={v:g}" for k, v in d.items())  # noqa: E731
        out = []
        if self.emotions:
            out.append(f"add emotion directions: {values(self.emotions)}" if self.method == "direction"
                       else f"clamp the emotions' SAE latents ({self.op}): {values(self.emotions)}")
        if self.latents:
            out.append(f"clamp SAE latents ({self.op}): {values(self.latents)}")
        return out

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
