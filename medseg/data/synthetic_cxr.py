"""Synthetic PA chest radiographs with SCR-style per-structure masks.

The layout mirrors the SCR database (JSRT images with Segmentation in Chest Radiographs masks)::

    out/dataset.json
    out/images/cxr_000.png                     grey radiograph, uint8, size x size pixels
    out/masks/<structure>/cxr_000.png          binary masks, values 0/255
    out/test.txt                               held-out case ids, one per line

Structures (:data:`STRUCTURES`): ``left_lung``, ``right_lung``, ``heart``, ``left_clavicle``,
``right_clavicle`` — named from the *patient's* side. In a PA radiograph the patient faces the
detector, so the patient's left is on the image's right: ``left_lung`` lies in the right half of the
image (larger column index). As in SCR, masks overlap: the clavicles cross the lung apices in every
case, and the heart overlaps the medial lung borders by a few pixels.

Like the real SCR masks (1024 pixels for 2048-pixel images), the masks of every odd-numbered case are
written at half the image resolution, so loaders must resample masks to the image grid. All PNGs use
the raster pixel frame of :mod:`medseg.types` (spacing 1, ``x`` along columns, ``y`` along rows); the
nominal pixel size is recorded in ``dataset.json`` only, as real PNG exports do not carry it.

The image is an attenuation model: soft tissue with a thickness gradient, dark lung fields with
vascular texture, bright mediastinum/heart and subdiaphragmatic region, spine, posterior ribs and
clavicles, blurred, with a smooth exposure gradient, noise and a random tone curve per case.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi
from tqdm.auto import tqdm

from medseg.data.synthetic import PHANTOM_VERSION, _prepare_out, _write_json, num_test_cases
from medseg.errors import DataError
from medseg.io import save_volume
from medseg.io._atomic import write_text_atomic
from medseg.types import Volume

logger = logging.getLogger(__name__)

__all__ = ["STRUCTURES", "make_cxr_case", "synth_chest_xray"]

STRUCTURES: tuple[str, ...] = ("left_lung", "right_lung", "heart", "left_clavicle", "right_clavicle")
"""Mask folders written by :func:`synth_chest_xray`, named from the patient's side."""

_NOMINAL_FOV_MM = 360.0  # a 256-pixel image corresponds to ~1.4 mm pixels of a 36 cm detector


def _cxr_rng(seed: int, index: int) -> np.random.Generator:
    # a stream separate from the CT phantom's (which uses spawn_key=(index,))
    return np.random.default_rng(np.random.SeedSequence([seed, 0xC0A2], spawn_key=(index,)))


def _smooth(rng: np.random.Generator, shape: tuple[int, int], sigma_px: float) -> np.ndarray:

    f = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_px, truncate=2.5)
    return f / np.float32(max(float(f.std()), 1e-6))


