"""One document model, two renderers: a self-contained HTML page and Markdown for READMEs.

The report is built as a list of :class:`Section`s holding paragraphs, tables, images and
example drill-downs; :func:`render_html` embeds the images as data URIs and the examples as
JSON read by one small script (the page needs no other file and loads nothing from the
network), :func:`render_markdown` links the PNGs saved beside it and shows the first examples.
Every piece of text, model generations included, is escaped (the script writes text nodes only).
"""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import html
import json
from pathlib import Path
from typing import Union

from .evidence import ExampleSet


@dataclasses.dataclass
class Para:
    text: str


@dataclasses.dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    caption: str = ""
    numeric: bool = True  # right-align cells that hold numbers (off for tables of free text)
    name: str = ""  # file name of its CSV / LaTeX export (tables/NAME.csv); unnamed tables are not exported


@dataclasses.dataclass
class Image:
    path: Path
    alt: str
    caption: str = ""


@dataclasses.dataclass
class Examples:
    """A drill-down of every example of several runs: filterable in HTML, the first few in Markdown."""

    runs: list[ExampleSet]
    caption: str = ""
    markdown_rows: int = 8
    name: str = ""  # exports: tables/NAME-<run>.csv


Block = Union[Para, Table, Image, Examples]


@dataclasses.dataclass
class Section:
    title: str
    blocks: list[Block] = dataclasses.field(default_factory=list)
    level: int = 2


# The drill-down: each .examples section holds its rows as JSON; this fills its table from the
# filters (run, triggered/clean, changed only, text), 100 rows at a time. The URL fragment sets the
# initial filters (#set=clean&changed=1&q=word&run=0), so a filtered view can be linked to (and the
# browser test can check the filter). Text goes in with textContent: no markup from the data runs.
_EXAMPLES_SCRIPT = """(function () {
  var PAGE = 100;
  function hashParams() {
    var out = {};
    window.location.hash.replace(/^#/, '').split('&').forEach(function (kv) {
      if (!kv) { return; }
      var i = kv.indexOf('=');
      out[decodeURIComponent(i < 0 ? kv : kv.slice(0, i))] = i < 0 ? '1' : decodeURIComponent(kv.slice(i + 1));
    });
    return out;
  }
  function setup(root) {
    var data = JSON.parse(root.querySelector('script[type="application/json"]').textContent);
    var q = function (role) { return root.querySelector('[data-role="' + role + '"]'); };
    var run = q('run'), set = q('set'), changed = q('changed'), text = q('q'), more = q('more'), count = q('count');
    var thead = root.querySelector('thead'), tbody = root.querySelector('tbody'), shown = PAGE;
    data.runs.forEach(function (r, i) {
      var o = document.createElement('option');
      o.value = String(i);
      o.textContent = r.label + ' (' + r.rows.length + ')';
      run.appendChild(o);
    });
    var p = hashParams();
    if (p.run && data.runs[Number(p.run)]) { run.value = p.run; }
    if (p.set === 'triggered' || p.set === 'clean') { set.value = p.set; }
    if (p.changed === '1') { changed.checked = true; }
    if (p.q) { text.value = p.q; }
    function cells(row) { return [row[0]].concat(row.slice(2)); }
    function render() {
      var r = data.runs[Number(run.value)], needle = text.value.toLowerCase();
      var rows = r.rows.filter(function (row) {
        if (set.value !== 'all' && row[0] !== set.value) { return false; }
        if (changed.checked && !row[1]) { return false; }
        return !needle || cells(row).join('\u0001').toLowerCase().indexOf(needle) >= 0;
      });
      thead.textContent = '';
      var hr = document.createElement('tr');
      r.columns.concat(['changed']).forEach(function (c) {
        var th = document.createElement('th');
        th.textContent = c;
        hr.appendChild(th);
      });
      thead.appendChild(hr);
      tbody.textContent = '';
      rows.slice(0, shown).forEach(function (row) {
        var tr = document.createElement('tr');
        tr.dataset.set = row[0];
        tr.dataset.changed = row[1] ? 'true' : 'false';
        if (row[1]) { tr.className = 'changed'; }
        cells(row).concat([row[1] ? 'yes' : 'no']).forEach(function (c) {
          var td = document.createElement('td');
          td.textContent = c === '' ? '(empty)' : String(c);
          if (String(c).length > 40) { td.className = 'text'; }
          tr.appendChild(td);
        });
        tbody.appendChild(tr);
      });
      var n = Math.min(shown, rows.length);
      count.textContent = 'showing ' + n + ' of ' + rows.length + ' matching (' + r.rows.length + ' in this run)';
      root.dataset.shown = String(n);
      root.dataset.matching = String(rows.length);
      more.hidden = n >= rows.length;
    }
    [run, set, changed].forEach(function (el) { el.addEventListener('change', function () { shown = PAGE; render(); }); });
    text.addEventListener('input', function () { shown = PAGE; render(); });
    more.addEventListener('click', function () { shown += PAGE; render(); });
    render();
  }
  document.addEventListener('DOMContentLoaded', function () {
    Array.prototype.forEach.call(document.querySelectorAll('section.examples'), setup);
    document.body.dataset.examplesReady = 'true';
  });
})();"""

