"""The MSD / nnU-Net v2 layout: ``dataset.json``, ``imagesTr/``, ``labelsTr/``, ``imagesTs/``."""

from __future__ import annotations

from pathlib import Path

from medseg.data.datasets._common import (
    _CHANNEL_RE,
    IMAGE_SUFFIXES,
    Case,
    Dataset,
    Severity,
    _parse_channels,
    _parse_labels,
    _Problems,
    _read_dataset_json,
    _split_name,
    _visible_files,
)

# MSD / nnU-Net v2


def _guess_ending(root: Path) -> str:
    counts: dict[str, int] = {}
    for folder in ("imagesTr", "imagesTs"):
        for p in _visible_files(root / folder):
            parts = _split_name(p.name, IMAGE_SUFFIXES)
            if parts:
                counts[parts[1].lower()] = counts.get(parts[1].lower(), 0) + 1
    return max(counts, key=lambda k: counts[k]) if counts else ".nii.gz"


def _files_by_stem(folder: Path, ending: str, problems: _Problems) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for p in _visible_files(folder):
        if p.name.lower().endswith(ending.lower()) and len(p.name) > len(ending):
            out[p.name[: -len(ending)]] = p
        else:
            problems.warn("", p, "unexpected_file", f"file does not end with {ending} (file_ending); ignored")
    return out


def _uses_channel_suffix(image_stems: set[str], label_stems: set[str], has_channel_names: bool) -> bool:
    matches = [_CHANNEL_RE.match(s) for s in image_stems]
    if not matches or not all(matches):
        return False
    if not label_stems:
        return True
    stripped = {m.group("case") for m in matches if m}
    n_stripped, n_raw = len(label_stems & stripped), len(label_stems & image_stems)
    if n_stripped == n_raw == 0:
        return has_channel_names
    return n_stripped >= n_raw


def _discover_msd(root: Path) -> Dataset:
    problems = _Problems(root)
    meta = _read_dataset_json(root)
    ending = str(meta.get("file_ending") or _guess_ending(root))
    channel_names = _parse_channels(meta)
    label_names = _parse_labels(meta.get("labels"), root / "dataset.json", problems)
    folders = {
        n: _files_by_stem(root / n, ending, problems)
        for n in ("imagesTr", "labelsTr", "imagesTs", "labelsTs")
    }
    image_stems = set(folders["imagesTr"]) | set(folders["imagesTs"])
    label_stems = set(folders["labelsTr"]) | set(folders["labelsTs"])
    suffixed = _uses_channel_suffix(image_stems, label_stems, channel_names is not None)
    n_channels = len(channel_names) if channel_names else None
    if suffixed and n_channels is None:
        n_channels = 1 + max(int(s[-4:]) for s in image_stems)

    cases: list[Case] = []
    for split, img_dir, lab_dir in (("train", "imagesTr", "labelsTr"), ("test", "imagesTs", "labelsTs")):
        images, labels = folders[img_dir], folders[lab_dir]
        if suffixed:
            grouped = _group_channels(images, n_channels or 1, channel_names is not None, problems)
        else:
            grouped = {stem: (path,) for stem, path in images.items()}
        # a label is required for training cases, and for test cases when labelsTs/ exists
        label_required = split == "train" or (root / lab_dir).is_dir()
        severity: Severity = "error" if split == "train" else "warning"
        for cid in sorted(grouped):
            label = labels.get(cid)
            if label is None and label_required:
                msg = f"image has no label map: expected {lab_dir}/{cid}{ending}"
                problems.add(severity, cid, grouped[cid][0], "missing_label", msg)
            cases.append(Case(cid, grouped[cid], label, {}, split))  # type: ignore[arg-type]
        for cid in sorted(set(labels) - set(grouped)):
            want = f"{img_dir}/{cid}_0000{ending}" if suffixed else f"{img_dir}/{cid}{ending}"
            problems.add(
                severity, cid, labels[cid], "missing_image", f"label map has no image: expected {want}"
            )
    return Dataset(
        root=root,
        layout="msd",
        cases=cases,
        label_names=label_names,
        problems=list(problems),
        channel_names=channel_names,
        file_ending=ending,
    )


def _group_channels(
    images: dict[str, Path], n_channels: int, declared: bool, problems: _Problems
) -> dict[str, tuple[Path, ...]]:
    """Case id -> channel files in channel order; records missing and undeclared channels."""
    channels: dict[str, dict[int, Path]] = {}
    for stem, path in images.items():
        channels.setdefault(stem[:-5], {})[int(stem[-4:])] = path
    out: dict[str, tuple[Path, ...]] = {}
    for cid, chans in channels.items():
        missing = [i for i in range(n_channels) if i not in chans]
        if missing:
            names = ", ".join(f"{cid}_{i:04d}" for i in missing)
            problems.error(
                cid,
                chans[min(chans)],
                "missing_channel",
                f"channel file(s) {names} missing: every case needs {n_channels} channel file(s) "
                f"_0000.._{n_channels - 1:04d}",
            )
        extra = sorted(i for i in chans if i >= n_channels)
        if extra and declared:
            problems.error(
                cid,
                chans[extra[0]],
                "channel_count",
                f"case has channel file(s) {', '.join(f'_{i:04d}' for i in extra)} but dataset.json "
                f"channel_names declares {n_channels} channel(s); remove the extra files or declare them",
            )
        out[cid] = tuple(chans[i] for i in sorted(chans))
    return out
