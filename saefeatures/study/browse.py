"""`saefeatures latents` and `saefeatures latent`: browse a finished run's latent table from the
shell. Read-only (the run directory is left byte for byte as it was) and without the model or
torch: everything comes from RUN/scores/latents.json and latents.safetensors.

Example:
    $ saefeatures latents afraid --run runs/smollm2-135m --sort d --top 10
    $ saefeatures latent 1234 --run runs/smollm2-135m
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from ..errors import UserError
from ..latents import SORT_KEYS, LatentTable


def _num(v: float) -> str:
    return f"{v:.3g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.1e}"


def format_latents(rows: list[dict], emotion: str) -> str:
    """The rows of `LatentTable.for_emotion` as an aligned text table."""
    head = ["latent", "weight", "auroc", "d", "density", "top emotions", "logit lens (|-separated)"]
    body = [[str(r["latent"]), _num(r["weight"]), _num(r["auroc"]), _num(r["cohens_d"]), _num(r["density"]),
             ", ".join(r["top_emotions"]), "|".join(repr(t)[1:-1] for t in r["logit_lens"])] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(x.ljust(w) for x, w in zip(line, widths)).rstrip() for line in [head, *body]]
    return f"{len(rows)} latents for {emotion}\n" + "\n".join(lines)


def format_latent(table: LatentTable, latent: int) -> str:
    """One latent's card as text: scores, top emotions, logit lens, snippets with [activating] tokens."""
    r = table.row(latent)
    selected = ", ".join(f"{n} (weight {w:.3f})" for n, w in sorted(r.selected.items(), key=lambda x: -x[1]))
    lines = [f"latent {r.latent}" + (f" at {table.meta['hook']}" if table.meta.get("hook") else ""),
             f"selected for: {selected or 'none'}",
             f"density: {_num(r.density)} of scored tokens",
             "auroc / cohen's d:"]
    lines += [f"  {n}: {_num(s['auroc'])} / {_num(s['cohens_d'])}" for n, s in table.emotion_scores(latent).items()]
    lines.append("highest mean on: " + ", ".join(f"{n} ({v:.3g})" for n, v in r.top_emotions))
    lines.append("logit lens: " + " ".join(repr(t) for t in r.logit_lens))
    lines.append("top snippets ([...]: tokens at half the window's peak or more):" if r.snippets else "never active")
    lines += [f"  {s.emotion} {s.record_id} (peak {max(s.acts):.2f}): {' '.join(s.marked().split())}"
              for s in r.snippets]
    return "\n".join(lines)


def cmd_latents(args: argparse.Namespace) -> None:
    if args.top is not None and args.top < 1:
        raise UserError(f"--top {args.top}: give a positive number of latents (default 20).")
    table = LatentTable.load(args.run)
    rows = table.for_emotion(args.emotion, sort=args.sort, top=args.top)
    print(json.dumps(rows, indent=2) if args.json else format_latents(rows, args.emotion))


def cmd_latent(args: argparse.Namespace) -> None:
    table = LatentTable.load(args.run)
    if args.json:
        row = table.row(args.id)
        print(json.dumps({**asdict(row), "weight": row.weight, "emotion_scores": table.emotion_scores(args.id)},
                         indent=2))
    else:
        print(format_latent(table, args.id))


def add_parsers(sub, common: argparse.ArgumentParser) -> None:
    """Register both commands on the CLI's subparsers."""
    ls = sub.add_parser("latents", help="a finished run's SAE latents for one emotion, sorted (read-only)",
                        parents=[common])
    ls.add_argument("emotion", help="an emotion the run scored, e.g. afraid")
    ls.add_argument("--run", required=True, help="run directory (the --out of `saefeatures run`)")
    ls.add_argument("--sort", choices=list(SORT_KEYS), default="auroc", help="largest first (default: auroc)")
    ls.add_argument("--top", type=int, default=20, help="how many (default 20)")
    ls.add_argument("--json", action="store_true", help="JSON instead of a text table")
    ls.set_defaults(func=cmd_latents)
    one = sub.add_parser("latent", help="one SAE latent of a finished run: scores, logit lens, snippets (read-only)",
                         parents=[common])
    one.add_argument("id", type=int, help="latent id")
    one.add_argument("--run", required=True, help="run directory (the --out of `saefeatures run`)")
    one.add_argument("--json", action="store_true", help="JSON instead of text")
    one.set_defaults(func=cmd_latent)