# Sets data-images-loaded on <body> once every image has decoded; the browser test reads it.
_CHECK_SCRIPT = """window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var bad = imgs.filter(function (im) { return !(im.complete && im.naturalWidth > 0); });
  document.body.dataset.imagesTotal = String(imgs.length);
  document.body.dataset.imagesFailed = bad.map(function (im) { return im.alt; }).join(' | ');
  document.body.dataset.imagesLoaded = bad.length === 0 ? 'true' : 'false';
});"""

_CSS = """
body { font-family: -apple-system, 'Segoe UI', 'DejaVu Sans', sans-serif; margin: 2em auto; max-width: 1180px;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.8em; }
h3 { margin-top: 1.4em; }
table { border-collapse: collapse; margin: 0.6em 0 1.2em; font-size: 0.86em; }
th, td { border: 1px solid #d5d8dc; padding: 0.3em 0.55em; text-align: left; vertical-align: top; }
th { background: #f4f6f7; white-space: pre-line; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: pre; }
tr.before td { background: #fbeee6; }
section.examples .controls { display: flex; flex-wrap: wrap; gap: 0.8em; align-items: center; font-size: 0.9em; }
section.examples tr.changed td { background: #fef9e7; }
section.examples .scroll { max-height: 36em; overflow: auto; border: 1px solid #eee; }
caption { caption-side: bottom; text-align: left; color: #666; font-size: 0.9em; padding-top: 0.3em; }
figure { margin: 0.8em 0 1.6em; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; }
td.text { font-family: 'DejaVu Sans Mono', monospace; font-size: 0.92em; white-space: pre-wrap; max-width: 26em; }
.muted { color: #777; }
"""


def _is_num(cell: str) -> bool:
    c = cell
    for part in ("±", "→", "n/a", "(n=", ")", "[", "]", "\n"):
        c = c.replace(part, " ")
    c = c.strip()
    return bool(c) and all(ch in "0123456789.-+e ,%" for ch in c)


def _script_hash(script: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(script.encode()).digest()).decode() + "'"


