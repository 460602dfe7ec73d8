"""The Tylenol probe's figure: read-out per dose, with its control and the model's own danger answer.

Example:
    >>> fig = tylenol_figure(results["tylenol"], results["danger"])
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..evals.probes import CONTROL_DRUG


def tylenol_figure(res: dict[str, Any], danger: dict[str, Any] | None = None):
    """Read-out per dose at the end of the user turn (with the control) and at the assistant
    header; with ``danger``, a third panel: the model's own P(Yes, dangerous) per dose."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3 if danger else 2, figsize=(15 if danger else 10, 3.5))
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
    if danger:
        ax = axes[2]
        ax.plot(danger["doses"], danger["tylenol_p_yes"], marker="o", label="Tylenol")
        ax.plot(danger["doses"], danger["control_p_yes"], marker="o", linestyle="--", label=CONTROL_DRUG)
        ax.set_xscale("log")
        ax.set_ylim(0, 1)
        ax.set_xlabel("dose (mg)")
        ax.set_ylabel("P(Yes)")
        ax.set_title("model's answer: is this dose dangerous?")
        ax.legend()
    fig.tight_layout()
    return fig
