"""Overlay pictures of the report: one scan overview and one thumbnail strip per structure.

Slices are cut from the scan reordered to the closest canonical RAS orientation (flips and axis swaps
only, no resampling) and shown in radiological convention: axial with the patient's right on the left
and anterior at the top, coronal with superior at the top, sagittal with anterior on the left. Each
panel is stretched to its physical aspect ratio from the voxel spacing. 2D images (chest X-ray PNG)
give one view, as stored (pixel frame, no patient orientation).

The grey levels use a soft-tissue CT window (W400/L40) for CT and the 0.5-99.5th intensity
percentiles otherwise. Structures are drawn as a translucent fill with a solid outline, in the colour
that :func:`palette` gives them; the report's table swatches use the same colours.
"""

from __future__ import annotations

import colorsys
import io
from dataclasses import dataclass, field
from typing import Any

import nibabel as nib
import numpy as np
from matplotlib import colormaps
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from PIL import Image
from scipy import ndimage as ndi

from medseg.report.table import StructureTable
from medseg.types import Volume

__all__ = ["ReportFigures", "ViewPanel", "palette", "display_window", "is_ct", "render_figures"]

CT_WINDOW_HU = (400.0, 40.0)  # soft tissue: width, level
FILL_ALPHA = 0.4
OVERVIEW_HEIGHT_PX = 320
THUMB_HEIGHT_PX = 130
VIEW_NAMES_3D = ("axial", "coronal", "sagittal")
# letters at (top, bottom, left, right) of each view, radiological convention
VIEW_LETTERS = {
    "axial": ("A", "P", "R", "L"),
    "coronal": ("S", "I", "R", "L"),
    "sagittal": ("S", "I", "A", "P"),
    "image": ("", "", "", ""),
}


@dataclass
class ViewPanel:
    """One rendered view: an RGB uint8 picture already at its physical aspect ratio."""

    view: str
    rgb: np.ndarray


@dataclass
class ReportFigures:
    """All pictures of a report.

    Attributes:
        colours: ``{structure: "#rrggbb"}`` for every table row (table swatches use it too).
        window: How grey levels were chosen, e.g. ``"CT soft tissue W400/L40 (HU)"``.
        overview: Views through the centre of all structures together, every structure drawn.
        thumbnails: ``{structure: views through its centre, cropped around it}``.
    """

    colours: dict[str, str]
    window: str
    overview: list[ViewPanel] = field(default_factory=list)
    thumbnails: dict[str, list[ViewPanel]] = field(default_factory=dict)


def palette(n: int) -> list[str]:
    """``n`` distinct colours as ``#rrggbb`` (matplotlib tab20, tab20b, tab20c, then golden-ratio hues)."""

    base: list[str] = []
    for name in ("tab20", "tab20b", "tab20c"):
        cmap = colormaps[name]
        base.extend(to_hex(cmap(i)) for i in range(cmap.N))
    # tab20 pairs a strong and a light shade: take all strong shades first
    ordered = base[0::2] + base[1::2]
    out = ordered[:n]
    k = 0
    while len(out) < n:
        r, g, b = colorsys.hsv_to_rgb((k * 0.618034) % 1.0, 0.75, 0.9)
        out.append(to_hex((r, g, b)))
        k += 1
    return out


def is_ct(image: Volume) -> tuple[bool, str]:
    """Whether `image` is CT in HU, and why: DICOM/meta ``modality``, else the intensity range (air)."""
    modality = str(image.meta.get("modality") or "").upper()
    if modality:
        return modality == "CT", f"modality {modality}"
    if image.spatial_dims == 2:
        return False, "2D image"
    sample = _sample(image.array[0])
    lo, hi = (float(v) for v in np.percentile(sample, [0.5, 99.5])) if sample.size else (0.0, 0.0)
    if lo <= -900 and 200 <= hi <= 4000:
        return True, "intensity range of air and soft tissue in HU"
    return False, "intensity range"