def _lung(
    rng: np.random.Generator,
    u: np.ndarray,
    v: np.ndarray,
    *,
    cu: float,
    side: float,
    width: float,
    apex: float,
    base: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mask of one lung field with its lateral (``s``: 0 medial .. 1 lateral) and vertical (``t``: 0
    apex .. 1 diaphragm) coordinates.

    ``side`` is +1 for the lung drawn on the image's right half (the patient's left lung). The field
    widens from a rounded apex to the costophrenic angle (``s = t = 1``) above a domed hemidiaphragm.
    """
    medial = cu + side * rng.uniform(0.035, 0.06)
    lateral = cu + side * width
    s = (u - medial) / (lateral - medial)
    dome = rng.uniform(0.04, 0.08)
    bottom = base - dome * (1 - ((s - 0.4) / 0.6) ** 2)
    t = (v - apex) / (bottom - apex)
    wave = rng.uniform(0.01, 0.03) * np.sin(2 * np.pi * rng.uniform(0.5, 1.2) * t + rng.uniform(0, 2 * np.pi))
    s_apex = rng.uniform(0.3, 0.42)
    t_medial = rng.uniform(0.15, 0.3)
    s_min = s_apex * np.sqrt(np.clip(1 - t / t_medial, 0, 1))
    s_max = s_apex + (1 - s_apex) * np.clip(t, 0, 1) ** rng.uniform(0.4, 0.55) + wave
    mask = (t >= 0) & (t <= 1) & (s >= s_min) & (s <= s_max)
    return mask, s, t


def _clavicle(
    rng: np.random.Generator,
    u: np.ndarray,
    v: np.ndarray,
    *,
    cu: float,
    side: float,
    width: float,
    apex: float,
) -> np.ndarray:
    """A gently S-shaped bone from the sternal end (medial) to the acromial end, crossing the apex."""
    u0 = cu + side * rng.uniform(0.03, 0.05)
    u1 = cu + side * (width + rng.uniform(0.0, 0.04))
    v0 = apex + rng.uniform(0.07, 0.1)
    v1 = apex + rng.uniform(-0.01, 0.03)
    t = (u - u0) / (u1 - u0)
    centre = v0 + (v1 - v0) * t + rng.uniform(0.008, 0.018) * np.sin(2 * np.pi * t)
    half = rng.uniform(0.011, 0.015) * (1.25 - 0.4 * t)
    return (t >= 0) & (t <= 1) & (np.abs(v - centre) <= half)


def make_cxr_case(index: int, *, seed: int = 0, size: int = 256) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Generate chest X-ray case ``index``.

    Returns:
        ``(image, masks)``: uint8 image of shape ``(rows, columns) = (size, size)`` and boolean masks of
        the same shape keyed by structure name (patient's side; left lung on the image's right).

    Long because the radiograph's anatomy is drawn in one pass, structure after structure, on shared
    coordinate grids; splitting it would pass those grids around without making a step clearer.
    """

    rng = _cxr_rng(seed, index)
    rows = cols = int(size)
    v, u = np.meshgrid(
        (np.arange(rows, dtype=np.float32) + 0.5) / rows,
        (np.arange(cols, dtype=np.float32) + 0.5) / cols,
        indexing="ij",
    )
    cu = 0.5 + rng.uniform(-0.03, 0.03)
    width = rng.uniform(0.33, 0.4)
    apex = rng.uniform(0.1, 0.17)
    base = rng.uniform(0.74, 0.84)
    # small in-plane rotation of the patient
    ang = np.deg2rad(rng.uniform(-3.0, 3.0))
    cu_, cv_ = cu, 0.5
    ur = cu_ + (u - cu_) * np.cos(ang) - (v - cv_) * np.sin(ang)
    vr = cv_ + (u - cu_) * np.sin(ang) + (v - cv_) * np.cos(ang)

    left_lung, s_left, t_left = _lung(rng, ur, vr, cu=cu, side=1.0, width=width, apex=apex, base=base + 0.02)
    right_width = width * rng.uniform(0.97, 1.03)
    right_lung, s_right, t_right = _lung(
        rng, ur, vr, cu=cu, side=-1.0, width=right_width, apex=apex, base=base
    )
    # heart: rotated ellipse, mostly on the patient's left (image right), cut by the diaphragm
    hc_u, hc_v = cu + rng.uniform(0.05, 0.08), base - rng.uniform(0.12, 0.16)
    ha, hb = rng.uniform(0.15, 0.19), rng.uniform(0.11, 0.14)
    th = np.deg2rad(rng.uniform(15.0, 30.0))
    du, dv = ur - hc_u, vr - hc_v
    hu_ = du * np.cos(th) + dv * np.sin(th)
    hv_ = -du * np.sin(th) + dv * np.cos(th)
    rho = (hu_ / ha) ** 2 + (hv_ / hb) ** 2
    below = vr <= base + 0.01
    heart = (rho <= 1.0) & below
    core = (rho <= (1.0 - 0.025 / ha) ** 2) & below  # lungs keep a thin band overlapping the heart
    left_lung &= ~core
    right_lung &= ~core
    left_clav = _clavicle(rng, ur, vr, cu=cu, side=1.0, width=width, apex=apex)
    right_clav = _clavicle(rng, ur, vr, cu=cu, side=-1.0, width=width, apex=apex)

    # ---- attenuation image (bright = dense)
    body = ((np.abs(ur - cu) / (width + 0.1)) ** 3 + (np.abs(vr - 0.62) / 0.64) ** 3) <= 1.0
    thick = np.clip(1.0 - ((ur - cu) / (width + 0.12)) ** 2, 0, 1)
    img = np.where(body, 0.42 + 0.2 * thick, 0.03).astype(np.float32)
    below_diaphragm = body & (vr > base - 0.02) & ~left_lung & ~right_lung
    img[below_diaphragm] += 0.12
    lungs = left_lung | right_lung
    s = np.clip(np.where(left_lung, s_left, s_right), 0, 1)
    t = np.clip(np.where(left_lung, t_left, t_right), 0, 1)
    vessels = _smooth(rng, (rows, cols), 1.2 * rows / 256)
    lung_level = rng.uniform(0.1, 0.18)
    hilum = 0.1 * np.exp(-((s - 0.08) ** 2) / 0.02 - ((t - 0.45) ** 2) / 0.03)
    fade = 0.08 * (1 - s) ** 2 + 0.06 * t**2  # denser medially and towards the bases
    img[lungs] = (lung_level + fade + hilum + 0.025 * (1 + 2 * hilum) * vessels)[lungs]
    img[heart] = np.maximum(img[heart], rng.uniform(0.62, 0.72))
    mediastinum = body & (np.abs(ur - cu) < 0.06) & (vr < base) & ~lungs
    img[mediastinum] = np.maximum(img[mediastinum], 0.62)
    # gastric bubble under the left hemidiaphragm
    gb = ((ur - (cu + 0.16)) / 0.05) ** 2 + ((vr - (base + 0.06)) / 0.03) ** 2 <= 1.0
    img[gb & body] -= 0.25
    # bones: spine, posterior ribs, clavicles
    spine = body & (np.abs(ur - cu) < rng.uniform(0.03, 0.04))
    img[spine] += 0.06
    rib_gap = (base - apex) / 9.5
    for side in (-1.0, 1.0):
        lat = (ur - cu) * side / width
        for i in range(10):
            # posterior ribs: arch up and out from the spine, then curve down along the chest wall
            centre = apex - 0.01 + i * rib_gap + (0.1 + 0.01 * i) * (lat - 0.45) ** 2 - 0.02
            rib = (lat > 0.06) & (lat < 1.08) & (np.abs(vr - centre) < 0.009 + 0.001 * i) & body
            img[rib] += 0.07
    img[left_clav | right_clav] += 0.25

    sig = 0.8 * rows / 256
    img = ndi.gaussian_filter(img, sig, truncate=2.5)
    img += 0.04 * _smooth(rng, (rows, cols), 30.0 * rows / 256)  # exposure gradient
    img += rng.normal(0.0, rng.uniform(0.008, 0.02), img.shape).astype(np.float32)
    gamma = rng.uniform(0.8, 1.25)
    lo, hi = rng.uniform(-0.02, 0.05), rng.uniform(0.85, 1.0)
    img = np.clip((img - lo) / (hi - lo), 0, 1) ** gamma
    image = np.rint(img * 255).astype(np.uint8)

    masks = {
        "left_lung": left_lung,
        "right_lung": right_lung,
        "heart": heart,
        "left_clavicle": left_clav,
        "right_clavicle": right_clav,
    }
    return image, masks


