"""One document model, two renderers: a self-contained HTML page and Markdown for READMEs.

The report is built as a list of :class:`Section`s holding paragraphs, tables and images;
:func:`render_html` embeds the images as data URIs (the page needs no other file and loads
nothing from the network), :func:`render_markdown` links the PNGs saved beside it. Every
piece of text, model generations included, is escaped.
"""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import html
from pathlib import Path
from typing import Union


@dataclasses.dataclass
class Para:
    text: str


@dataclasses.dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    caption: str = ""
    numeric: bool = True  # right-align cells that hold numbers (off for tables of free text)


@dataclasses.dataclass
class Image:
    path: Path
    alt: str
    caption: str = ""


Block = Union[Para, Table, Image]


@dataclasses.dataclass
class Section:
    title: str
    blocks: list[Block] = dataclasses.field(default_factory=list)
    level: int = 2


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
th { background: #f4f6f7; } td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.before td { background: #fbeee6; }
caption { caption-side: bottom; text-align: left; color: #666; font-size: 0.9em; padding-top: 0.3em; }
figure { margin: 0.8em 0 1.6em; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; }
td.text { font-family: 'DejaVu Sans Mono', monospace; font-size: 0.92em; white-space: pre-wrap; max-width: 26em; }
.muted { color: #777; }
"""


def _is_num(cell: str) -> bool:
    c = cell.replace("±", "").replace("→", "").replace("n/a", "").replace("(n=", "").replace(")", "").strip()
    return bool(c) and all(ch in "0123456789.-+e ,%" for ch in c)


def render_html(title: str, subtitle: str, sections: list[Section]) -> str:
    """A standalone HTML page; images are inlined, and a CSP forbids loading anything else."""
    script_hash = base64.b64encode(hashlib.sha256(_CHECK_SCRIPT.encode()).digest()).decode()
    csp = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
           f"script-src 'sha256-{script_hash}'")
    e = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f'<meta http-equiv="Content-Security-Policy" content="{e(csp)}">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>{e(title)}</title><style>{_CSS}</style>", f"<script>{_CHECK_SCRIPT}</script>",
           "</head><body>", f"<h1>{e(title)}</h1>", f'<p class="muted">{e(subtitle)}</p>']
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
            elif isinstance(b, Image):
                rel = Path(b.path).resolve().relative_to(out_dir.resolve()).as_posix()
                out += [f"![{b.alt}]({rel})", ""]
                if b.caption:
                    out += [f"_{html.escape(b.caption, quote=False)}_", ""]
    return "\n".join(out).rstrip() + "\n"
