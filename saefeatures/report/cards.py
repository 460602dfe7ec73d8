"""Feature cards as HTML: each latent's scores, logit lens and top-activating snippets.

Example:
    >>> write_text("cards.html", cards_page(load_cards("figures/cards.json")))
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence

from ..feature_cards import FeatureCard
from ..latents import Snippet


def snippet_html(s: Snippet) -> str:
    top = max(s.acts) or 1.0
    spans = "".join(
        f"<span style='background:rgba(255,120,0,{min(1.0, a / top):.2f})' title='{a:.2f}'>{html.escape(t)}</span>"
        for t, a in zip(s.tokens, s.acts))
    return f"<div class='snip'><b>{html.escape(s.emotion)}</b> <small>{html.escape(s.record_id)}</small>: {spans}</div>"


def card_id(latent: int, emotion: str) -> str:
    """The HTML id of a latent's card for one emotion (the latent browser links to it)."""
    return f"card-{latent}-{re.sub(r'[^a-z0-9]+', '-', emotion.lower())}"


def card_html(card: FeatureCard) -> str:
    sc = " ".join(f"{k}={v:.3g}" for k, v in card.scores.items())
    tops = ", ".join(f"{n} ({v:.2f})" for n, v in card.top_emotions)
    lens = " ".join(f"<code>{html.escape(t)}</code>" for t in card.logit_lens)
    snips = "".join(snippet_html(s) for s in card.snippets)
    return (f"<div class='card' id='{card_id(card.latent, card.emotion)}'>"
            f"<h4>latent {card.latent} &middot; {html.escape(card.emotion)} "
            f"(weight {card.weight:.2f})</h4><p>{sc}</p><p>highest mean on: {tops}</p>"
            f"<p>logit lens: {lens}</p>{snips}</div>")


CARD_CSS = (".card{border:1px solid #ccc;border-radius:6px;padding:6px 10px;margin:8px 0;font-size:13px}"
            ".card h4{margin:2px 0}.snip{margin:3px 0;line-height:1.6}.snip span{padding:1px 0}")


def cards_html(cards: Sequence[FeatureCard]) -> str:
    """Cards grouped by emotion, one <details> panel each (an HTML fragment with its CSS)."""
    by_emotion: dict[str, list[FeatureCard]] = {}
    for c in cards:
        by_emotion.setdefault(c.emotion, []).append(c)
    panels = "".join(f"<details><summary>{html.escape(e)} ({len(cs)} latents)</summary>"
                     f"{''.join(card_html(c) for c in cs)}</details>" for e, cs in by_emotion.items())
    return f"<style>{CARD_CSS}</style>{panels}"


def cards_page(cards: Sequence[FeatureCard], title: str = "Feature cards") -> str:
    return (f"<html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head>"
            f"<body><h1>{html.escape(title)}</h1>{cards_html(cards)}</body></html>")
