"""Synthetic abdominal CT phantoms written as a real MSD / nnU-Net v2 raw dataset.

The phantom is the project's embedded default data, written as the real layouts are so that the demo runs
the code paths a real dataset does: every case is a *miniature torso* (in-plane scale about 0.2-0.4 of an
adult, so the body is roughly 65-120 mm wide and a demo trains on a CPU) with realistic CT numbers,
anisotropic voxels, mixed storage orientations and varied anatomy:

* air -1000 HU, subcutaneous fat about -100 HU, muscle about 45 HU, a bowel/visceral-fat mixture with
  gas pockets, lung bases about -850 HU, stomach with a gas cap, heart, ribs about 600 HU;
* labelled organs (:data:`LABELS`): liver about 60 HU, spleen about 50 HU, kidneys with a bright
  cortex (about 170 HU), darker medulla and a renal sinus, contrast-enhanced aorta about 180-320 HU,
  vertebrae (cancellous about 300 HU, cortical shell about 900 HU, discs and spinal canal unlabelled);
* organs are superquadric blobs deformed by smooth random sinusoids, and some always touch: the aorta
  lies against the vertebral bodies and the right kidney presses into the liver, so label maps have
  shared borders (a voxel of one label with a 6-neighbour of the other) in every case;
* partial volume (a small Gaussian point-spread function), smooth low-frequency texture and Gaussian
  noise (8-18 HU).

Geometry: the anatomy is defined analytically in a body frame (adult millimetres, RAS+: +x is the
patient's right, +y anterior, +z superior) and evaluated at the world position of every voxel centre,
so the storage orientation (:data:`ORIENTATIONS`, cycled by case index: RAS, LPS, LAS, PSR; optionally an
in-plane oblique rotation) never changes where the anatomy is in world space. In-plane spacing is
0.7-0.9 mm on a 128-160 matrix, slices are 1.5-5 mm apart (24-64 slices), and origins differ per case.

Layout written by :func:`synth_ct` (nnU-Net v2 raw layout plus MSD keys)::

    out/dataset.json
    out/imagesTr/phantom_000_0000.nii.gz   out/labelsTr/phantom_000.nii.gz
    out/imagesTs/phantom_008_0000.nii.gz   out/labelsTs/phantom_008.nii.gz
    out/dicomTs/phantom_008/IM0001.dcm ...  (the same image as a DICOM series)

Case ``k`` is generated from ``SeedSequence(seed, spawn_key=(k,))``, so it is the same whatever the
number of cases; the last fifth of the cases (at least one) form the held-out ``Ts`` split.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from pydicom.uid import generate_uid
from scipy import ndimage as ndi
from tqdm.auto import tqdm

from medseg.errors import DataError
from medseg.io import save_label_map, save_volume
from medseg.io._atomic import write_text_atomic
from medseg.io.dicom_write import write_dicom_series
from medseg.types import Volume, orientation_code

logger = logging.getLogger(__name__)

__all__ = [
    "LABELS",
    "ORIENTATIONS",
    "PHANTOM_VERSION",
    "case_rng",
    "make_ct_case",
    "num_test_cases",
    "synth_ct",
]

PHANTOM_VERSION = 1
"""Bumped whenever the generator's output for a given seed changes."""

LABELS: dict[str, int] = {
    "background": 0,
    "liver": 1,
    "spleen": 2,
    "left_kidney": 3,
    "right_kidney": 4,
    "aorta": 5,
    "spine": 6,
}
"""nnU-Net style ``name -> id`` map of the CT phantom's label map."""

ORIENTATIONS: tuple[str, ...] = ("RAS", "LPS", "LAS", "PSR")
"""Storage orientations, cycled by case index (case ``k`` uses ``ORIENTATIONS[k % 4]``)."""

IN_PLANE_SPACING_MM = (0.7, 0.9)
SLICE_SPACING_MM = (1.5, 5.0)
MATRIX_SIZES = (128, 144, 160)
NUM_SLICES = (24, 64)

_ADULT_HALF_WIDTH_MM = 160.0  # body half-width of the adult template the anatomy is drawn in
_Z_RANGE_ADULT = (-60.0, 130.0)  # kidney lower poles .. liver dome (adult template mm)
_AIR_HU = -1000.0


# ----------------------------------------------------------------------------------------------
# seeds and splits


