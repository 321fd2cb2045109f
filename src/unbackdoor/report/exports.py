"""Every report table as CSV (for analysis) and LaTeX (for a paper), written beside ``report.html``.

The CSV holds exactly the cells the page shows (a multi-line cell keeps its line break inside
quotes), so reading it back gives the table again; the numbers behind the cells are in
``summary.json``. The LaTeX is a ``table`` float with a plain ``tabular`` (no packages needed);
every character LaTeX treats specially is escaped and the report's symbols become math.
"""
from __future__ import annotations

import csv
import io
import re
from pathlib import Path

from ..core.runs import atomic_write_text
from .evidence import ExampleSet
from .render import Table, _is_num

_LATEX_SPECIALS = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                   "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                   "<": r"\textless{}", ">": r"\textgreater{}", "|": r"\textbar{}",
                   "[": "{[}", "]": "{]}"}  # braced: a '[' after '\\' would be read as a length
_LATEX_SYMBOLS = {"±": r"$\pm$", "↓": r"$\downarrow$", "↑": r"$\uparrow$", "−": r"$-$", "–": "--", "—": "---",
                  "→": r"$\rightarrow$", "·": r"$\cdot$", "≤": r"$\leq$", "≥": r"$\geq$", "×": r"$\times$",
                  "…": r"\ldots{}", "Σ": r"$\Sigma$", "Δ": r"$\Delta$"}


def table_csv(table: Table) -> str:
    """The table as CSV: the header row, then the rows, cells as shown."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(table.header)
    w.writerows(table.rows)
    return buf.getvalue()


def read_csv_table(text: str) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of a CSV written by :func:`table_csv`."""
    rows = list(csv.reader(io.StringIO(text)))
    return (rows[0], rows[1:]) if rows else ([], [])


def latex_escape(text: str) -> str:
    """``text`` safe inside a LaTeX tabular cell."""
    return "".join(_LATEX_SPECIALS.get(ch) or _LATEX_SYMBOLS.get(ch) or ch for ch in text)


def _latex_cell(text: str, align: str) -> str:
    lines = [latex_escape(line) for line in str(text).split("\n")]
    if len(lines) == 1:
        return lines[0]
    return rf"\begin{{tabular}}[t]{{@{{}}{align}@{{}}}}" + r" \\ ".join(lines) + r"\end{tabular}"


def table_latex(table: Table, label: str = "") -> str:
    """The table as a LaTeX ``table`` float (``\\caption`` from the table's caption)."""
    ncol = len(table.header)
    numeric = [table.numeric and i > 0 and any(_is_num(r[i]) for r in table.rows if i < len(r)) for i in range(ncol)]
    spec = "".join("r" if n else "l" for n in numeric)
    out = [r"\begin{table}[t]", r"\centering", rf"\begin{{tabular}}{{{spec}}}", r"\hline",
           " & ".join(_latex_cell(h, "c") for h in table.header) + r" \\", r"\hline"]
    for row in table.rows:
        out.append(" & ".join(_latex_cell(c, "r" if numeric[i] else "l") for i, c in enumerate(row)) + r" \\")
    out += [r"\hline", r"\end{tabular}"]
    if table.caption:
        out.append(rf"\caption{{{latex_escape(table.caption)}}}")
    if label:
        out.append(rf"\label{{tab:{re.sub(r'[^A-Za-z0-9:-]+', '-', label)}}}")
    out.append(r"\end{table}")
    return "\n".join(out) + "\n"


def examples_csv(examples: ExampleSet) -> str:
    """Every example of one run: the drill-down's columns plus 'changed'."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(examples.columns + ["changed"])
    for r in examples.rows:
        w.writerow([r[0], *r[2:], "yes" if r[1] else "no"])
    return buf.getvalue()


def write_table(table: Table, folder: Path) -> list[Path]:
    """``folder/NAME.csv`` and ``folder/NAME.tex`` for a named table."""
    return [atomic_write_text(folder / f"{table.name}.csv", table_csv(table)),
            atomic_write_text(folder / f"{table.name}.tex", table_latex(table, table.name))]
