"""The report's latent browser: every scored latent in one table, sortable by any column and
searchable, with inline CSS and JS only (the report opens offline); a latent with a feature card
links to it.

Example:
    >>> fragment = latents_section("runs/smollm2-135m")   # "" for a run without a latent table
"""

from __future__ import annotations

import html
from pathlib import Path

from ..feature_cards import load_cards
from ..latents import TABLE_JSON, LatentRow, LatentTable
from .cards import card_id

COLUMNS = (("latent", "n"), ("emotion", "s"), ("weight", "n"), ("selected for", "s"), ("AUROC", "n"),
           ("Cohen's d", "n"), ("density", "n"), ("top emotions (mean)", "s"), ("logit lens", "s"),
           ("top snippet", "s"))
"""Header and kind of each column: 'n' sorts as a number, 's' as text."""

CSS = """#latents .scroll{max-height:640px;overflow:auto;border:1px solid #ddd}
#latents table{margin:0}#latents th{position:sticky;top:0;cursor:pointer;user-select:none;white-space:nowrap}
#latents th[aria-sort=ascending]::after{content:' \\25B2'}#latents th[aria-sort=descending]::after{content:' \\25BC'}
#latents td{vertical-align:top}#latents td.t{text-align:left;max-width:260px}#latents mark{background:#ffb366}
#latents input{width:320px;padding:3px 6px;margin:4px 8px 4px 0}"""

JS = """(function(){
var root=document.getElementById('latents'),body=root.querySelector('tbody'),rows=[].slice.call(body.rows),
count=root.querySelector('.count'),heads=root.querySelectorAll('th');
rows.forEach(function(r){r._text=r.textContent.toLowerCase();});
function show(){var terms=root.querySelector('input').value.toLowerCase().split(/\\s+/).filter(Boolean),n=0;
rows.forEach(function(r){var ok=terms.every(function(t){return r._text.indexOf(t)>=0;});
r.style.display=ok?'':'none';if(ok)n++;});count.textContent=n+' of '+rows.length+' latents';}
heads.forEach(function(h,i){h.addEventListener('click',function(){
var num=h.dataset.kind==='n',down=h.getAttribute('aria-sort')!=='descending';
heads.forEach(function(o){o.removeAttribute('aria-sort');});h.setAttribute('aria-sort',down?'descending':'ascending');
function key(r){var t=r.cells[i].textContent;return num?(parseFloat(t)||0):t.toLowerCase();}
rows.sort(function(a,b){var x=key(a),y=key(b),c=x<y?-1:x>y?1:0;return down?-c:c;});
rows.forEach(function(r){body.appendChild(r);});});});
root.querySelector('input').addEventListener('input',show);
function openCard(){var t=location.hash&&document.getElementById(location.hash.slice(1));
for(var p=t&&t.parentElement;p;p=p.parentElement){if(p.tagName==='DETAILS')p.open=true;}
if(t)t.scrollIntoView();}
window.addEventListener('hashchange',openCard);show();openCard();
})();"""


def _num(v: float) -> str:
    return f"{v:.3g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.1e}"


def _snippet(row: LatentRow, width: int = 8) -> str:
    """The top snippet around its peak, tokens at half its peak or more in <mark>."""
    if not row.snippets:
        return ""
    s = row.snippets[0]
    top = max(s.acts, default=0.0)
    peak = s.acts.index(top) if s.acts else 0
    lo, hi = max(0, peak - width), min(len(s.tokens), peak + width + 1)
    text = "".join(f"<mark>{html.escape(t)}</mark>" if top > 0 and a >= 0.5 * top else html.escape(t)
                   for t, a in zip(s.tokens[lo:hi], s.acts[lo:hi]))
    return f"<small>{html.escape(s.emotion)}:</small> {text}"


def _row(r: LatentRow, cards: dict[int, str]) -> str:
    latent = f"<a href='#{cards[r.latent]}'>{r.latent}</a>" if r.latent in cards else str(r.latent)
    selected = ", ".join(f"{html.escape(n)} {w:.2f}" for n, w in sorted(r.selected.items(), key=lambda x: -x[1]))
    tops = ", ".join(html.escape(n) for n, _ in r.top_emotions[:3])
    lens = " ".join(f"<code>{html.escape(t)}</code>" for t in r.logit_lens[:6])
    cells = [latent, html.escape(r.emotion), _num(r.weight), selected, _num(r.auroc), _num(r.cohens_d),
             _num(r.density), tops, lens, _snippet(r)]
    return f"<tr id='latent-{r.latent}'>" + "".join(
        f"<td class='t'>{c}</td>" if kind == "s" else f"<td>{c}</td>" for c, (_, kind) in zip(cells, COLUMNS)) + "</tr>"


def latents_html(table: LatentTable, cards: dict[int, str] | None = None) -> str:
    """The browser as an HTML fragment; ``cards`` maps a latent to the id of its card on the page."""
    head = "".join(f"<th data-kind='{kind}'>{html.escape(name)}</th>" for name, kind in COLUMNS)
    body = "".join(_row(r, cards or {}) for r in table.rows)
    return (f"<div id='latents'><style>{CSS}</style><p class='note'>Every scored SAE latent ({len(table.rows)}): "
            "its AUROC and Cohen's d are for the emotion shown (the one it weighs most in, else its best by AUROC); "
            "density is the share of scored tokens it fires on; weight is its largest weight in an emotion's "
            "SAE-assembled direction. Click a header to sort; type to filter (all words must match). A linked id "
            "opens the latent's feature card. <code>saefeatures latent ID --run RUN</code> prints one latent.</p>"
            "<input type='search' placeholder='filter: emotion, token, latent id...' aria-label='filter latents'>"
            f"<span class='count'></span><div class='scroll'><table><thead><tr>{head}</tr></thead>"
            f"<tbody>{body}</tbody></table></div><script>{JS}</script></div>")


def latents_section(run_dir: Path | str) -> str:
    """The report section of a run's latent table ("" when the run has none)."""
    run = Path(run_dir)
    if not (run / TABLE_JSON).is_file():
        return ""
    cards_json = run / "figures" / "cards.json"
    cards: dict[int, str] = {}
    for card in load_cards(cards_json) if cards_json.is_file() else []:
        cards.setdefault(card.latent, card_id(card.latent, card.emotion))
    return "<h2>Latent browser</h2>" + latents_html(LatentTable.load(run), cards)
