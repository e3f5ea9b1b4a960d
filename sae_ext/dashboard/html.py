"""Self-contained HTML for the dashboard: circuitsvis's bundled JS inlined (no CDN), figures as
``data:`` URIs, a sortable table with a few lines of inline JS, and a Content-Security-Policy
that forbids every network load, so an opened page provably fetches nothing.

circuitsvis ships its React components as one IIFE bundle (``circuitsvis/dist/cdn/iife.js``,
which defines the global ``CircuitsVis``). ``circuitsvis.utils.render.render_local`` inlines
that 1.3 MB bundle once *per element* in a ``type="module"`` script after a ``<div/>`` that
HTML does not close; here it is inlined once per page and every element is rendered by one
script from a JSON block.
"""

from __future__ import annotations

import base64
import html
import io
import json
from functools import lru_cache
from importlib import resources
from typing import Any

__all__ = [
    "CSP",
    "circuitsvis_js",
    "colored_tokens",
    "figure_data_uri",
    "page",
    "sortable_table",
]

#: No network, no ``eval``: inline scripts and styles and ``data:`` images only.
CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "img-src data:; base-uri 'none'; form-action 'none'"
)

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5em auto;max-width:1150px;
 color:#222;padding:0 1em}
h1{font-size:1.4em;margin-bottom:.2em} h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
h3{font-size:1em;margin:1em 0 .3em} .sub{color:#666;margin-top:0}
table{border-collapse:collapse;font-size:.88em} th,td{padding:3px 8px;border-bottom:1px solid #eee;text-align:right}
th{background:#f4f4f4;position:sticky;top:0} td:first-child,th:first-child{text-align:left}
table.sortable th{cursor:pointer;user-select:none} table.sortable th:after{content:" \\2195";color:#aaa}
.flag{display:inline-block;padding:0 5px;border-radius:3px;font-size:.8em;margin-right:2px;color:#fff}
.f-dead{background:#999}.f-dense{background:#c60}.f-bipolar{background:#63c}
.cols{display:flex;gap:2em;flex-wrap:wrap}.cols>div{flex:1;min-width:330px}
.ctx{margin:2px 0 10px}.ctx-label{font-size:.8em;color:#555}
.tokens td{font-family:ui-monospace,monospace;white-space:pre}.pos{color:#1a5fb4}.neg{color:#c01c28}
.note{color:#666;font-size:.85em} img{max-width:100%}
"""

_SORT_JS = """
function cvSort(th, desc){
 const table=th.closest('table'), tb=table.tBodies[0], i=[...th.parentNode.children].indexOf(th);
 if(desc===undefined){desc=th.dataset.order!=='desc';}
 for(const h of th.parentNode.children){delete h.dataset.order;}
 th.dataset.order=desc?'desc':'asc';
 const val=r=>{const c=r.cells[i],v=c.dataset.v;return v===undefined?c.textContent:(v===''?NaN:+v);};
 const rows=[...tb.rows].sort((a,b)=>{const x=val(a),y=val(b);
  if(typeof x==='string'||typeof y==='string'){return (desc?-1:1)*String(x).localeCompare(String(y));}
  if(isNaN(x)&&isNaN(y))return 0; if(isNaN(x))return 1; if(isNaN(y))return -1;
  return desc?y-x:x-y;});
 for(const r of rows){tb.appendChild(r);}
}
for(const th of document.querySelectorAll('table.sortable th')){th.addEventListener('click',()=>cvSort(th));}
(function(){const m=location.hash.match(/^#sort=([\\w-]+?)(-asc)?$/); if(!m)return;
 const th=document.querySelector('table.sortable th[data-key="'+m[1]+'"]'); if(th)cvSort(th,!m[2]);})();
"""

_RENDER_JS = """
for(const [id,name,props] of JSON.parse(document.getElementById('cv-elements').textContent)){
 CircuitsVis.render(id, CircuitsVis[name], props);
}
"""


def esc(text: Any) -> str:
    """HTML-escape ``text`` (quotes included)."""
    return html.escape(str(text), quote=True)


@lru_cache(maxsize=1)
def circuitsvis_js() -> str:
    """The installed circuitsvis package's browser bundle, safe to inline in a ``<script>``."""
    try:
        bundle = resources.files("circuitsvis") / "dist" / "cdn" / "iife.js"
        js = bundle.read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError) as e:
        raise ModuleNotFoundError(
            "sae_ext.dashboard renders token views with circuitsvis's bundled JS; install it with "
            "`pip install circuitsvis` (a dependency of sae-ext)"
        ) from e
    lines = [ln for ln in js.splitlines() if not ln.startswith("//# sourceMappingURL=")]
    # "</script" would end the inline script early; "<\/script" is the same string to JS
    return "\n".join(lines).replace("</script", "<\\/script")


def _json_for_script(obj: Any) -> str:
    return json.dumps(obj, allow_nan=False).replace("</", "<\\/")


class Elements:
    """circuitsvis elements of one page: each call returns a placeholder ``<div>``."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str, dict[str, Any]]] = []

    def add(self, component: str, props: dict[str, Any]) -> str:
        div_id = f"cv-{len(self.items)}"
        self.items.append((div_id, component, props))
        return f'<div id="{div_id}" class="cv-el"></div>'


def _display_token(tok: str) -> str:
    """A token as circuitsvis's ``ColoredTokens`` shows it: it sets the string as innerHTML, so
    it is escaped here; newlines get a visible mark before the line break it draws."""
    return html.escape(tok, quote=False).replace("\n", "\u21b5\n")


def colored_tokens(elements: Elements, tokens: list[str], values: list[float], vmax: float) -> str:
    """A circuitsvis ``ColoredTokens`` element: blue for positive, red for negative values, on a
    symmetric scale ``[-vmax, vmax]`` shared by every context of a section."""
    vmax = float(vmax) if vmax > 0 else 1.0
    return elements.add(
        "ColoredTokens",
        {
            "tokens": [_display_token(t) for t in tokens],
            "values": [float(v) for v in values],
            "minValue": -vmax,
            "maxValue": vmax,
        },
    )


def figure_data_uri(fig: Any) -> str:
    """A matplotlib figure as a PNG ``data:`` URI (and closes it)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def sortable_table(
    columns: list[tuple[str, str]], rows: list[list[tuple[str, float | str | None]]]
) -> str:
    """A ``<table class="sortable">``; ``columns`` are (key, header), each cell is (html, sort
    value); a numeric sort value goes to ``data-v`` (None/NaN sort last)."""
    head = "".join(f'<th data-key="{esc(k)}">{esc(h)}</th>' for k, h in columns)
    body = []
    for row in rows:
        cells = []
        for cell_html, v in row:
            if isinstance(v, (int, float)):
                dv = "" if v != v else repr(float(v))  # NaN -> empty
                cells.append(f'<td data-v="{dv}">{cell_html}</td>')
            elif v is None:
                cells.append(f'<td data-v="">{cell_html}</td>')
            else:
                cells.append(f"<td>{cell_html}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (
        f'<table class="sortable"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table>"
    )


def page(title: str, body: str, elements: Elements | None = None, sortable: bool = False) -> str:
    """A complete HTML document; circuitsvis is inlined only when the page has elements."""
    scripts = []
    if elements is not None and elements.items:
        scripts.append(f"<script>{circuitsvis_js()}</script>")
        scripts.append(
            '<script type="application/json" id="cv-elements">'
            f"{_json_for_script(elements.items)}</script>"
        )
        scripts.append(f"<script>{_RENDER_JS}</script>")
    if sortable:
        scripts.append(f"<script>{_SORT_JS}</script>")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{_STYLE}</style></head>\n"
        f"<body>\n{body}\n{''.join(scripts)}\n</body></html>\n"
    )
