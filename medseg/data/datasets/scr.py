"""The SCR chest X-ray layout: ``images/<case>.png`` and ``masks/<structure>/<case>.png``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from medseg.data.datasets._common import (
    IMAGE_SUFFIXES,
    MASK_SUFFIXES,
    Case,
    Dataset,
    Split,
    _Problems,
    _read_dataset_json,
    _read_id_list,
    _rel,
    _split_name,
    _visible_files,
)

# SCR


def _discover_scr(root: Path, structures: Sequence[str] | None) -> Dataset:
    problems = _Problems(root)
    meta = _read_dataset_json(root)
    if structures is None and isinstance(meta.get("structures"), list):
        structures = [str(s) for s in meta["structures"]]
    if structures is None:
        folders = (root / "masks").iterdir() if (root / "masks").is_dir() else []
        structures = sorted(p.name for p in folders if p.is_dir() and not p.name.startswith("."))
    structures = list(structures)

    test_ids: set[str] = set()
    sources: list[str] = []
    if (root / "test.txt").is_file():
        test_ids |= set(_read_id_list(root / "test.txt"))
        sources.append("test.txt")
    if isinstance(meta.get("test"), list):
        for t in meta["test"]:
            parts = _split_name(Path(str(t)).name, IMAGE_SUFFIXES)
            test_ids.add(parts[0] if parts else Path(str(t)).name)
        sources.append("dataset.json")

    cases = _scan_scr(root, structures, test_ids, "train", problems)
    if (root / "test" / "images").is_dir():
        cases += _scan_scr(root / "test", structures, set(), "test", problems)
    unknown = sorted(test_ids - {c.case_id for c in cases})
    if unknown:
        more = " ..." if len(unknown) > 10 else ""
        problems.warn(
            "",
            " + ".join(sources),
            "test_split",
            f"{len(unknown)} held-out case id(s) have no image in images/: {', '.join(unknown[:10])}{more}",
        )
    return Dataset(root=root, layout="scr", cases=cases, structures=structures, problems=list(problems))


def _scr_images(base: Path, problems: _Problems) -> dict[str, Path]:
    images: dict[str, Path] = {}
    for p in _visible_files(base / "images"):
        parts = _split_name(p.name, IMAGE_SUFFIXES)
        if parts is None:
            problems.warn("", p, "unexpected_file", "not an image file; ignored")
        elif parts[0] in images:
            msg = f"two images for case {parts[0]}: {images[parts[0]].name} and {p.name}; keep one"
            problems.error(parts[0], p, "duplicate_case", msg)
        else:
            images[parts[0]] = p
    return images


def _scr_masks(base: Path, structures: list[str], problems: _Problems) -> dict[str, dict[str, Path]]:
    masks: dict[str, dict[str, Path]] = {}
    for s in structures:
        folder = base / "masks" / s
        if not folder.is_dir():
            msg = f"mask folder for structure {s!r} does not exist; expected masks/{s}/<case>.png"
            problems.error("", folder, "missing_mask", msg)
            continue
        masks[s] = {}
        for p in _visible_files(folder):
            parts = _split_name(p.name, MASK_SUFFIXES)
            if parts is not None:
                masks[s][parts[0]] = p
    if (base / "masks").is_dir():
        for p in sorted((base / "masks").iterdir()):
            if p.is_dir() and not p.name.startswith(".") and p.name not in structures:
                msg = f"mask folder {p.name!r} is not among the structures {structures}; ignored"
                problems.warn("", p, "undeclared_structure", msg)
    return masks


def _scan_scr(
    base: Path, structures: list[str], test_ids: set[str], split: Split, problems: _Problems
) -> list[Case]:
    images = _scr_images(base, problems)
    masks = _scr_masks(base, structures, problems)
    cases = []
    for cid in sorted(images):
        case_masks = {s: masks[s][cid] for s in masks if cid in masks[s]}
        case_split: Split = "test" if (split == "test" or cid in test_ids) else "train"
        if case_split == "train" or case_masks:  # unlabelled held-out images are fine
            for s in masks:
                if s not in case_masks:
                    want = f"{_rel(base / 'masks' / s, problems.root)}/{cid}.png"
                    problems.error(cid, images[cid], "missing_mask", f"no mask for {s!r}: expected {want}")
        cases.append(Case(cid, (images[cid],), None, case_masks, case_split))
    for files in masks.values():
        for cid in sorted(set(files) - set(images)):
            want = f"{_rel(base / 'images', problems.root)}/{cid}.png (or .jpg/.dcm/.nii.gz)"
            problems.error(cid, files[cid], "missing_image", f"mask has no image: expected {want}")
    return cases