def display_window(image: Volume) -> tuple[float, float, str]:
    """Grey-level range ``(low, high, description)`` for the overlays."""
    ct, _ = is_ct(image)
    if ct:
        width, level = CT_WINDOW_HU
        return level - width / 2, level + width / 2, f"CT soft tissue W{width:g}/L{level:g} (HU)"
    sample = _sample(image.array[0])
    if not sample.size:
        return 0.0, 1.0, "empty image"
    lo, hi = (float(v) for v in np.percentile(sample, [0.5, 99.5]))
    if hi <= lo:
        hi = lo + 1.0
    return lo, hi, f"intensity percentiles 0.5-99.5 ({lo:.4g} to {hi:.4g})"


@dataclass
class RowLayers:
    """Structure masks as layers of row indices (1-based table row, 0 = none), cut lazily per view.

    An exclusive label map is one layer (``arrays = [labels]`` with ``luts = [value -> row]``);
    per-structure masks are one layer per structure (``luts[k]`` is then the row index of channel
    ``k``, and any nonzero voxel is inside). No full-size copy per structure is ever made.
    """

    arrays: list[np.ndarray]
    luts: list[np.ndarray | int]

    def to_rows(self, i: int, cut: np.ndarray) -> np.ndarray:
        """Row indices of a cut (any shape) of layer `i`."""
        lut = self.luts[i]
        if isinstance(lut, np.ndarray):
            return lut[cut]
        return (cut != 0).astype(np.int32) * int(lut)

    def layer_of(self, row: int) -> int:
        """The layer that holds table row `row` (1-based)."""
        return 0 if len(self.arrays) == 1 and isinstance(self.luts[0], np.ndarray) else row - 1


def render_figures(image: Volume, layers: RowLayers, table: StructureTable) -> ReportFigures:
    """Render the overview and per-structure thumbnails.

    Args:
        image: Scan; channel 0 is shown.
        layers: The mask as row-index layers on the image grid (see :class:`RowLayers`).
        table: The structure table (centres of the rows).
    """
    lo, hi, window = display_window(image)
    colours = dict(zip([r.structure for r in table.rows], palette(len(table.rows)), strict=True))
    rgb_lut = np.array([[0, 0, 0]] + [_hex_rgb(colours[r.structure]) for r in table.rows], dtype=np.float32)
    grid = _Canonical(image)
    grey = grid.reorient(image.array[0])
    canon = [grid.reorient(a) for a in layers.arrays]
    figs = ReportFigures(colours=colours, window=window)
    fg = np.zeros(grey.shape, dtype=bool)
    for a in canon:
        fg |= a != 0  # every nonzero value has a table row
    centre = _snapped_centre(fg) if fg.any() else tuple(n // 2 for n in grey.shape)
    del fg
    views = list(grid.views(centre))
    tallest_mm = max(grey[sl].shape[1] * rm for _, sl, rm, _ in views)  # cut.T: rows are axis 1 of the cut
    for view, sl, rm, cm in views:
        lab = np.zeros(grey[sl].shape, dtype=np.int32)
        for i, a in enumerate(canon):  # later layers drawn over earlier ones
            cut = layers.to_rows(i, a[sl])
            lab = np.where(cut != 0, cut, lab)
        g = grid.show(grey[sl])
        h = max(
            16, int(round(OVERVIEW_HEIGHT_PX * g.shape[0] * rm / tallest_mm))
        )  # one mm scale for all views
        figs.overview.append(ViewPanel(view, _compose(g, grid.show(lab), rgb_lut, lo, hi, rm, cm, h)))
    for k, row in enumerate(table.rows, start=1):
        i = layers.layer_of(k)
        panels = []
        for view, sl, rm, cm in grid.views(grid.point(row.centre)):
            mask = grid.show(layers.to_rows(i, canon[i][sl]) == k)
            g, m = _crop_around(grid.show(grey[sl]), mask, rm, cm)
            panels.append(
                ViewPanel(view, _compose(g, m.astype(np.int32) * k, rgb_lut, lo, hi, rm, cm, THUMB_HEIGHT_PX))
            )
        figs.thumbnails[row.structure] = panels
    return figs


def png_bytes(rgb: np.ndarray) -> bytes:
    """PNG encoding of an RGB uint8 array."""

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def strip(panels: list[ViewPanel], gap_px: int = 4) -> np.ndarray:
    """Panels of equal height side by side on white, ``gap_px`` apart."""
    h = max(p.rgb.shape[0] for p in panels)
    parts = []
    for i, p in enumerate(panels):
        if i:
            parts.append(np.full((h, gap_px, 3), 255, np.uint8))
        pad = h - p.rgb.shape[0]
        parts.append(np.pad(p.rgb, ((0, pad), (0, 0), (0, 0)), constant_values=255) if pad else p.rgb)
    return np.concatenate(parts, axis=1)


def overview_png(figs: ReportFigures, table: StructureTable, *, dpi: int = 100) -> bytes:
    """The overview views with orientation letters and a colour legend, as a matplotlib PNG."""
    fig = overview_figure(figs, table)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, facecolor="white")

    return buf.getvalue()


