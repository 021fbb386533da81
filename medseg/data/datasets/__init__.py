"""Dataset discovery for the three on-disk layouts, and loading one case.

Layouts (``data.layout``):

* ``msd`` — Medical Segmentation Decathlon / nnU-Net v2 raw layout: ``dataset.json``, ``imagesTr/``,
  ``labelsTr/``, ``imagesTs/`` and optionally ``labelsTs/``. Image files are ``<case>_0000.nii.gz``,
  ``<case>_0001.nii.gz``, ... (one file per channel, nnU-Net v2) or ``<case>.nii.gz`` (MSD Task folders,
  where a multi-modal case is one 4D file). Label maps are ``<case>.nii.gz``. ``dataset.json`` labels
  may be nnU-Net v2 style (``{"background": 0, "liver": 1}``) or MSD style (``{"0": "background",
  "1": "liver"}``); ``channel_names`` (v2) or ``modality`` (MSD) give the channels, ``file_ending`` the
  file suffix (default: the suffix most common in ``imagesTr/``, else ``.nii.gz``). ``_0000`` is taken
  as a channel suffix when every image name ends in ``_NNNN`` and the label names match the names
  without it (an MSD case may itself be called ``patient_0001``).
* ``scr`` — 2D chest X-ray layout of the SCR database: ``images/<case>.png`` (or .jpg/.dcm/.nii.gz ...)
  and ``masks/<structure>/<case>.png`` (any image suffix; masks may be stored at a lower resolution
  than the image and are resampled onto it by :func:`load_case_masks`). Held-out cases are listed in
  ``test.txt`` (one id per line, ``#`` comments), in ``dataset.json`` ``{"test": [...]}``, or live in a
  ``test/`` subfolder with the same ``images/`` + ``masks/`` structure.
* ``list`` — an explicit CSV (header row) or YAML (list of mappings) file, ``data.list_file``, with
  columns ``image`` (or ``image_0000``, ``image_0001``, ... for channels), ``label`` (exclusive classes)
  or one column per structure named ``<structure>`` or ``mask_<structure>`` (overlapping structures),
  optional ``case`` (default: the image file name without suffix and ``_0000``) and ``split``
  (``train``/``test``, default ``train``). Relative paths resolve against ``data.root``, then against
  the list file's folder.

Discovery lists and pairs files but never reads image data. What does not pair up (an image without
a label, a label without an image, a missing channel or structure mask) is recorded as a
:class:`Problem` in :attr:`Dataset.problems` rather than raised, so that ``medseg data check`` can
report every problem in one pass. :func:`load_case` reads one case and raises
:class:`~medseg.errors.DataError` naming the case and the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from medseg.data.datasets._common import (
    IMAGE_SUFFIXES,
    MASK_SUFFIXES,
    Case,
    Dataset,
    Layout,
    Problem,
    Severity,
    Split,
)
from medseg.data.datasets.grids import grid_mismatches, mask_geometry_problems, squeeze_2d
from medseg.data.datasets.listfile import _discover_list
from medseg.data.datasets.msd import _discover_msd
from medseg.data.datasets.read import load_case, load_case_masks
from medseg.data.datasets.scr import _discover_scr
from medseg.errors import DataError

if TYPE_CHECKING:
    from medseg.config import DataConfig

__all__ = [
    "IMAGE_SUFFIXES",
    "Layout",
    "Severity",
    "Split",
    "MASK_SUFFIXES",
    "Case",
    "Dataset",
    "Problem",
    "load_dataset",
    "dataset_from_folder",
    "detect_layout",
    "load_case",
    "load_case_masks",
    "grid_mismatches",
    "mask_geometry_problems",
    "squeeze_2d",
]


def detect_layout(root: Path) -> Layout:
    """Guess the layout of a dataset folder.

    ``"msd"`` if ``imagesTr/`` exists, ``"scr"`` if ``images/`` and ``masks/`` exist, else ``"msd"`` if
    a ``dataset.json`` exists (an SCR folder may carry a ``dataset.json`` too, so it is checked last).

    Raises:
        DataError: ``root`` is not a folder or matches neither layout; the message describes both.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder does not exist")
    if (root / "imagesTr").is_dir():
        return "msd"
    if (root / "images").is_dir() and (root / "masks").is_dir():
        return "scr"
    if (root / "dataset.json").is_file():
        return "msd"
    raise DataError(
        f"{root}: not a recognised dataset layout. Expected either MSD/nnU-Net (dataset.json, imagesTr/, "
        "labelsTr/, imagesTs/) or SCR (images/<case>.png and masks/<structure>/<case>.png); for any "
        "other arrangement write a CSV/YAML list of image/label paths and set data.layout: list and "
        "data.list_file"
    )


def dataset_from_folder(root: Path) -> Dataset:
    """Discover a dataset folder without a config: layout detected, names from ``dataset.json``.

    For SCR folders the structures come from ``dataset.json`` ``structures`` if present, else from
    the sorted subfolder names of ``masks/``.

    Raises:
        DataError: The folder matches no layout, or ``dataset.json`` is invalid.
    """
    root = Path(root)
    return _discover_msd(root) if detect_layout(root) == "msd" else _discover_scr(root, None)


def load_dataset(data: DataConfig) -> Dataset:
    """Discover the dataset a config describes (``data.layout``, ``data.root``, ``data.list_file``).

    The config's ``labels``/``structures`` are authoritative; ``dataset.json``'s labels are used only
    when the config has none, and a disagreement is recorded as a ``label_names`` warning.

    Raises:
        DataError: The root or list file does not exist, the folder does not match the layout (the
            message names the layout it does look like), or a list/JSON file cannot be parsed.
    """
    root = Path(data.root)
    if data.layout == "list":
        ds = _discover_list(data)
    else:
        if not root.is_dir():
            raise DataError(f"data.root {root} does not exist or is not a folder")
        if data.layout == "msd":
            looks_right = (root / "imagesTr").is_dir() or (root / "dataset.json").is_file()
            expected = "dataset.json and imagesTr/"
        else:
            looks_right = (root / "images").is_dir()
            expected = "images/<case>.png and masks/<structure>/<case>.png"
        if not looks_right:
            try:
                found: str | None = detect_layout(root)
            except DataError:
                found = None
            hint = f" It looks like the {found} layout: set data.layout: {found}." if found else ""
            raise DataError(f"{root}: data.layout is {data.layout} but {expected} were not found.{hint}")
        ds = _discover_msd(root) if data.layout == "msd" else _discover_scr(root, data.structures)
    if data.labels is not None:
        if ds.label_names is not None and ds.label_names != dict(data.labels):
            ds.problems.append(
                Problem(
                    "warning",
                    "",
                    "dataset.json",
                    "label_names",
                    f"dataset.json labels {ds.label_names} differ from data.labels {dict(data.labels)}; "
                    "using data.labels from the config",
                )
            )
        ds.label_names, ds.structures = dict(data.labels), None
    else:
        ds.label_names, ds.structures = None, list(data.structures or [])
    return ds