def case_rng(seed: int, index: int) -> np.random.Generator:
    """Generator for case ``index``: the ``index``-th child of ``SeedSequence(seed)``."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index,)))


def num_test_cases(cases: int) -> int:
    """Size of the held-out split: ``round(cases / 5)``, at least 1, leaving at least 1 training case."""
    if cases < 1:
        raise DataError(f"the number of cases must be at least 1, got {cases}")
    n = max(1, int(round(cases / 5)))
    if cases >= 2:
        n = min(n, cases - 1)
    return n


# ----------------------------------------------------------------------------------------------
# geometry


def _rotation(ax: float = 0.0, ay: float = 0.0, az: float = 0.0) -> np.ndarray:
    """``Rz @ Ry @ Rx`` for angles in radians."""
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


@dataclass(frozen=True)
class _Grid:
    """Voxel grid of one case plus the map from world (RAS mm) to the adult body frame."""

    shape: tuple[int, int, int]
    affine: np.ndarray  # voxel -> world (RAS, mm)
    body_center: np.ndarray  # world position of the body-frame origin
    scale: np.ndarray  # world mm per adult-template mm, per world axis

    @property
    def spacing(self) -> np.ndarray:
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    def coords(self, box: tuple[slice, slice, slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Body-frame coordinates (adult mm) of the voxel centres in ``box``, as broadcastable arrays."""
        idx = [
            np.arange(s.start, s.stop, dtype=np.float32).reshape([-1 if a == d else 1 for d in range(3)])
            for a, s in enumerate(box)
        ]
        out = []
        for c in range(3):
            v: Any = np.float32(self.affine[c, 3] - self.body_center[c])
            for a in range(3):
                if self.affine[c, a] != 0.0:
                    v = v + np.float32(self.affine[c, a]) * idx[a]
            out.append(np.asarray(v / np.float32(self.scale[c]), dtype=np.float32))
        return out[0], out[1], out[2]

    def box(self, lo: np.ndarray, hi: np.ndarray) -> tuple[slice, slice, slice] | None:
        """Voxel box covering the body-frame box ``[lo, hi]`` (adult mm); None if outside the grid."""
        corners = np.array(np.meshgrid(*zip(lo, hi, strict=True), indexing="ij")).reshape(3, -1).T
        world = self.body_center + corners * self.scale
        vox = (world - self.affine[:3, 3]) @ np.linalg.inv(self.affine[:3, :3]).T
        start = np.maximum(np.floor(vox.min(axis=0)).astype(int) - 1, 0)
        stop = np.minimum(np.ceil(vox.max(axis=0)).astype(int) + 2, self.shape)
        if np.any(stop <= start):
            return None
        return tuple(slice(int(a), int(b)) for a, b in zip(start, stop, strict=True))  # type: ignore[return-value]

    @property
    def full(self) -> tuple[slice, slice, slice]:
        return (slice(0, self.shape[0]), slice(0, self.shape[1]), slice(0, self.shape[2]))


def _make_grid(rng: np.random.Generator, orientation: str, oblique_deg: float = 0.0) -> _Grid:
    """Random spacing, matrix, slice count, origin and body size; ``orientation`` sets the storage order."""

    s = round(float(rng.uniform(*IN_PLANE_SPACING_MM)), 3)
    n = int(rng.choice(MATRIX_SIZES))
    sz = round(float(rng.uniform(*SLICE_SPACING_MM)), 2)
    nz = int(np.clip(round(float(rng.uniform(80.0, 115.0)) / sz), *NUM_SLICES))
    fov = np.array([n * s, n * s, nz * sz])
    k = float(rng.uniform(0.36, 0.42)) * n * s / _ADULT_HALF_WIDTH_MM  # body half-width / FOV
    kz = k * float(rng.uniform(1.1, 1.5))
    scale = np.array([k, k, kz])
    body_center = np.round(
        np.array([rng.uniform(-15, 15), rng.uniform(-20, 20) + 40.0, rng.uniform(-350, 50)]), 2
    )
    z_mid = 0.5 * (_Z_RANGE_ADULT[0] + _Z_RANGE_ADULT[1]) * kz
    jitter = np.array([rng.uniform(-0.03, 0.03) * fov[0], rng.uniform(-0.03, 0.03) * fov[1], 0.0])
    jitter[2] = z_mid + rng.uniform(-0.05, 0.05) * fov[2]
    center = body_center + jitter
    sizes = np.array([n, n, nz])
    steps = np.array([s, s, sz])
    lo = center - (sizes - 1) / 2 * steps
    ornt = nib.orientations.axcodes2ornt(tuple(orientation))
    affine = np.zeros((4, 4))
    affine[3, 3] = 1.0
    shape = []
    for a, (w, flip) in enumerate(ornt):
        w = int(w)
        affine[w, a] = flip * steps[w]
        affine[w, 3] = lo[w] if flip > 0 else lo[w] + (sizes[w] - 1) * steps[w]
        shape.append(int(sizes[w]))
    if oblique_deg:
        rot = _rotation(az=np.deg2rad(oblique_deg))
        affine[:3, :3] = rot @ affine[:3, :3]
        affine[:3, 3] = center + rot @ (affine[:3, 3] - center)
    affine[:3, 3] = np.round(affine[:3, 3], 3)
    affine = affine.astype(np.float32).astype(np.float64)  # exactly what NIfTI stores
    return _Grid((shape[0], shape[1], shape[2]), affine, body_center, scale)


