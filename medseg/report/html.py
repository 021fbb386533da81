"""``report.html``: one self-contained page (no scripts, no external URL; pictures as data URIs).

Light background, black text and a print stylesheet (A4, page breaks before the picture sections,
swatch colours kept when printed), so the page reads the same on screen and on paper.
"""

from __future__ import annotations

import base64
import html
from typing import Any

from medseg.report.figures import ReportFigures, png_bytes, strip
from medseg.report.table import StructureTable, format_intensity

__all__ = ["render_html", "format_size"]

_CSS = """
body { font-family: "DejaVu Sans", Arial, Helvetica, sans-serif; color: #111; background: #fff;
       margin: 1.5em auto; max-width: 1100px; font-size: 14px; line-height: 1.35; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { font-size: 1.2em; margin-top: 1.4em;
     border-bottom: 1px solid #999; }
.note { border: 2px solid #b00; padding: 0.5em 0.8em; font-weight: bold; color: #b00; }
table { border-collapse: collapse; margin: 0.4em 0; }
th, td { border: 1px solid #bbb; padding: 2px 7px; text-align: left; vertical-align: top; }
th { background: #eee; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.swatch { display: inline-block; width: 14px; height: 14px; border: 1px solid #000;
          vertical-align: middle; -webkit-print-color-adjust: exact; print-color-adjust: exact; }
.incomplete { color: #b00; font-weight: bold; }
.overview img { max-width: 100%; height: auto; }
.thumbs { display: flex; flex-wrap: wrap; gap: 10px; }
figure { margin: 0; break-inside: avoid; page-break-inside: avoid; }
figcaption { font-size: 0.9em; margin-top: 2px; }
.thumbs img { max-width: 520px; height: auto; border: 1px solid #ccc; }
.small { font-size: 0.85em; color: #444; }
@page { size: A4; margin: 12mm; }
@media print {
  body { margin: 0; max-width: none; font-size: 11px; }
  .pictures { page-break-before: always; break-before: page; }
  tr { page-break-inside: avoid; break-inside: avoid; }
  .thumbs img { max-width: 48%; }
}
"""


def format_size(value: float) -> str:
    """A volume (mL) or area (cm²) with sensible precision: 2 decimals from 1, else 3 significant digits."""
    return f"{value:.2f}" if abs(value) >= 1 else f"{value:.3g}"