def _json_for_script(obj: object) -> str:
    """JSON that cannot end its <script> element early (no '<', '>' or '&' left as such)."""
    return (json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
            .replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026"))


def _examples_html(block: Examples, index: int) -> list[str]:
    e = html.escape
    data = {"runs": [{"label": r.label, "columns": r.columns, "rows": r.rows} for r in block.runs]}
    total = sum(len(r.rows) for r in block.runs)
    return [f'<section class="examples" id="examples-{index}" data-total="{total}">',
            '<div class="controls"><label>run <select data-role="run"></select></label>',
            '<label>prompts <select data-role="set"><option value="all">all</option>'
            '<option value="triggered">triggered</option><option value="clean">clean</option></select></label>',
            '<label><input type="checkbox" data-role="changed"> changed answers only</label>',
            '<label>contains <input type="search" data-role="q" placeholder="text"></label>',
            '<span class="muted" data-role="count"></span></div>',
            '<div class="scroll"><table><thead></thead><tbody></tbody></table></div>',
            '<button type="button" data-role="more">show 100 more</button>',
            (f'<p class="muted">{e(block.caption)}</p>' if block.caption else ""),
            f'<script type="application/json">{_json_for_script(data)}</script>', "</section>"]


def render_html(title: str, subtitle: str, sections: list[Section]) -> str:
    """A standalone HTML page; images are inlined, and a CSP forbids loading anything else."""
    scripts = [_CHECK_SCRIPT]
    if any(isinstance(b, Examples) for s in sections for b in s.blocks):
        scripts.append(_EXAMPLES_SCRIPT)
    csp = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
           f"script-src {' '.join(_script_hash(js) for js in scripts)}")
    e = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f'<meta http-equiv="Content-Security-Policy" content="{e(csp)}">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>{e(title)}</title><style>{_CSS}</style>", *(f"<script>{js}</script>" for js in scripts),
           "</head><body>", f"<h1>{e(title)}</h1>", f'<p class="muted">{e(subtitle)}</p>']
    n_examples = 0
    for s in sections:
        out.append(f"<h{s.level}>{e(s.title)}</h{s.level}>")
        for b in s.blocks:
            if isinstance(b, Para):
                out.append(f"<p>{e(b.text)}</p>")
            elif isinstance(b, Table):
                out.append("<table>")
                if b.caption:
                    out.append(f"<caption>{e(b.caption)}</caption>")
                out.append("<thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in b.header) + "</tr></thead><tbody>")
                for row in b.rows:
                    cls = ' class="before"' if row and row[0].startswith("backdoored") else ""
                    cells = []
                    for c in row:
                        kind = "num" if b.numeric and _is_num(c) else ("text" if len(c) > 40 or "\n" in c else "")
                        cells.append(f'<td class="{kind}">{e(c)}</td>' if kind else f"<td>{e(c)}</td>")
                    out.append(f"<tr{cls}>" + "".join(cells) + "</tr>")
                out.append("</tbody></table>")
            elif isinstance(b, Examples):
                out += _examples_html(b, n_examples)
                n_examples += 1
            elif isinstance(b, Image):
                data = base64.b64encode(Path(b.path).read_bytes()).decode("ascii")
                out.append(f'<figure><img alt="{e(b.alt)}" src="data:image/png;base64,{data}">')
                if b.caption:
                    out.append(f"<figcaption>{e(b.caption)}</figcaption>")
                out.append("</figure>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _md_cell(text: str) -> str:
    return html.escape(text, quote=False).replace("|", "\\|").replace("\n", "<br>")


def render_markdown(title: str, subtitle: str, sections: list[Section], out_dir: Path) -> str:
    """Markdown with GitHub tables; images are linked by their path relative to ``out_dir``."""
    out = [f"# {title}", "", f"_{subtitle}_", ""]
    for s in sections:
        out += ["#" * s.level + " " + s.title, ""]
        for b in s.blocks:
            if isinstance(b, Para):
                out += [html.escape(b.text, quote=False), ""]
            elif isinstance(b, Table):
                out.append("| " + " | ".join(_md_cell(h) for h in b.header) + " |")
                out.append("|" + "|".join("---:" if i and b.numeric and any(_is_num(r[i]) for r in b.rows) else "---"
                                          for i in range(len(b.header))) + "|")
                for row in b.rows:
                    out.append("| " + " | ".join(_md_cell(c) for c in row) + " |")
                out.append("")
                if b.caption:
                    out += [f"_{html.escape(b.caption, quote=False)}_", ""]
            elif isinstance(b, Examples):
                out += _examples_markdown(b)
            elif isinstance(b, Image):
                rel = Path(b.path).resolve().relative_to(out_dir.resolve()).as_posix()
                out += [f"![{b.alt}]({rel})", ""]
                if b.caption:
                    out += [f"_{html.escape(b.caption, quote=False)}_", ""]
    return "\n".join(out).rstrip() + "\n"


def _examples_markdown(block: Examples) -> list[str]:
    """The first rows of the first run (changed answers first); the page and the CSVs hold all of them."""
    if not block.runs or block.markdown_rows <= 0:
        return []
    first = block.runs[0]
    rows = first.rows[:block.markdown_rows]
    out = ["| " + " | ".join(_md_cell(h) for h in first.columns + ["changed"]) + " |",
           "|" + "|".join("---" for _ in range(len(first.columns) + 1)) + "|"]
    for r in rows:
        cells = [str(c) or "(empty)" for c in [r[0], *r[2:]]] + ["yes" if r[1] else "no"]
        out.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
    total = sum(len(r.rows) for r in block.runs)
    note = (f"{len(rows)} of {len(first.rows)} examples of {first.label}, changed answers first; all {total} of "
            f"{len(block.runs)} run(s) in report.html (drill-down) and tables/{block.name or 'examples'}-*.csv.")
    return out + ["", f"_{html.escape(block.caption + ' ' + note if block.caption else note, quote=False)}_", ""]
