"""NRRD / MetaImage (.nrrd, .nhdr, .mha, .mhd) via SimpleITK."""

from __future__ import annotations

from pathlib import Path

from medseg.errors import DataError
from medseg.types import Volume

ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")


def is_itk_file(path: str | Path) -> bool:
    return str(path).lower().endswith(ITK_SUFFIXES)


def read_itk_file(path: str | Path) -> Volume:
    """Read an NRRD/MetaImage file (2D or 3D, scalar or vector) into a Volume."""
    import SimpleITK as sitk

    from medseg.io._sitk import sitk_to_volume

    path = Path(path)
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise DataError(f"{path}: cannot read ({str(exc).strip().splitlines()[-1]})") from exc
    if img.GetDimension() == 4:
        raise DataError(
            f"{path}: 4D images are not supported here (size {img.GetSize()}); split the 4th axis"
        )
    return sitk_to_volume(img, meta={"source": str(path), "format": "itk"})


def write_itk_file(vol: Volume, path: str | Path) -> Path:
    """Write a single-channel Volume as NRRD/MetaImage (compressed), atomically."""
    import SimpleITK as sitk

    from medseg.io._atomic import atomic_write
    from medseg.io._sitk import volume_to_sitk

    path = Path(path)
    img = volume_to_sitk(vol)
    with atomic_write(path) as tmp:
        sitk.WriteImage(img, str(tmp), useCompression=True)
    return path