def _half_resolution(mask: np.ndarray) -> np.ndarray:
    """2x2 block majority (area fraction >= 0.5) of a boolean mask; odd edges are dropped."""
    r, c = mask.shape[0] // 2 * 2, mask.shape[1] // 2 * 2
    m = mask[:r, :c].astype(np.float32)
    return m.reshape(r // 2, 2, c // 2, 2).mean(axis=(1, 3)) >= 0.5


def _raster_volume(rc: np.ndarray) -> Volume:
    """``(rows, columns)`` array -> ``(1, X=columns, Y=rows)`` Volume in the raster pixel frame."""
    return Volume(np.ascontiguousarray(rc.T)[None], np.eye(4), {})


def synth_chest_xray(
    out: str | Path, *, cases: int = 20, seed: int = 0, progress: bool = False, size: int = 256
) -> Path:
    """Write a synthetic chest X-ray dataset in the SCR layout (see the module docstring).

    Args:
        out: Output folder (created). An existing non-empty folder must hold an earlier chest X-ray
            phantom, whose images and masks are replaced.
        cases: Number of cases; the last ``round(cases / 5)`` (at least 1, leaving at least one for
            training when ``cases >= 2``) are listed in ``test.txt``.
        seed: Dataset seed; case ``k`` is the same for a given seed whatever ``cases`` is.
        progress: Show a progress bar.
        size: Image side in pixels (masks of odd-numbered cases are ``size // 2``).

    Returns:
        ``out``.
    """

    if size < 32:
        raise DataError(f"size must be at least 32 pixels, got {size}")
    out = Path(out)
    n_test = num_test_cases(cases)
    n_train = cases - n_test
    generator = f"{__name__}.synth_chest_xray"
    _prepare_out(out, ("images", "masks"), generator)
    ids = [f"cxr_{k:03d}" for k in range(cases)]
    infos: dict[str, Any] = {}
    for k in tqdm(range(cases), disable=not progress, desc="CXR phantom", unit="case"):
        t0 = time.perf_counter()
        cid = ids[k]
        image, masks = make_cxr_case(k, seed=seed, size=size)
        save_volume(_raster_volume(image), out / "images" / f"{cid}.png")
        half = k % 2 == 1
        for name in STRUCTURES:
            m = _half_resolution(masks[name]) if half else masks[name]
            save_volume(
                _raster_volume(np.where(m, 255, 0).astype(np.uint8)), out / "masks" / name / f"{cid}.png"
            )
        infos[cid] = {
            "split": "train" if k < n_train else "test",
            "image_size": [int(image.shape[1]), int(image.shape[0])],
            "mask_scale": 0.5 if half else 1.0,
            "area_fraction": {n: round(float(masks[n].mean()), 5) for n in STRUCTURES},
        }
        logger.info("%s: %dx%d in %.2f s", cid, image.shape[1], image.shape[0], time.perf_counter() - t0)

    test_ids = ids[n_train:]
    write_text_atomic(out / "test.txt", "".join(f"{c}\n" for c in test_ids))
    dataset = {
        "name": "MedsegPhantomCXR",
        "description": (
            "Synthetic PA chest radiographs generated by medseg with SCR-style masks (patient's left "
            "on the image's right; masks of odd-numbered cases at half resolution)."
        ),
        "licence": "CC0-1.0",
        "layout": "scr",
        "modality": "CR",
        "images": "images",
        "masks": "masks",
        "file_ending": ".png",
        "structures": list(STRUCTURES),
        "mask_values": {"background": 0, "foreground": 255},
        "numTraining": n_train,
        "numTest": n_test,
        "training": ids[:n_train],
        "test": test_ids,
        "phantom": {
            "generator": generator,
            "version": PHANTOM_VERSION,
            "seed": seed,
            "size": size,
            "nominal_pixel_size_mm": round(_NOMINAL_FOV_MM / size, 4),
            "cases": infos,
        },
    }
    _write_json(out / "dataset.json", dataset)
    logger.info("wrote %d chest X-ray phantom cases (%d train, %d test) to %s", cases, n_train, n_test, out)
    return out