# ----------------------------------------------------------------------------------------------
# shapes


@dataclass(frozen=True)
class _Blob:
    """Superquadric ``(|u|^p + |v|^p + |w|^p)^(1/p) < 1 + d(u)`` with a smooth random radial term ``d``.

    ``rot`` maps local axes to the body frame (columns); ``u = rot.T (x - center) / semi``.
    """

    center: np.ndarray
    semi: np.ndarray
    rot: np.ndarray = field(default_factory=lambda: np.eye(3))
    power: float = 2.0
    freqs: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    phases: np.ndarray = field(default_factory=lambda: np.zeros(0))
    amps: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        r = float(self.semi.max()) * (1.0 + float(np.abs(self.amps).sum())) + 1.0
        return self.center - r, self.center + r

    def local(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> list[np.ndarray]:
        d = (x - np.float32(self.center[0]), y - np.float32(self.center[1]), z - np.float32(self.center[2]))
        out = []
        for a in range(3):
            v: Any = 0.0
            for c in range(3):
                if abs(self.rot[c, a]) > 1e-12:
                    v = v + np.float32(self.rot[c, a]) * d[c]
            out.append(np.asarray(v / np.float32(self.semi[a]), dtype=np.float32))
        return out

    def level(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Negative inside, 0 on the surface (units: fraction of the semi-axes)."""
        u = self.local(x, y, z)
        if self.power == 2.0:
            r = np.sqrt(u[0] * u[0] + u[1] * u[1] + u[2] * u[2])
        else:
            p = np.float32(self.power)
            r = (np.abs(u[0]) ** p + np.abs(u[1]) ** p + np.abs(u[2]) ** p) ** np.float32(1.0 / self.power)
        disp: Any = 0.0
        for f, ph, a in zip(self.freqs, self.phases, self.amps, strict=True):
            disp = disp + np.float32(a) * np.sin(
                np.float32(f[0]) * u[0] + np.float32(f[1]) * u[1] + np.float32(f[2]) * u[2] + np.float32(ph)
            )
        return r - 1.0 - disp


def _blob(
    rng: np.random.Generator,
    center: tuple[float, float, float],
    semi: tuple[float, float, float],
    *,
    rot: np.ndarray | None = None,
    power: float = 2.0,
    jitter_mm: float = 6.0,
    size_var: float = 0.12,
    angle_deg: float = 10.0,
    deform: float = 0.035,
    n_waves: int = 4,
) -> _Blob:
    """A randomly perturbed blob around a template position/size (adult mm)."""
    c = np.asarray(center, dtype=np.float64) + rng.uniform(-jitter_mm, jitter_mm, 3)
    s = np.asarray(semi, dtype=np.float64) * rng.uniform(1 - size_var, 1 + size_var, 3)
    ang = np.deg2rad(rng.uniform(-angle_deg, angle_deg, 3))
    r = (np.eye(3) if rot is None else rot) @ _rotation(*ang)
    dirs = rng.normal(size=(n_waves, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    freqs = dirs * rng.uniform(1.5, 3.0, (n_waves, 1))
    phases = rng.uniform(0, 2 * np.pi, n_waves)
    amps = rng.uniform(0.4, 1.0, n_waves) * deform
    return _Blob(c, s, r, power, freqs, phases, amps)


# ----------------------------------------------------------------------------------------------
# the phantom


class _Canvas:
    """HU image, label map and texture-amplitude map being painted (later strokes win)."""

    def __init__(self, grid: _Grid) -> None:
        self.grid = grid
        self.hu = np.full(grid.shape, _AIR_HU, dtype=np.float32)
        self.label = np.zeros(grid.shape, dtype=np.uint8)
        self.tex = np.zeros(grid.shape, dtype=np.float32)  # amplitude (HU) of the fine texture field

    def paint(
        self,
        box: tuple[slice, slice, slice],
        mask: np.ndarray,
        hu: float | np.ndarray,
        label: int | None,
        tex: float,
    ) -> None:
        shape = tuple(s.stop - s.start for s in box)
        m = np.broadcast_to(mask, shape)
        if not m.any():
            return
        h = self.hu[box]
        h[m] = np.broadcast_to(np.asarray(hu, dtype=np.float32), shape)[m] if np.ndim(hu) else hu
        if label is not None:
            self.label[box][m] = label
        self.tex[box][m] = tex


def _smooth_noise(rng: np.random.Generator, grid: _Grid, sigma_mm: float) -> np.ndarray:
    """Gaussian-filtered white noise with unit standard deviation, correlation length ``sigma_mm``."""

    white = rng.standard_normal(grid.shape, dtype=np.float32)
    sigma = [max(sigma_mm / float(s), 0.3) for s in grid.spacing]
    field_ = ndi.gaussian_filter(white, sigma, truncate=2.5)
    std = float(field_[:: max(1, grid.shape[0] // 32), :: max(1, grid.shape[1] // 32), :].std())
    return field_ / np.float32(max(std, 1e-6))


def _body(rng: np.random.Generator) -> dict[str, float]:
    a = _ADULT_HALF_WIDTH_MM
    b = 115.0 * float(rng.uniform(0.95, 1.08))
    fat = float(rng.uniform(10.0, 28.0))
    wall = float(rng.uniform(8.0, 12.0))
    return {"a": a, "b": b, "fat": fat, "wall": wall, "p": float(rng.uniform(2.1, 2.6))}


def _ellipse_rho(x: np.ndarray, y: np.ndarray, a: float, b: float, p: float) -> np.ndarray:
    return (
        np.abs(x / np.float32(a)) ** np.float32(p) + np.abs(y / np.float32(b)) ** np.float32(p)
    ) ** np.float32(1.0 / p)


def _paint_background(cv: _Canvas, rng: np.random.Generator, body: dict[str, float]) -> np.ndarray:
    """Fat, muscle wall, visceral mixture, lungs, heart, stomach and ribs. Returns the cavity mask."""
    g = cv.grid
    x, y, z = g.coords(g.full)
    a, b, p, fat, wall = body["a"], body["b"], body["p"], body["fat"], body["wall"]
    inside = _ellipse_rho(x, y, a, b, p) < 1.0
    inside = np.broadcast_to(inside, g.shape)
    cv.paint(g.full, inside, float(rng.uniform(-110, -90)), None, 8.0)
    muscle = _ellipse_rho(x, y, a - fat, b - fat, p) < 1.0
    cv.paint(g.full, muscle, float(rng.uniform(40, 55)), None, 6.0)
    ac, bc = a - fat - wall, b - fat - wall
    cavity = np.broadcast_to(_ellipse_rho(x, y, ac, bc, p) < 1.0, g.shape)
    # bowel loops in visceral fat with a few gas pockets; the paraspinal/psoas block stays muscle
    coarse = _smooth_noise(rng, g, 4.0 * float(g.scale[0]) * 3.0)
    visceral = cavity & ~((np.abs(x) < 45) & (y < -32))
    bowel_hu = float(rng.uniform(20, 40))
    mix = np.where(coarse < -0.45, np.float32(-95.0), np.float32(bowel_hu))
    mix = np.where(coarse > 2.1, np.float32(-750.0), mix)
    cv.paint(g.full, visceral, mix, None, 10.0)
    # ribs: sloping bands in the muscle wall, posterior and lateral only, upper abdomen
    rho_c = _ellipse_rho(x, y, ac, bc, p)
    period, height, phase = 30.0, 9.0, float(rng.uniform(0, 30))
    band = (rho_c > 1.0) & (rho_c < 1.0 + 7.0 / ac)
    lateral = (y < 0.2 * b) | (np.abs(x) > 0.55 * a)
    zz = np.mod(z + 0.35 * y - phase, period) < height
    ribs = band & lateral & zz & (z > 10.0)
    cv.paint(g.full, ribs, float(rng.uniform(550, 700)), None, 40.0)
    # lungs (clipped to the cavity), heart, stomach with a gas cap
    lung_hu = float(rng.uniform(-870, -830))
    for side in (1.0, -1.0):
        lung = _blob(rng, (side * 80.0, -10.0, 175.0), (62.0, 72.0, 110.0), deform=0.03)
        box = g.box(*lung.bounds())
        if box is not None:
            lx, ly, lz = g.coords(box)
            cv.paint(box, (lung.level(lx, ly, lz) < 0) & cavity[box], lung_hu, None, 35.0)
    heart = _blob(rng, (-15.0, 30.0, 175.0), (55.0, 42.0, 45.0), deform=0.03)
    box = g.box(*heart.bounds())
    if box is not None:
        hx, hy, hz = g.coords(box)
        cv.paint(box, (heart.level(hx, hy, hz) < 0) & cavity[box], float(rng.uniform(110, 160)), None, 8.0)
    stomach = _blob(rng, (-50.0, 35.0, 45.0), (35.0, 26.0, 30.0))
    box = g.box(*stomach.bounds())
    if box is not None:
        sx, sy, sz = g.coords(box)
        inner = (stomach.level(sx, sy, sz) < 0) & cavity[box]
        cv.paint(box, inner, float(rng.uniform(5, 25)), None, 6.0)
        gas_y = stomach.center[1] + 0.45 * stomach.semi[1]
        cv.paint(box, inner & (sy > gas_y), -950.0, None, 10.0)
    return cavity


def _paint_organs(cv: _Canvas, rng: np.random.Generator, body: dict[str, float], cavity: np.ndarray) -> None:
    """Liver, spleen and kidneys (labels 1-4); the right kidney always presses into the liver."""
    g = cv.grid
    liver_hu = float(rng.uniform(50, 70))
    right_lobe = _blob(rng, (80.0, -5.0, 55.0), (70.0, 75.0, 65.0), power=2.2)
    left_lobe = _blob(rng, (-5.0, 40.0, 75.0), (55.0, 32.0, 35.0), jitter_mm=5.0)
    lo = np.minimum(right_lobe.bounds()[0], left_lobe.bounds()[0])
    hi = np.maximum(right_lobe.bounds()[1], left_lobe.bounds()[1])
    box = g.box(lo, hi)
    if box is not None:
        x, y, z = g.coords(box)
        level = np.minimum(right_lobe.level(x, y, z), left_lobe.level(x, y, z))
        cv.paint(box, (level < 0) & cavity[box], liver_hu, LABELS["liver"], 7.0)

    spleen = _blob(rng, (-88.0, -30.0, 72.0), (20.0, 48.0, 40.0), rot=_rotation(az=np.deg2rad(32.0)))
    box = g.box(*spleen.bounds())
    if box is not None:
        x, y, z = g.coords(box)
        cv.paint(
            box, (spleen.level(x, y, z) < 0) & cavity[box], float(rng.uniform(42, 58)), LABELS["spleen"], 6.0
        )

    cortex = float(rng.uniform(150, 190))
    medulla = cortex - float(rng.uniform(30, 60))
    for name, side, cz in (("right_kidney", 1.0, -10.0), ("left_kidney", -1.0, 0.0)):
        # long axis tilted so the upper pole leans medially; hilum faces antero-medially
        rot = _rotation(ay=np.deg2rad(side * 12.0), az=np.deg2rad(-side * 25.0))
        kidney = _blob(
            rng,
            (side * 62.0, -45.0, cz),
            (24.0, 18.0, 45.0),
            rot=rot,
            jitter_mm=4.0,
            size_var=0.1,
            deform=0.025,
        )
        if name == "right_kidney":  # the upper pole must lie well inside the liver's right lobe
            pole = kidney.center + kidney.rot[:, 2] * kidney.semi[2] * 0.8
            u = np.asarray(right_lobe.local(*[np.float32(v) for v in pole]), dtype=np.float64)
            if float(np.sum(np.abs(u) ** right_lobe.power) ** (1 / right_lobe.power)) > 0.75:
                kidney = _Blob(
                    kidney.center + (right_lobe.center - pole) * 0.3,
                    kidney.semi,
                    kidney.rot,
                    kidney.power,
                    kidney.freqs,
                    kidney.phases,
                    kidney.amps,
                )
        sinus = _Blob(
            kidney.center + kidney.rot @ (np.array([-side * 0.85, 0.3, 0.0]) * kidney.semi),
            kidney.semi * np.array([0.5, 0.4, 0.45]),
            kidney.rot,
        )
        box = g.box(*kidney.bounds())
        if box is None:
            continue
        x, y, z = g.coords(box)
        u = kidney.local(x, y, z)
        r = np.sqrt(u[0] * u[0] + u[1] * u[1] + u[2] * u[2])
        outer = (kidney.level(x, y, z) < 0) & cavity[box]
        hu = np.where(r < 0.62, np.float32(medulla), np.float32(cortex))
        cv.paint(box, outer, hu, LABELS[name], 6.0)
        cv.paint(box, outer & (sinus.level(x, y, z) < 0), float(rng.uniform(-80, -40)), 0, 10.0)


def _paint_spine_and_vessels(cv: _Canvas, rng: np.random.Generator, body: dict[str, float]) -> None:
    """Vertebrae (label 6), spinal canal, discs, aorta (label 5, touching the vertebral bodies), IVC."""
    g = cv.grid
    sa, sb, sy0 = 22.0 * rng.uniform(0.9, 1.1), 19.0 * rng.uniform(0.9, 1.1), -52.0
    period, height, phase = 34.0, 26.0, float(rng.uniform(0, 34))
    lo = np.array([-40.0, sy0 - sb - 60.0, -1e4])
    hi = np.array([40.0, sy0 + sb + 1.0, 1e4])
    box = g.box(lo, hi)
    if box is not None:
        x, y, z = g.coords(box)
        in_vert = np.mod(z - phase, period) < height
        rho = np.sqrt((x / np.float32(sa)) ** 2 + ((y - np.float32(sy0)) / np.float32(sb)) ** 2)
        canal_y = sy0 - sb - 10.0
        rc = np.sqrt(x * x + (y - np.float32(canal_y)) ** 2)
        tip = -(body["b"] - body["fat"] - 3.0)
        posterior = (rc >= 9.0) & (rc < 15.0) & (y < sy0)
        posterior |= (np.abs(x) < 4.0) & (y <= canal_y - 9.0) & (y > tip)  # spinous process
        posterior |= (np.abs(y - np.float32(canal_y + 3.0)) < 4.0) & (np.abs(x) > 9.0) & (np.abs(x) < 34.0)
        bone = in_vert & ((rho < 1.0) | posterior)
        cancellous = float(rng.uniform(260, 340))
        cortical = float(rng.uniform(800, 1000))
        hu = np.where((rho < 0.82) & ~posterior, np.float32(cancellous), np.float32(cortical))
        cv.paint(box, bone, hu, LABELS["spine"], 50.0)
        cv.paint(box, ~in_vert & (rho < 1.0), float(rng.uniform(70, 100)), 0, 8.0)  # discs
        cv.paint(box, rc < 9.0, float(rng.uniform(5, 20)), 0, 4.0)  # spinal canal

    # aorta: a vertical cylinder left of the midline whose wall overlaps the vertebral body by more
    # than one voxel, so the labels always share a border
    ra = 11.0 * float(rng.uniform(0.85, 1.15))
    ax = -14.0 + float(rng.uniform(-3.0, 3.0))
    y_front = sy0 + sb * np.sqrt(max(1.0 - (ax / sa) ** 2, 0.0))
    overlap = 1.2 * float(g.spacing[:2].max()) / float(g.scale[0]) + 0.5
    ay = y_front + ra - overlap
    box = g.box(np.array([ax - ra - 1, ay - ra - 1, -1e4]), np.array([ax + ra + 1, ay + ra + 1, 1e4]))
    if box is not None:
        x, y, _ = g.coords(box)
        aorta = (x - np.float32(ax)) ** 2 + (y - np.float32(ay)) ** 2 < np.float32(ra * ra)
        cv.paint(box, aorta, float(rng.uniform(180, 320)), LABELS["aorta"], 8.0)
    # inferior vena cava (unlabelled, dimmer), right of the aorta, indenting the liver
    ivc = _blob(
        rng, (22.0, -22.0, 0.0), (11.0, 8.0, 1e4), jitter_mm=2.0, angle_deg=0.0, deform=0.0, n_waves=0
    )
    box = g.box(np.array([5.0, -35.0, -1e4]), np.array([40.0, -8.0, 1e4]))
    if box is not None:
        x, y, z = g.coords(box)
        cv.paint(box, ivc.level(x, y, z) < 0, float(rng.uniform(110, 160)), 0, 8.0)


def make_ct_case(
    index: int, *, seed: int = 0, oblique: bool = False
) -> tuple[Volume, Volume, dict[str, Any]]:
    """Generate phantom case ``index`` in memory.

    Args:
        index: Case number; selects the storage orientation (``ORIENTATIONS[index % 4]``) and the
            random stream.
        seed: Dataset seed.
        oblique: Rotate every fifth case's grid in-plane by 8-20 degrees (an oblique acquisition).

    Returns:
        ``(image, label, info)``: int16 HU image and uint8 label map on the same grid (``(1, X, Y, Z)``),
        and a JSON-able dict with orientation, spacing, shape, origin and per-label volumes (mL).
    """
    rng = case_rng(seed, index)
    orientation = ORIENTATIONS[index % len(ORIENTATIONS)]
    oblique_deg = float(rng.uniform(8.0, 20.0)) if oblique and index % 5 == 4 else 0.0
    grid = _make_grid(rng, orientation, oblique_deg)
    body = _body(rng)
    cv = _Canvas(grid)
    cavity = _paint_background(cv, rng, body)
    _paint_organs(cv, rng, body, cavity)
    _paint_spine_and_vessels(cv, rng, body)

    spacing = grid.spacing
    psf = [max(0.45 / float(s), 0.2) for s in spacing]  # ~0.45 mm in-plane PSF, thinner in z
    hu = ndi.gaussian_filter(cv.hu, psf, truncate=2.5)
    hu += cv.tex * _smooth_noise(rng, grid, 1.2)
    hu += rng.normal(0.0, float(rng.uniform(8.0, 18.0)), grid.shape).astype(np.float32)
    image = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)

    voxel_ml = float(np.prod(spacing)) / 1000.0
    counts = np.bincount(cv.label.ravel(), minlength=len(LABELS))
    info: dict[str, Any] = {
        "orientation": orientation_code(grid.affine),
        "oblique_deg": round(oblique_deg, 3),
        "shape": list(grid.shape),
        "spacing_mm": [round(float(s), 6) for s in spacing],
        "origin_mm": [round(float(v), 4) for v in grid.affine[:3, 3]],
        "scale": [round(float(v), 4) for v in grid.scale],
        "volume_ml": {
            name: round(float(counts[i]) * voxel_ml, 4) for name, i in LABELS.items() if name != "background"
        },
    }
    meta = {"modality": "CT", "phantom": True}
    return (
        Volume(image[None], grid.affine.copy(), dict(meta)),
        Volume(cv.label[None], grid.affine.copy(), dict(meta)),
        info,
    )


# ----------------------------------------------------------------------------------------------
# dataset writer


def _write_json(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def _prepare_out(out: Path, subdirs: tuple[str, ...], generator: str) -> None:
    """Create ``out``; clear the sub-folders of an earlier phantom there; refuse other non-empty folders."""
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()):
        ds = out / "dataset.json"
        previous = None
        if ds.is_file():
            try:
                previous = json.loads(ds.read_text()).get("phantom", {}).get("generator")
            except (json.JSONDecodeError, AttributeError):
                previous = None
        if previous != generator:
            raise DataError(
                f"{out}: the folder is not empty and does not hold a phantom dataset from {generator}; "
                "choose a new or empty --out folder"
            )
        for sub in subdirs:
            if (out / sub).is_dir():
                shutil.rmtree(out / sub)
    out.mkdir(parents=True, exist_ok=True)


def synth_ct(
    out: str | Path,
    *,
    cases: int = 10,
    seed: int = 0,
    dicom_cases: int | None = None,
    progress: bool = False,
    oblique: bool = False,
) -> Path:
    """Write a synthetic abdominal CT dataset in the MSD / nnU-Net v2 raw layout.

    Args:
        out: Output folder (created). An existing non-empty folder must hold an earlier CT phantom,
            whose case folders are replaced.
        cases: Total number of cases; the last ``round(cases / 5)`` (at least 1, and at least one
            training case when ``cases >= 2``) go to ``imagesTs``/``labelsTs``.
        seed: Dataset seed; case ``k`` is the same for a given seed whatever ``cases`` is.
        dicom_cases: How many held-out cases also get a DICOM series in ``dicomTs/<case>/``;
            default all held-out cases if there are at most 2, else 2; 0 disables.
        progress: Show a progress bar.
        oblique: Give every fifth case an in-plane oblique grid (off by default; most pipelines
            only reorient, and an oblique grid needs resampling).

    Returns:
        ``out``.

    Long because it is the one sequential script of the phantom dataset (cases, splits, DICOM copies,
    ``dataset.json``); the anatomy is drawn by the helpers it calls.
    """

    out = Path(out)
    n_test = num_test_cases(cases)
    n_train = cases - n_test
    if dicom_cases is None:
        dicom_cases = n_test if n_test <= 2 else 2
    if dicom_cases < 0:
        raise DataError(f"dicom_cases must be >= 0, got {dicom_cases}")
    dicom_cases = min(dicom_cases, n_test)
    generator = f"{__name__}.synth_ct"
    _prepare_out(out, ("imagesTr", "labelsTr", "imagesTs", "labelsTs", "dicomTs"), generator)

    training: list[dict[str, str]] = []
    test: list[dict[str, str]] = []
    infos: dict[str, Any] = {}
    for k in tqdm(range(cases), disable=not progress, desc="CT phantom", unit="case"):
        t0 = time.perf_counter()
        cid = f"phantom_{k:03d}"
        split = "Tr" if k < n_train else "Ts"
        image, label, info = make_ct_case(k, seed=seed, oblique=oblique)
        entry = {"image": f"images{split}/{cid}_0000.nii.gz", "label": f"labels{split}/{cid}.nii.gz"}
        save_volume(image, out / entry["image"], dtype=np.int16)
        save_label_map(label, out / entry["label"])
        if split == "Ts" and k - n_train < dicom_cases:
            entry["dicom"] = f"dicomTs/{cid}"
            src = ["medseg-phantom-ct", str(seed), cid]
            write_dicom_series(
                image,
                out / entry["dicom"],
                modality="CT",
                patient_id=cid.upper(),
                patient_name=f"Phantom^{cid}",
                series_description=f"synthetic abdomen {info['orientation']}",
                study_uid=str(generate_uid(entropy_srcs=[*src, "study"])),
                series_uid=str(generate_uid(entropy_srcs=[*src, "series"])),
                study_date="20240101",
            )
        (training if split == "Tr" else test).append(entry)
        info["split"] = "train" if split == "Tr" else "test"
        infos[cid] = info
        logger.info(
            "%s: %s %s spacing %s mm in %.2f s",
            cid,
            info["orientation"],
            "x".join(map(str, info["shape"])),
            "x".join(f"{s:.2f}" for s in info["spacing_mm"]),
            time.perf_counter() - t0,
        )

    dataset = {
        "name": "MedsegPhantomCT",
        "description": (
            "Synthetic contrast-enhanced abdominal CT phantoms (miniature torso, about 0.2-0.4x adult "
            "size in-plane) generated by medseg; HU intensities, anisotropic spacing, mixed orientations."
        ),
        "reference": "medseg synthetic phantom",
        "licence": "CC0-1.0",
        "release": str(PHANTOM_VERSION),
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "channel_names": {"0": "CT"},
        "labels": dict(LABELS),
        "numTraining": n_train,
        "numTest": n_test,
        "file_ending": ".nii.gz",
        "training": training,
        "test": test,
        "phantom": {
            "generator": generator,
            "version": PHANTOM_VERSION,
            "seed": seed,
            "orientations": list(ORIENTATIONS),
            "units": "HU",
            "cases": infos,
        },
    }
    _write_json(out / "dataset.json", dataset)
    logger.info("wrote %d CT phantom cases (%d train, %d test) to %s", cases, n_train, n_test, out)
    return out