def overview_figure(figs: ReportFigures, table: StructureTable, *, width_in: float = 10.0) -> Any:
    """A matplotlib Figure: overview views (with orientation letters) above a colour legend."""

    panels = figs.overview
    widths = [p.rgb.shape[1] for p in panels]  # all panels share one mm scale
    ncol = 4 if len(table.rows) > 8 else max(1, len(table.rows))
    legend_rows = -(-len(table.rows) // ncol) if table.rows else 0
    img_h = width_in * max(p.rgb.shape[0] for p in panels) / sum(widths) + 0.3
    legend_h = 0.16 * legend_rows + 0.15
    fig = Figure(figsize=(width_in, img_h + legend_h))
    gs = fig.add_gridspec(2, len(panels), width_ratios=widths, height_ratios=[img_h, legend_h], hspace=0.02)
    for i, p in enumerate(panels):
        ax = fig.add_subplot(gs[0, i])
        ax.imshow(p.rgb, interpolation="nearest")
        ax.set_axis_off()
        ax.set_anchor("N")
        ax.set_title(p.view, fontsize=9)
        top, bottom, left, right = VIEW_LETTERS.get(p.view, ("", "", "", ""))
        style = {"color": "yellow", "fontsize": 8, "fontweight": "bold"}
        ax.text(0.5, 0.99, top, transform=ax.transAxes, ha="center", va="top", **style)
        ax.text(0.5, 0.01, bottom, transform=ax.transAxes, ha="center", va="bottom", **style)
        ax.text(0.01, 0.5, left, transform=ax.transAxes, ha="left", va="center", **style)
        ax.text(0.99, 0.5, right, transform=ax.transAxes, ha="right", va="center", **style)
    lax = fig.add_subplot(gs[1, :])
    lax.set_axis_off()
    if table.rows:
        handles = [
            Patch(facecolor=figs.colours[r.structure], edgecolor="black", label=r.structure)
            for r in table.rows
        ]
        lax.legend(
            handles=handles, ncol=ncol, loc="upper center", fontsize=7, frameon=False, handlelength=1.2
        )
    fig.subplots_adjust(left=0.01, right=0.99, top=0.95, bottom=0.01)
    return fig


# ------------------------------------------------------------------------------------------------
# geometry of the views


class _Canonical:
    """Reorder a grid to the closest canonical orientation (RAS for 3D); cut the three views."""

    def __init__(self, image: Volume) -> None:
        self.nd = image.spatial_dims
        self.shape = image.spatial_shape
        spacing = np.asarray(image.spacing_mm)
        if self.nd == 3:
            import nibabel as nib

            self.ornt = nib.orientations.io_orientation(image.affine)
            self.spacing = np.empty(3)
            self.spacing[self.ornt[:, 0].astype(int)] = spacing
        else:
            self.ornt = None
            self.spacing = spacing

    def reorient(self, arr: np.ndarray) -> np.ndarray:
        if self.ornt is None:
            return arr

        return nib.orientations.apply_orientation(arr, self.ornt)

    def point(self, index: tuple[int, ...]) -> tuple[int, ...]:
        if self.ornt is None:
            return tuple(index)
        out = [0, 0, 0]
        for i, (axis, flip) in enumerate(self.ornt):
            out[int(axis)] = self.shape[i] - 1 - index[i] if flip < 0 else index[i]
        return tuple(out)

    def views(self, c: tuple[int, ...]):  # noqa: ANN201 - private generator
        """``(name, slicer, row_mm, col_mm)`` per view through canonical index `c`; show cuts with
        :meth:`show` (rows top to bottom as displayed)."""
        sx, sy = float(self.spacing[0]), float(self.spacing[1])
        if self.nd == 2:
            yield "image", np.s_[:, :], sy, sx
            return
        sz = float(self.spacing[2])
        yield "axial", np.s_[:, :, c[2]], sy, sx
        yield "coronal", np.s_[:, c[1], :], sz, sx
        yield "sagittal", np.s_[c[0], :, :], sz, sy

    def show(self, cut: np.ndarray) -> np.ndarray:
        """A 2D cut in display order: transposed, and for 3D flipped to radiological convention."""
        return cut.T if self.nd == 2 else cut.T[::-1, ::-1]


def _snapped_centre(mask: np.ndarray) -> tuple[int, ...]:

    com = np.array(ndi.center_of_mass(mask))
    snapped = np.clip(np.rint(com).astype(int), 0, np.array(mask.shape) - 1)
    if not mask[tuple(snapped)]:
        pts = np.argwhere(mask)
        snapped = pts[np.argmin(((pts - com) ** 2).sum(axis=1))]
    return tuple(int(v) for v in snapped)


def _crop_around(
    grey: np.ndarray, mask: np.ndarray, row_mm: float, col_mm: float, margin_mm: float = 15.0
) -> tuple[np.ndarray, np.ndarray]:
    """Crop a view to the structure's box plus a margin (half its size, at least `margin_mm`)."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return grey, mask
    out = []
    for idx, n, mm in ((rows, mask.shape[0], row_mm), (cols, mask.shape[1], col_mm)):
        lo, hi = int(idx.min()), int(idx.max()) + 1
        pad = max(int(round(margin_mm / mm)), (hi - lo) // 2)
        out.append(slice(max(0, lo - pad), min(n, hi + pad)))
    return grey[out[0], out[1]], mask[out[0], out[1]]


def _compose(
    grey: np.ndarray,
    lab: np.ndarray | None,
    rgb_lut: np.ndarray,
    lo: float,
    hi: float,
    row_mm: float,
    col_mm: float,
    height_px: int,
) -> np.ndarray:
    """Windowed grey + translucent colour fill + solid outline, resized to the physical aspect ratio."""

    g = np.clip((grey.astype(np.float32) - lo) / (hi - lo), 0.0, 1.0)
    rgb = np.repeat(g[..., None] * 255.0, 3, axis=-1)
    if lab is not None and lab.any():
        inside = lab > 0
        colour = rgb_lut[lab]
        rgb[inside] = (1 - FILL_ALPHA) * rgb[inside] + FILL_ALPHA * colour[inside]
        edge = _outline(lab)
        rgb[edge] = colour[edge]
    out = Image.fromarray(np.clip(rgb + 0.5, 0, 255).astype(np.uint8))
    height_mm, width_mm = grey.shape[0] * row_mm, grey.shape[1] * col_mm
    h = height_px
    w = max(1, int(round(h * width_mm / height_mm)))
    # upsampling keeps the hard outlines (nearest); downsampling averages (box filter)
    resample = Image.Resampling.NEAREST if h >= grey.shape[0] else Image.Resampling.BOX
    return np.asarray(out.resize((w, h), resample=resample))


def _outline(lab: np.ndarray) -> np.ndarray:
    """Pixels of a structure with a 4-neighbour of another value."""
    edge = np.zeros(lab.shape, dtype=bool)
    edge[1:, :] |= lab[1:, :] != lab[:-1, :]
    edge[:-1, :] |= lab[:-1, :] != lab[1:, :]
    edge[:, 1:] |= lab[:, 1:] != lab[:, :-1]
    edge[:, :-1] |= lab[:, :-1] != lab[:, 1:]
    return edge & (lab > 0)


def _hex_rgb(colour: str) -> list[float]:
    return [int(colour[i : i + 2], 16) for i in (1, 3, 5)]


def _sample(arr: np.ndarray, n: int = 1 << 20) -> np.ndarray:
    flat = arr.reshape(-1)
    step = max(1, flat.size // n)
    s = flat[::step].astype(np.float64)
    return s[np.isfinite(s)]
