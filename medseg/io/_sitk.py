"""SimpleITK <-> :class:`~medseg.types.Volume` conversion: the one place that knows ITK's axis order.

SimpleITK arrays are ``(Z, Y, X)`` (2D: ``(Y, X)``; vector pixels add a trailing component axis)
while spacing/origin/direction are given in ``(x, y, z)`` order and in the LPS+ world frame. medseg
volumes are ``(C, X, Y, Z)`` with a RAS+ affine (see :mod:`medseg.types`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import DataError
from medseg.io._limits import available_memory, check_memory, declared_bytes, describe_shape
from medseg.types import Volume

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
#: Component types of SimpleITK pixel IDs (scalar ``sitkX`` and vector ``sitkVectorX``).
_COMPONENT_DTYPES = {
    "UInt8": np.uint8,
    "Int8": np.int8,
    "UInt16": np.uint16,
    "Int16": np.int16,
    "UInt32": np.uint32,
    "Int32": np.int32,
    "UInt64": np.uint64,
    "Int64": np.int64,
    "Float32": np.float32,
    "Float64": np.float64,
    "ComplexFloat32": np.complex64,
    "ComplexFloat64": np.complex128,
}


def _component_dtype(pixel_id: int) -> np.dtype:
    """numpy dtype of one pixel component of a SimpleITK pixel ID (float64 for types not listed)."""
    import SimpleITK as sitk

    for name, dtype in _COMPONENT_DTYPES.items():
        if pixel_id in (getattr(sitk, f"sitk{name}", None), getattr(sitk, f"sitkVector{name}", None)):
            return np.dtype(dtype)
    return np.dtype(np.float64)


def _last_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[-1] if text else type(exc).__name__


#: A check run on the declared size before the pixels are read: ``(path, shape, dtype)``, where shape is
#: ITK's size (x, y[, z]) plus the component count when there are several; raises DataError.
DataCheck = Callable[[Path, tuple[int, ...], np.dtype], None]


def read_sitk_image(
    path: Path, *, what: str, check: DataCheck | None = None, explain: Callable[[str], str] | None = None
) -> Any:
    """Read a file with SimpleITK, refusing before the pixel buffer is allocated an image whose declared
    size does not fit in memory (the image and its numpy copy are held at once) or that ``check`` finds
    the file cannot hold.

    ITK allocates, and for most formats zero-fills, the image its header declares before it reads the
    pixels, and some readers (MetaImage with compressed data) return an image even when the data end
    early; hence the header is read first (``ReadImageInformation``) and checked.

    Args:
        path: The file.
        what: What the file was expected to be, for messages (e.g. ``"NRRD/MetaImage"``).
        check: Format-specific check of the file's length against the declared size.
        explain: Builds the message for a file SimpleITK cannot read from its reason (ITK's last line);
            by default ``"{path}: cannot read as {what} ({reason})"``.

    Raises:
        DataError: The file cannot be parsed or decoded, or a size check fails; the message names it.
    """
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))

    def failed(exc: BaseException) -> DataError:
        reason = _last_line(exc)
        return DataError(explain(reason) if explain else f"{path}: cannot read as {what} ({reason})")

    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise failed(exc) from exc
    size = tuple(int(s) for s in reader.GetSize())
    ncomp = int(reader.GetNumberOfComponents())
    shape = size + ((ncomp,) if ncomp > 1 else ())
    dtype = _component_dtype(reader.GetPixelID())
    check_memory(path, shape, dtype, copies=2)
    if check is not None:
        check(path, shape, dtype)
    try:
        return reader.Execute()
    except (MemoryError, RuntimeError) as exc:
        if isinstance(exc, MemoryError) or "bad_alloc" in str(exc):  # C++ allocation failures
            raise DataError(
                f"{path}: out of memory reading the {describe_shape(shape, dtype)} image "
                f"({declared_bytes(shape, dtype.itemsize)} bytes; {available_memory()} bytes were "
                "available). Free memory or use a machine with more."
            ) from exc
        raise failed(exc) from exc


def sitk_affine(img: Any) -> np.ndarray:
    """4x4 voxel-to-RAS affine of a 3D SimpleITK image (float64)."""
    direction = np.asarray(img.GetDirection(), dtype=np.float64).reshape(3, 3)
    spacing = np.asarray(img.GetSpacing(), dtype=np.float64)
    origin = np.asarray(img.GetOrigin(), dtype=np.float64)
    lps = np.eye(4)
    lps[:3, :3] = direction * spacing[None, :]
    lps[:3, 3] = origin
    return LPS_TO_RAS @ lps


def sitk_to_volume(img: Any, *, meta: dict[str, Any] | None = None, pixel_frame_2d: bool = True) -> Volume:
    """Convert a 2D or 3D SimpleITK image to a Volume.

    3D images get their LPS geometry converted to a RAS affine. 2D images (PNG/JPEG, 2D DICOM
    radiographs) have no patient frame: with ``pixel_frame_2d`` their affine is
    ``diag(sx, sy, 1, 1)`` (x along columns, y along rows).
    """
    import SimpleITK as sitk

    # a view, copied once by the transpose below (GetArrayFromImage would add a second copy)
    arr = sitk.GetArrayViewFromImage(img)
    ncomp = img.GetNumberOfComponentsPerPixel()
    dim = img.GetDimension()
    if ncomp > 1:  # (..., C) -> (C, ...)
        arr = np.moveaxis(arr, -1, 0)
    else:
        arr = arr[None]
    # (C, Z, Y, X) -> (C, X, Y, Z); always a copy, as the view dies with the image
    arr = np.array(np.transpose(arr, (0, *range(arr.ndim - 1, 0, -1))), order="C", copy=True)
    if dim == 3:
        affine = sitk_affine(img)
    elif dim == 2:
        sx, sy = img.GetSpacing()
        if pixel_frame_2d:
            affine = np.diag([float(sx), float(sy), 1.0, 1.0])
            ox, oy = img.GetOrigin()
            affine[:2, 3] = [ox, oy]
        else:  # pragma: no cover - kept for completeness
            d = np.asarray(img.GetDirection()).reshape(2, 2)
            lps = np.eye(4)
            lps[:2, :2] = d * np.array([sx, sy])[None, :]
            lps[:2, 3] = img.GetOrigin()
            affine = LPS_TO_RAS @ lps
    else:
        raise ValueError(f"only 2D and 3D images are supported, got a {dim}D image")
    return Volume(arr, affine, dict(meta or {}))


def volume_to_sitk(vol: Volume) -> Any:
    """Convert a single-channel Volume to a SimpleITK image with the same geometry.

    3D: LPS direction/spacing/origin from the RAS affine (shear is not representable in ITK and
    raises). 2D: pixel frame, spacing from the affine.
    """
    import SimpleITK as sitk

    if vol.num_channels != 1:
        raise ValueError(f"only single-channel volumes can be written with SimpleITK, got {vol.num_channels}")
    arr = vol.array[0]
    arr = np.ascontiguousarray(np.transpose(arr, tuple(range(arr.ndim - 1, -1, -1))))
    img = sitk.GetImageFromArray(arr)
    if vol.spatial_dims == 3:
        lps = np.linalg.inv(LPS_TO_RAS) @ vol.affine
        m = lps[:3, :3]
        spacing = np.linalg.norm(m, axis=0)
        direction = m / spacing[None, :]
        if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
            raise ValueError("affine has shear; ITK images cannot represent it (write NIfTI instead)")
        img.SetSpacing(tuple(float(s) for s in spacing))
        img.SetDirection(tuple(float(v) for v in direction.ravel()))
        img.SetOrigin(tuple(float(v) for v in lps[:3, 3]))
    else:
        img.SetSpacing(tuple(float(s) for s in vol.spacing_mm))
        img.SetOrigin(tuple(float(v) for v in vol.affine[:2, 3]))
    return img
