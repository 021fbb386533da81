"""``report.pdf``: the content of ``report.html`` on A4 pages, drawn with matplotlib (PdfPages).

Page 1 (and following while rows remain): research note, scan facts and the organ table; then the
not-found list and provenance; then the overview with its legend; then the per-structure views.
"""

from __future__ import annotations

import io
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_pdf import PdfPages
from matplotlib.figure import Figure
from PIL import Image

from medseg.report.figures import ReportFigures, strip
from medseg.report.html import format_size
from medseg.report.table import StructureTable, format_intensity

__all__ = ["write_pdf"]

A4_IN = (8.27, 11.69)
ROWS_FIRST_PAGE = 30
ROWS_PER_PAGE = 48
THUMBS_PER_PAGE = 7


def write_pdf(
    path: Path, doc: dict[str, Any], table: StructureTable, figs: ReportFigures, overview: bytes
) -> None:
    """Write the report as a multi-page PDF at `path` (the caller makes the write atomic).

    Args:
        path: Target file.
        doc: The ``report.json`` document.
        table: The structure table.
        figs: Rendered pictures (thumbnails, colours).
        overview: PNG of the overview figure with its legend (the one embedded in the HTML).
    """

    with PdfPages(path, metadata={"Title": doc["title"], "Creator": "medseg"}) as pdf:
        rows = list(table.rows)
        first = True
        while first or rows:
            chunk, rows = (
                rows[: ROWS_FIRST_PAGE if first else ROWS_PER_PAGE],
                rows[ROWS_FIRST_PAGE if first else ROWS_PER_PAGE :],
            )
            fig = Figure(figsize=A4_IN)
            y = 0.96
            if first:
                y = _header(fig, doc, y)
            _table(fig, doc, table, figs, chunk, y)
            pdf.savefig(fig)
            first = False
        fig = Figure(figsize=A4_IN)
        _notes_page(fig, doc)
        pdf.savefig(fig)
        fig = Figure(figsize=A4_IN)
        _overview_page(fig, figs, overview)
        pdf.savefig(fig)
        for start in range(0, len(table.rows), THUMBS_PER_PAGE):
            fig = Figure(figsize=A4_IN)
            _thumb_page(fig, table, figs, table.rows[start : start + THUMBS_PER_PAGE])
            pdf.savefig(fig)


def _header(fig: Any, doc: dict[str, Any], y: float) -> float:
    fig.text(0.05, y, doc["title"], fontsize=16, weight="bold", va="top")
    y -= 0.035
    fig.text(0.05, y, doc["note"], fontsize=9, color="#b00000", weight="bold", va="top", wrap=True)
    y -= 0.035
    notes = [f"Input outside the model's training range: {w}" for w in doc.get("input_warnings") or []]
    for w in notes + [f"Please note: {w}" for w in doc.get("warnings") or []]:
        text = textwrap.fill(w, 110)
        fig.text(0.05, y, text, fontsize=8, color="#b00000", weight="bold", va="top")
        y -= 0.017 * (text.count("\n") + 1) + 0.005
    s = doc["scan"]
    lines = [
        f"Image: {s.get('source') or '(in memory)'}    Mask: {doc['mask'].get('source') or '(in memory)'}",
        f"Modality: {s['modality']}    Shape: {' x '.join(map(str, s['shape']))}    "
        f"Spacing: {' x '.join(f'{v:g}' for v in s['spacing_mm'])} mm    Orientation: {s['orientation']}",
    ]
    dates = [f"{k.replace('_', ' ')}: {s[k]}" for k in ("acquisition_date", "study_date") if s.get(k)]
    if s.get("patient_pseudonym"):
        dates.append(f"patient (pseudonymised): {s['patient_pseudonym']}")
    if dates:
        lines.append("    ".join(dates))
    lines.extend(textwrap.wrap(f"{doc['size_note']}. {doc['completeness']}", 120))
    for line in lines:
        fig.text(0.05, y, line, fontsize=7.5, va="top")
        y -= 0.017
    return y - 0.01