def render_html(doc: dict[str, Any], table: StructureTable, figs: ReportFigures, overview: bytes) -> str:
    """The report page.

    Args:
        doc: The ``report.json`` document (scan facts, units, notes, provenance).
        table: The structure table.
        figs: Rendered pictures; ``figs.colours`` gives the table swatches.
        overview: PNG of the overview figure (with its legend).
    """
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(doc['title'])}{_title_suffix(doc)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{e(doc['title'])}</h1>",
        f'<p class="note" id="research-note">{e(doc["note"])}</p>',
        _input_warnings(doc),
        "<h2>Scan</h2>",
        _facts_table(doc),
        "<h2>Structures</h2>",
        _organ_table(doc, table, figs),
        f'<p class="small">{e(doc["size_note"])}. {e(doc["completeness"])} '
        f"Intensity: mean and {e(doc['std_definition'])}.</p>",
        _not_found(doc),
        '<section class="pictures"><h2>Overview</h2>',
        f'<p class="small">Views through the centre of all structures; grey levels: {e(figs.window)}. '
        "Colours match the table.</p>",
        f'<figure class="overview"><img id="overview" alt="overview of all structures" '
        f'src="{_data_uri(overview)}"></figure>',
        "<h2>Structures, one by one</h2>",
        '<p class="small">Views through each structure\'s centre (centre of mass, moved to the nearest voxel '
        "inside the structure), cropped around it.</p>",
        _thumbnails(table, figs),
        "</section>",
        "<h2>Provenance</h2>",
        _kv_table({k: v for k, v in doc["provenance"].items()}, "provenance"),
        f'<p class="note">{e(doc["note"])}</p>',
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def _input_warnings(doc: dict[str, Any]) -> str:
    out = []
    for key, head, id_ in (
        ("input_warnings", "Input outside the model's training range:", "input-warnings"),
        ("warnings", "Please note:", "report-warnings"),
    ):
        items = doc.get(key) or []
        if items:
            lis = "".join(f"<li>{html.escape(w)}</li>" for w in items)
            out.append(f'<div class="note" id="{id_}">{head}<ul>{lis}</ul></div>')
    return "\n".join(out)


def _title_suffix(doc: dict[str, Any]) -> str:
    src = doc["scan"].get("source")
    return f" - {html.escape(src)}" if src else ""


def _facts_table(doc: dict[str, Any]) -> str:
    s = doc["scan"]
    unit = "mm"
    rows: dict[str, Any] = {
        "Image": s.get("source") or "(in memory)",
        "Mask": doc["mask"].get("source") or "(in memory)",
        "Modality": s["modality"],
        "Shape (voxels)" if s["spatial_dims"] == 3 else "Shape (pixels)": " × ".join(map(str, s["shape"])),
        f"Spacing ({unit})": " × ".join(f"{v:g}" for v in s["spacing_mm"]),
        f"Field of view ({unit})": " × ".join(f"{v:g}" for v in s["field_of_view_mm"]),
        "Orientation": s["orientation"],
    }
    if s.get("acquisition_date"):
        rows["Acquisition date"] = s["acquisition_date"]
    if s.get("study_date"):
        rows["Study date"] = s["study_date"]
    if s.get("patient_pseudonym"):
        rows["Patient (pseudonymised)"] = f"{s['patient_pseudonym']} ({s['patient_pseudonym_method']})"
    return _kv_table(rows, "scan-facts")


def _kv_table(rows: dict[str, Any], table_id: str) -> str:
    e = html.escape
    body = "".join(f"<tr><th>{e(str(k))}</th><td>{e(_text(v))}</td></tr>" for k, v in rows.items())
    return f'<table id="{table_id}">{body}</table>'


def _organ_table(doc: dict[str, Any], table: StructureTable, figs: ReportFigures) -> str:
    e = html.escape
    if not table.rows:
        return '<p id="organ-table-empty">No structure was found in the mask.</p>'
    size_head = "Volume (mL)" if table.spatial_dims == 3 else "Area (cm²)"
    unit = doc["units"]["mean_intensity"]
    n_head = "Voxels" if table.spatial_dims == 3 else "Pixels"
    head = (
        f"<tr><th></th><th>Structure</th><th>Label</th><th>{size_head}</th><th>{n_head}</th>"
        f"<th>Mean ({e(unit)})</th><th>SD ({e(unit)})</th><th>Complete</th></tr>"
    )
    body = []
    for r in table.rows:
        colour = figs.colours[r.structure]
        complete = (
            "yes"
            if r.complete
            else f'<span class="incomplete">incomplete: {e(", ".join(r.incomplete_sides))}</span>'
        )
        body.append(
            f'<tr data-structure="{e(r.structure)}"><td><span class="swatch" style="background:{colour}">'
            f"</span></td><td>{e(r.structure)}</td><td class=num>{r.label}</td>"
            f"<td class=num>{format_size(r.size)}</td><td class=num>{r.n_voxels}</td>"
            f"<td class=num>{format_intensity(r.mean_intensity)}</td>"
            f"<td class=num>{format_intensity(r.std_intensity)}</td>"
            f"<td>{complete}</td></tr>"
        )
    return f'<table id="organ-table"><thead>{head}</thead><tbody>{"".join(body)}</tbody></table>'


def _not_found(doc: dict[str, Any]) -> str:
    names = doc["not_found"]
    if not names:
        return '<p id="not-found">Every structure of the label list was found.</p>'
    return (
        f'<p id="not-found"><b>Not found</b> ({len(names)}; no voxel in the mask, so no volume): '
        f"{html.escape(', '.join(names))}</p>"
    )


def _thumbnails(table: StructureTable, figs: ReportFigures) -> str:
    e = html.escape
    items = []
    for r in table.rows:
        panels = figs.thumbnails[r.structure]
        views = ", ".join(p.view for p in panels)
        state = (
            ""
            if r.complete
            else f' <span class="incomplete">(incomplete: {e(", ".join(r.incomplete_sides))})</span>'
        )
        items.append(
            f'<figure><img class="structure-overlay" data-structure="{e(r.structure)}" '
            f'alt="{e(r.structure)}: {e(views)}" src="{_data_uri(png_bytes(strip(panels)))}">'
            f'<figcaption><span class="swatch" style="background:{figs.colours[r.structure]}"></span> '
            f"{e(r.structure)} ({e(views)}){state}</figcaption></figure>"
        )
    return f'<div class="thumbs">{"".join(items)}</div>'


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _text(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return ", ".join(map(str, v))
    return "" if v is None else str(v)