def _table(
    fig: Any, doc: dict[str, Any], table: StructureTable, figs: ReportFigures, rows: list, y: float
) -> None:
    if not rows:
        fig.text(0.05, y, "No structure was found in the mask.", fontsize=10, va="top")
        return
    unit = doc["units"]["mean_intensity"]
    size_head = "Volume (mL)" if table.spatial_dims == 3 else "Area (cm²)"
    header = ["", "Structure", "Label", size_head, "Voxels", f"Mean ({unit})", f"SD ({unit})", "Complete"]
    cells = [
        [
            "",
            r.structure,
            str(r.label),
            format_size(r.size),
            str(r.n_voxels),
            format_intensity(r.mean_intensity),
            format_intensity(r.std_intensity),
            "yes" if r.complete else "incomplete: " + ", ".join(r.incomplete_sides),
        ]
        for r in rows
    ]
    row_h = 0.0175
    height = row_h * (len(rows) + 1)
    ax = fig.add_axes((0.05, y - height, 0.9, height))
    ax.set_axis_off()
    t = ax.table(
        cellText=cells,
        colLabels=header,
        cellLoc="left",
        colWidths=[0.03, 0.27, 0.06, 0.1, 0.09, 0.1, 0.09, 0.26],
        bbox=(0, 0, 1, 1),
    )
    t.auto_set_font_size(False)
    t.set_fontsize(6.5)
    for i, r in enumerate(rows, start=1):
        t[i, 0].set_facecolor(figs.colours[r.structure])
        if not r.complete:
            t[i, 7].get_text().set_color("#b00000")
    for j in range(len(header)):
        t[0, j].set_facecolor("#eeeeee")


def _notes_page(fig: Any, doc: dict[str, Any]) -> None:
    y = 0.95
    fig.text(0.05, y, "Not found", fontsize=12, weight="bold", va="top")
    y -= 0.03
    nf = ", ".join(doc["not_found"]) or "Every structure of the label list was found."
    for line in textwrap.wrap(nf, 110):
        fig.text(0.05, y, line, fontsize=8, va="top")
        y -= 0.017
    y -= 0.02
    fig.text(0.05, y, "Provenance", fontsize=12, weight="bold", va="top")
    y -= 0.03
    for k, v in doc["provenance"].items():
        for line in textwrap.wrap(f"{k}: {v}", 110):
            fig.text(0.05, y, line, fontsize=8, va="top")
            y -= 0.017
    y -= 0.02
    fig.text(0.05, y, f"Intensity: mean and {doc['std_definition']}.", fontsize=8, va="top")
    fig.text(0.05, 0.04, doc["note"], fontsize=9, color="#b00000", weight="bold")


def _overview_page(fig: Any, figs: ReportFigures, overview: bytes) -> None:

    fig.text(0.05, 0.96, "Overview", fontsize=12, weight="bold", va="top")
    fig.text(0.05, 0.935, f"Views through the centre of all structures; grey levels: {figs.window}. "
             "Colours match the table.", fontsize=8, va="top")  # fmt: skip
    rgb = np.asarray(Image.open(io.BytesIO(overview)).convert("RGB"))
    width = 0.9
    height = width * A4_IN[0] / A4_IN[1] * rgb.shape[0] / rgb.shape[1]
    ax = fig.add_axes((0.05, 0.92 - height, width, height))
    ax.imshow(rgb, interpolation="antialiased")
    ax.set_axis_off()


def _thumb_page(fig: Any, table: StructureTable, figs: ReportFigures, rows: list) -> None:
    slot = 0.92 / THUMBS_PER_PAGE
    for i, r in enumerate(rows):
        top = 0.96 - i * slot
        state = "" if r.complete else f"  (incomplete: {', '.join(r.incomplete_sides)})"
        fig.text(
            0.05,
            top,
            f"{r.structure}: {format_size(r.size)} {'mL' if table.spatial_dims == 3 else 'cm²'}{state}",
            fontsize=8,
            va="top",
            color="black",
            bbox={"facecolor": figs.colours[r.structure], "alpha": 0.35, "edgecolor": "none"},
        )
        ax = fig.add_axes((0.05, top - slot + 0.008, 0.9, slot - 0.03))
        ax.imshow(strip(figs.thumbnails[r.structure]), interpolation="nearest")
        ax.set_anchor("W")
        ax.set_axis_off()
