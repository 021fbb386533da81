"""Fuzzing the readers: random, truncated and mutated files must end in a Volume or a MedsegError.

Small real files are written here (NIfTI, NRRD/MetaImage, DICOM, PNG/JPEG), then damaged with a seeded
RNG: random bytes under each suffix, truncation, random byte flips, and random values in the header
fields that size and place the image (dims, datatype, pixdim, vox_offset, sizes, Rows/Columns, PNG
chunk lengths, ...).
Each family of cases is read by :func:`medseg.io.load_volume` (and summarised with
:func:`~medseg.io.describe_volume`, as ``medseg info`` does; NIfTI files and DICOM folders also with the
block readers ``medseg predict`` streams them with) in a child process, which records per case
the outcome and the peak memory above the resident memory at its start (``VmHWM`` after resetting it
through ``/proc/self/clear_refs``). A case passes when it gives a Volume or a MedsegError, within
``CASE_SECONDS``, using no more than twice the file's decompressed size plus ``ALLOWANCE`` bytes. A
hang inside a library (where a Python alarm cannot interrupt) is caught by the child's own timeout and
reported with the case that was running. Re-run one family with ``-k`` to reproduce a failure: the cases
depend only on ``SEED`` (``MEDSEG_FUZZ_SEED`` explores others).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

#: The cases depend only on this seed; set MEDSEG_FUZZ_SEED to explore others.
SEED = int(os.environ.get("MEDSEG_FUZZ_SEED", "20240917"))
#: Memory a case may use beyond twice its decompressed size (libraries' own buffers and caches).
ALLOWANCE = 200 * 2**20
#: Time limit of one case, and of one family's child process.
CASE_SECONDS = 20
BATCH_SECONDS = 120

Case = dict[str, Any]


# --------------------------------------------------------------------------------------------------
# seed files


def _affine() -> np.ndarray:
    a = np.diag([0.8, 0.9, 2.5, 1.0])
    a[:3, 3] = [-50.0, 20.0, 10.0]
    return a


def _nifti_seeds(root: Path) -> dict[str, Path]:
    import nibabel as nib

    rng = np.random.default_rng(SEED)
    out = {}
    img = nib.Nifti1Image(rng.integers(-1000, 1000, (6, 5, 4)).astype(np.int16), _affine())
    for name in ("ct.nii", "ct.nii.gz"):
        nib.save(img, str(root / name))
        out[name] = root / name
    scaled = nib.Nifti1Image(rng.integers(0, 100, (5, 4, 3)).astype(np.uint16), _affine())
    scaled.header.set_slope_inter(0.5, -3.0)
    nib.save(scaled, str(root / "scaled.nii.gz"))
    out["scaled.nii.gz"] = root / "scaled.nii.gz"
    nib.save(nib.Nifti1Image(rng.random((4, 3, 3, 2), dtype=np.float32), _affine()), str(root / "4d.nii"))
    out["4d.nii"] = root / "4d.nii"
    nib.save(nib.Nifti1Image(rng.integers(0, 3, (7, 6)).astype(np.uint8), np.eye(4)), str(root / "2d.nii.gz"))
    out["2d.nii.gz"] = root / "2d.nii.gz"
    nifti2 = nib.Nifti2Image(rng.integers(-5, 5, (4, 3, 2)).astype(np.int32), _affine())
    nib.save(nifti2, str(root / "nifti2.nii"))
    out["nifti2.nii"] = root / "nifti2.nii"
    return out


def _itk_seeds(root: Path) -> dict[str, Path]:
    import SimpleITK as sitk

    from medseg.io import save_volume
    from medseg.types import Volume

    rng = np.random.default_rng(SEED + 1)
    vol = Volume(rng.integers(-500, 500, (1, 6, 5, 4)).astype(np.int16), _affine())
    out = {}
    for name in ("gz.nrrd", "z.mha"):  # medseg writes compressed files
        out[name] = save_volume(vol, root / name)
    img = sitk.GetImageFromArray(rng.integers(0, 200, (4, 5, 6)).astype(np.uint8))
    img.SetSpacing((0.5, 0.5, 2.0))
    for name in ("raw.nrrd", "raw.mha"):
        sitk.WriteImage(img, str(root / name), useCompression=False)
        out[name] = root / name
    sitk.WriteImage(img, str(root / "detached.nhdr"), useCompression=False)
    out["detached.nhdr"] = root / "detached.nhdr"
    return out


def _dicom_dataset(rows: int, cols: int, modality: str, sop_class: str) -> Any:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[str(SEED), modality, str(rows)])
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[str(SEED), "series", modality])
    ds.Modality = modality
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    return ds


def _dicom_seeds(root: Path) -> dict[str, Path]:
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    from pydicom.uid import RLELossless

    from medseg.io.dicom_write import write_dicom_series
    from medseg.types import Volume

    rng = np.random.default_rng(SEED + 2)
    out = {}
    vol = Volume(rng.integers(-1000, 1000, (1, 6, 5, 3)).astype(np.int16), _affine())
    series = write_dicom_series(vol, root / "series", study_date="20240101")
    out["series"] = series
    first = sorted(series.iterdir())[0]
    shutil.copy(first, root / "slice.dcm")
    out["slice.dcm"] = root / "slice.dcm"

    dx = _dicom_dataset(8, 10, "DX", "1.2.840.10008.5.1.4.1.1.1.1")
    dx.PixelSpacing = [0.2, 0.1]
    dx.PixelData = rng.integers(0, 4000, (8, 10)).astype(np.uint16).tobytes()
    dx.save_as(root / "dx.dcm", enforce_file_format=True)
    out["dx.dcm"] = root / "dx.dcm"

    rle = _dicom_dataset(8, 10, "DX", "1.2.840.10008.5.1.4.1.1.1.1")
    rle.PixelData = rng.integers(0, 4000, (8, 10)).astype(np.uint16).tobytes()
    rle.compress(RLELossless, generate_instance_uid=False)
    rle.save_as(root / "rle.dcm", enforce_file_format=True)
    out["rle.dcm"] = root / "rle.dcm"

    mf = _dicom_dataset(4, 5, "MR", "1.2.840.10008.5.1.4.1.1.4.1")
    mf.NumberOfFrames = 3

    def item(**kw: Any) -> Dataset:
        d = Dataset()
        for key, value in kw.items():
            setattr(d, key, value)
        return d

    mf.SharedFunctionalGroupsSequence = Sequence(
        [
            item(
                PlaneOrientationSequence=Sequence([item(ImageOrientationPatient=[1, 0, 0, 0, 1, 0])]),
                PixelMeasuresSequence=Sequence([item(PixelSpacing=[0.7, 0.7], SliceThickness=2.0)]),
            )
        ]
    )
    mf.PerFrameFunctionalGroupsSequence = Sequence(
        [item(PlanePositionSequence=Sequence([item(ImagePositionPatient=[0, 0, 2.0 * k])])) for k in range(3)]
    )
    mf.PixelData = rng.integers(0, 1000, (3, 4, 5)).astype(np.uint16).tobytes()
    mf.save_as(root / "multiframe.dcm", enforce_file_format=True)
    out["multiframe.dcm"] = root / "multiframe.dcm"
    return out


def _raster_seeds(root: Path) -> dict[str, Path]:
    import SimpleITK as sitk

    rng = np.random.default_rng(SEED + 3)
    out = {}
    for name in ("grey.png", "photo.jpg"):
        arr = rng.integers(0, 255, (12, 16)).astype(np.uint8)
        sitk.WriteImage(sitk.GetImageFromArray(arr), str(root / name))
        out[name] = root / name
    return out


# --------------------------------------------------------------------------------------------------
# mutations


def _flip(rng: np.random.Generator, data: bytes, n: int, lo: int = 0, hi: int | None = None) -> bytes:
    buf = bytearray(data)
    hi = len(buf) if hi is None else min(hi, len(buf))
    for _ in range(n):
        if hi > lo:
            buf[int(rng.integers(lo, hi))] = int(rng.integers(0, 256))
    return bytes(buf)


def _truncations(rng: np.random.Generator, data: bytes, n: int) -> list[bytes]:
    cuts = {0, 1, len(data) // 2, len(data) - 1} | {int(c) for c in rng.integers(0, len(data), n)}
    return [data[:c] for c in sorted(cuts)][:n]


def _gunzip(data: bytes) -> bytes:
    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


def _random_number(rng: np.random.Generator, kind: str) -> Any:
    """A random value for a header field of numpy kind ``kind``: small, large, zero, negative, or
    (floats) NaN/inf; 64-bit integers (NIfTI-2) also get values beyond 32 bits."""
    choice = int(rng.integers(0, 8))
    if kind == "float":
        return [0.0, -1.0, float("nan"), float("inf"), 1e30, float(rng.normal(0, 10)), 1e-30, 2.5][choice]
    if kind == "int64" and rng.random() < 0.4:
        return int(rng.choice([2**31, 10**9, 2**40, -(2**40), 2**62]))
    return [0, -1, 1, 2, int(rng.integers(1, 40)), int(rng.integers(100, 32768)), 32767, -32768][choice]


def _nifti_field_mutants(rng: np.random.Generator, raw: bytes, n: int) -> list[bytes]:
    """Headers with random values in the fields that size and place the image (data bytes kept)."""
    import nibabel as nib

    fields = ["dim", "datatype", "bitpix", "pixdim", "vox_offset", "scl_slope", "scl_inter", "sform_code"]
    fields += ["qform_code", "srow_x", "srow_y", "srow_z", "quatern_b", "qoffset_x"]
    cls = nib.Nifti2Header if raw[:4] == struct.pack("<i", 540) else nib.Nifti1Header
    ints = "int64" if cls is nib.Nifti2Header else "int"
    out = []
    for _ in range(n):
        hdr = cls.from_fileobj(io.BytesIO(raw), check=False)
        arr = hdr.structarr
        for name in rng.choice(fields, size=int(rng.integers(1, 4)), replace=False):
            field = arr[name]
            if name == "dim":
                i = int(rng.integers(0, 8))
                arr["dim"][i] = _random_number(rng, ints) if i else int(rng.integers(-1, 10))
            elif name == "datatype":
                codes = [2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024, 1280, 1536, 1792, 2048, 2304]
                arr[name] = int(rng.choice(codes)) if rng.random() < 0.7 else _random_number(rng, "int")
            elif np.issubdtype(field.dtype, np.floating):
                if field.shape:
                    arr[name][int(rng.integers(0, field.shape[0]))] = _random_number(rng, "float")
                else:
                    value = _random_number(rng, "float")
                    arr[name] = value if name != "vox_offset" else rng.choice([value, 0, 1e9, 351, 353])
            else:
                arr[name] = _random_number(rng, "int64" if field.dtype == np.int64 else "int")
        out.append(hdr.binaryblock + raw[cls.sizeof_hdr :])
    return out


def _set_field(data: bytes, key: str, sep: bytes, value: str) -> bytes:
    """``data`` with the value of its first ``key<sep>`` header line replaced by ``value``."""
    pattern = re.compile(rb"^" + re.escape(key.encode()) + rb"\s*" + re.escape(sep) + rb"[^\n]*", re.M)
    return pattern.sub(key.encode() + sep + b" " + value.encode(), data, count=1)


def _text_field_mutants(
    rng: np.random.Generator, raw: bytes, sep: bytes, fields: dict[str, list[str]], sizing: list[str], n: int
) -> list[bytes]:
    """NRRD/MetaImage headers with other values: every listed value of the ``sizing`` fields (those
    that size the image or locate its data) one at a time, then ``n`` random combinations of one or
    two fields (the rest of the file kept)."""
    out = [_set_field(raw, key, sep, value) for key in sizing for value in fields[key]]
    for _ in range(n):
        data = raw
        for key in rng.choice(list(fields), size=int(rng.integers(1, 3)), replace=False):
            data = _set_field(data, str(key), sep, str(rng.choice(fields[key])))
        out.append(data)
    return out


NRRD_FIELDS = {
    "sizes": ["6 5 4", "30000 30000 30000", "0 5 4", "-1 5 4", "6 5", "6 5 4 3", "1500 1500 500", "x y z"],
    "type": ["short", "double", "uchar", "int64", "float", "block", "nonsense"],
    "dimension": ["0", "1", "2", "4", "17", "-3"],
    "encoding": ["raw", "gzip", "bzip2", "ascii", "hex", "nonsense"],
    "space directions": ["(0,0,0) (0,1,0) (0,0,1)", "(1,0,0) (1,0,0) (0,0,1)", "(nan,0,0) (0,1,0) (0,0,1)",
                         "(1e308,0,0) (0,1e308,0) (0,0,1e308)", "none none none", "(1,0) (0,1)"],
    "space origin": ["(nan,0,0)", "(1,2)", "(1e400,0,0)"],
    "endian": ["big", "little", "middle"],
    "byte skip": ["-1", "100000", "7"],
    "spacings": ["0 0 0", "nan 1 1", "-1 1 1"],
}  # fmt: skip
MHA_FIELDS = {
    "DimSize": ["6 5 4", "30000 30000 30000", "0 5 4", "-1 5 4", "6 5", "1500 1500 500"],
    "ElementType": ["MET_SHORT", "MET_DOUBLE", "MET_UCHAR_ARRAY", "MET_NONE", "nonsense"],
    "NDims": ["0", "1", "2", "4", "17"],
    "ElementSpacing": ["0 0 0", "nan 1 1", "-1 1 1", "1e308 1e308 1e308"],
    "TransformMatrix": ["0 0 0 0 0 0 0 0 0", "1 0 0 1 0 0 0 0 1", "nan 0 0 0 1 0 0 0 1"],
    "CompressedDataSize": ["0", "1", "99999999", "-5"],
    "HeaderSize": ["-1", "100000"],
    "ElementNumberOfChannels": ["0", "3", "100000"],
    "CompressedData": ["True", "False"],
}


NRRD_SIZING = ["sizes", "type", "encoding", "byte skip"]
MHA_SIZING = ["DimSize", "ElementType", "CompressedDataSize", "HeaderSize", "ElementNumberOfChannels"]


def _pick(rng: np.random.Generator, options: list[Any]) -> Any:
    return options[int(rng.integers(0, len(options)))]


DICOM_FIELDS: dict[str, list[Any]] = {
    "Rows": [0, 1, 3, 65535, 30000, 7],
    "Columns": [0, 1, 3, 65535, 30000, 11],
    "BitsAllocated": [0, 1, 7, 8, 12, 16, 24, 32, 64, 65535],
    "BitsStored": [0, 1, 8, 12, 16, 17, 40, 65535],
    "HighBit": [0, 7, 15, 16, 100],
    "PixelRepresentation": [0, 1, 2, 65535],
    "SamplesPerPixel": [0, 1, 2, 3, 4, 65535],
    "NumberOfFrames": ["0", "1", "2", "3", "-1", "100000", "abc", "2147483647"],
    "PixelSpacing": [["0", "0"], ["nan", "1"], ["-1", "1"], ["1"], ["1e308", "1e308"]],
    "ImageOrientationPatient": [["0"] * 6, ["1", "0", "0", "1", "0", "0"], ["nan"] * 6, ["1", "0", "0"]],
    "ImagePositionPatient": [["nan", "0", "0"], ["1", "2"], ["1e400", "0", "0"]],
    "RescaleSlope": ["0", "nan", "inf", "-1", "1e308", "abc", "0.5"],
    "RescaleIntercept": ["nan", "inf", "-1e308", "abc", "7"],
    "PhotometricInterpretation": ["MONOCHROME1", "RGB", "PALETTE COLOR", "YBR_FULL", "X"],
    "SliceThickness": ["0", "-1", "nan", "1e308"],
    "PlanarConfiguration": [0, 1, 2],
    "TransferSyntaxUID": [
        "1.2.840.10008.1.2",  # implicit VR little endian
        "1.2.840.10008.1.2.2",  # explicit VR big endian
        "1.2.840.10008.1.2.4.50",  # JPEG baseline
        "1.2.840.10008.1.2.5",  # RLE
        "1.2.840.10008.1.2.4.90",  # JPEG 2000
        "1.2.3.4",  # unknown
    ],
}


def _patch_element(data: bytes, keyword: str, text: str) -> bytes:
    """Replace the value of the first ``keyword`` element of an explicit-VR little-endian file with the
    raw ``text`` (any string, valid for its VR or not), fixing the file meta group length."""
    from pydicom.datadict import dictionary_VR, tag_for_keyword

    tag = tag_for_keyword(keyword)
    vr = dictionary_VR(tag)
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr.encode()
    i = data.find(head, 132)
    if i < 0:
        return data
    (length,) = struct.unpack("<H", data[i + 6 : i + 8])
    value = text.encode("ascii")
    value += (b"\0" if vr == "UI" else b" ") * (len(value) % 2)
    data = data[:i] + head + struct.pack("<H", len(value)) + value + data[i + 8 + length :]
    if tag >> 16 == 2:  # the group length (0002,0000) counts the file meta elements' bytes
        j = data.find(b"\x02\x00\x00\x00UL\x04\x00", 128)
        if j >= 0:
            (glen,) = struct.unpack("<I", data[j + 8 : j + 12])
            data = data[: j + 8] + struct.pack("<I", glen + len(value) - length) + data[j + 12 :]
    return data


def _dicom_field_mutants(rng: np.random.Generator, path: Path, n: int) -> list[bytes]:
    """Files with random values in some header fields; numbers that pydicom would refuse to store
    ("abc" as a decimal) are written into the bytes directly."""
    import pydicom

    out = []
    for _ in range(n):
        ds = pydicom.dcmread(str(path))
        patches = []
        for key in rng.choice(list(DICOM_FIELDS), size=int(rng.integers(1, 4)), replace=False):
            value = _pick(rng, DICOM_FIELDS[key])
            if isinstance(value, int):
                setattr(ds, key, value)
                continue
            if key != "TransferSyntaxUID" and key not in ds:
                setattr(ds, key, "1")  # a placeholder for the patch to replace
            patches.append((str(key), "\\".join(value) if isinstance(value, list) else value))
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        data = buf.getvalue()
        for key, text in patches:
            data = _patch_element(data, key, text)
        out.append(data)
    return out


def _png_ihdr_mutants(rng: np.random.Generator, data: bytes, n: int) -> list[bytes]:
    """PNGs whose IHDR declares other sizes, bit depths or colour types, with a correct CRC."""
    out = []
    for _ in range(n):
        buf = bytearray(data)
        w, h = (int(v) for v in rng.choice([1, 16, 30000, 100000, 2**31 - 1, 0], size=2))
        buf[16:24] = struct.pack(">II", w, h)
        buf[24] = int(rng.choice([1, 2, 4, 8, 16, 3]))
        buf[25] = int(rng.choice([0, 2, 3, 4, 6, 7]))
        buf[29:33] = struct.pack(">I", zlib.crc32(bytes(buf[12:29])))
        out.append(bytes(buf))
    return out


def _png_length_mutants(rng: np.random.Generator, data: bytes) -> list[bytes]:
    """PNGs with other values in each chunk's length field: huge ones and a random small one."""
    starts, pos = [], 8  # after the signature: chunks of length (4), type (4), data, CRC (4)
    while pos + 8 <= len(data):
        starts.append(pos)
        pos += 12 + struct.unpack(">I", data[pos : pos + 4])[0]
    out = []
    for at in starts:
        for length in (0x30000000, 2**31 - 1, int(rng.integers(0, 5000))):
            out.append(data[:at] + struct.pack(">I", length) + data[at + 4 :])
    return out


# --------------------------------------------------------------------------------------------------
# case families


def _add(cases: list[Case], root: Path, name: str, suffix: str, data: bytes, content: int) -> None:
    stem = name[: -len(suffix)] if suffix and name.endswith(suffix) else name
    path = root / f"{len(cases):04d}_{stem}{suffix}"
    path.write_bytes(data)
    cases.append({"name": path.name, "path": str(path), "content": max(content, len(data))})


def _suffix(name: str) -> str:
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def _random_cases(rng: np.random.Generator, root: Path, cases: list[Case], suffixes: tuple[str, ...]) -> None:
    """Random bytes under each suffix; every other one dressed in the format's magic (a gzip stream,
    ``NRRD0004``, the DICOM preamble) so that the parsers get past their first check."""
    for suffix in suffixes:
        for k in range(6):
            data = rng.integers(0, 256, int(rng.integers(0, 4096)), dtype=np.uint8).tobytes()
            if k % 2 and suffix == ".nii.gz":
                data = gzip.compress(data)
            elif k % 2 and suffix in (".nrrd", ".nhdr"):
                data = b"NRRD0004\n" + data
            elif k % 2 and suffix == ".dcm":
                data = bytes(128) + b"DICM" + data
            _add(cases, root, "random", suffix, data, len(data) * 4)


def _nifti_family(root: Path) -> list[Case]:
    rng = np.random.default_rng(SEED + 11)
    cases: list[Case] = []
    _random_cases(rng, root, cases, (".nii", ".nii.gz"))
    for name, path in _nifti_seeds(root / "seeds").items():
        data = path.read_bytes()
        raw = _gunzip(data)
        gz = name.endswith(".gz")
        pack = (lambda b: gzip.compress(b, mtime=0)) if gz else (lambda b: b)
        for cut in _truncations(rng, data, 8):
            _add(cases, root, f"trunc-{name}", _suffix(name), cut, len(raw))
        if gz:  # a cut in the decompressed stream, recompressed: a well-formed gzip of a short file
            for cut in _truncations(rng, raw, 4):
                _add(cases, root, f"short-{name}", _suffix(name), pack(cut), len(raw))
            for _ in range(4):
                _add(cases, root, f"gzflip-{name}", _suffix(name), _flip(rng, data, 2), len(raw))
        for _ in range(10):
            _add(
                cases,
                root,
                f"flip-{name}",
                _suffix(name),
                pack(_flip(rng, raw, int(rng.integers(1, 9)), 0, 544 if name.startswith("nifti2") else 352)),
                len(raw),
            )
        for mutant in _nifti_field_mutants(rng, raw, 24):
            _add(cases, root, f"field-{name}", _suffix(name), pack(mutant), len(raw))
    return cases


def _itk_family(root: Path) -> list[Case]:
    rng = np.random.default_rng(SEED + 12)
    cases: list[Case] = []
    _random_cases(rng, root, cases, (".nrrd", ".nhdr", ".mha", ".mhd"))
    for name, path in _itk_seeds(root / "seeds").items():
        data = path.read_bytes()
        content = 8 * len(data) + 6 * 5 * 4 * 2
        nrrd = data.startswith(b"NRRD")
        fields, sep = (NRRD_FIELDS, b":") if nrrd else (MHA_FIELDS, b"=")
        sizing = NRRD_SIZING if nrrd else MHA_SIZING
        if name == "detached.nhdr":  # the header is mutated; its data file stays next to it
            raw_name = re.search(rb"data file: ([^\n]+)", data).group(1).decode()
            mutants = _truncations(rng, data, 4)
            mutants += _text_field_mutants(rng, data, sep, fields, sizing, 12)
            for mutant in mutants:
                folder = root / f"nhdr{len(cases):04d}"
                folder.mkdir()
                shutil.copy(path.parent / raw_name, folder / raw_name)
                (folder / "x.nhdr").write_bytes(mutant)
                cases.append(
                    {
                        "name": f"{len(cases):04d}_field-nhdr",
                        "path": str(folder / "x.nhdr"),
                        "content": content,
                    }
                )
            continue
        header_end = data.find(b"\n\n") + 2 if data.startswith(b"NRRD") else data.find(b"LOCAL\n") + 6
        for cut in _truncations(rng, data, 6):
            _add(cases, root, f"trunc-{name}", path.suffix, cut, content)
        for _ in range(6):
            _add(cases, root, f"flip-{name}", path.suffix, _flip(rng, data, int(rng.integers(1, 5))), content)
        for _ in range(4):  # flips in the header only
            _add(cases, root, f"hflip-{name}", path.suffix, _flip(rng, data, 2, 0, header_end), content)
        for mutant in _text_field_mutants(rng, data, sep, fields, sizing, 12):
            _add(cases, root, f"field-{name}", path.suffix, mutant, content)
    return cases


def _dicom_family(root: Path) -> list[Case]:
    rng = np.random.default_rng(SEED + 13)
    cases: list[Case] = []
    _random_cases(rng, root, cases, (".dcm",))
    for name, path in _dicom_seeds(root / "seeds").items():
        if path.is_dir():  # a series: one of its files damaged
            files = sorted(path.iterdir())
            first = files[0].read_bytes()
            mutants = _truncations(rng, first, 4) + [_flip(rng, first, 4) for _ in range(4)]
            mutants += _dicom_field_mutants(rng, files[0], 12)
            for mutant in mutants:
                folder = root / f"series{len(cases):04d}"
                shutil.copytree(path, folder)
                (folder / files[0].name).write_bytes(mutant)
                content = sum(f.stat().st_size for f in folder.iterdir())
                cases.append(
                    {"name": f"{len(cases):04d}_series", "path": str(folder), "content": 4 * content}
                )
            continue
        data = path.read_bytes()
        content = 8 * len(data)
        for cut in _truncations(rng, data, 6):
            _add(cases, root, f"trunc-{name}", ".dcm", cut, content)
        for _ in range(6):
            _add(cases, root, f"flip-{name}", ".dcm", _flip(rng, data, int(rng.integers(1, 6))), content)
        for mutant in _dicom_field_mutants(rng, path, 20):
            _add(cases, root, f"field-{name}", ".dcm", mutant, content)
    return cases


def _raster_family(root: Path) -> list[Case]:
    rng = np.random.default_rng(SEED + 14)
    cases: list[Case] = []
    _random_cases(rng, root, cases, (".png", ".jpg"))
    for name, path in _raster_seeds(root / "seeds").items():
        data = path.read_bytes()
        content = 4 * 12 * 16 * 8
        for cut in _truncations(rng, data, 6):
            _add(cases, root, f"trunc-{name}", path.suffix, cut, content)
        for _ in range(8):
            _add(cases, root, f"flip-{name}", path.suffix, _flip(rng, data, int(rng.integers(1, 6))), content)
        if name.endswith(".png"):
            for mutant in _png_ihdr_mutants(rng, data, 8) + _png_length_mutants(rng, data):
                _add(cases, root, f"header-{name}", ".png", mutant, content)
    return cases


FAMILIES: dict[str, Callable[[Path], list[Case]]] = {
    "nifti": _nifti_family,
    "itk": _itk_family,
    "dicom": _dicom_family,
    "raster": _raster_family,
}


# --------------------------------------------------------------------------------------------------
# the child process


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {key} in /proc/self/status")


class _CaseTimeout(Exception):
    pass


def _readers(path: Path) -> list[Callable[[], str]]:
    """What is run on a case: ``load_volume`` summarised as ``medseg info`` does, and for NIfTI files
    and DICOM folders also the block reader that ``medseg predict`` streams them with."""
    from medseg.io import describe_volume, load_volume
    from medseg.io.dicom import DicomSlabs
    from medseg.io.nifti import NiftiSlabs, is_nifti

    def whole() -> str:
        vol = load_volume(path)
        describe_volume(vol)
        return f"volume {vol.array.shape}"

    def streamed(opener: Callable[[Path], Any]) -> Callable[[], str]:
        def run() -> str:
            with opener(path) as slabs:
                return f"slabs {slabs.load().array.shape}"

        return run

    opener = NiftiSlabs if is_nifti(path) else DicomSlabs if path.is_dir() else None
    return [whole] + ([streamed(opener)] if opener is not None else [])


def _run_cases(manifest: Path, results: Path) -> None:
    """Read every case of ``manifest``, appending one JSON line per case (and one before it starts)."""
    import logging
    import signal
    import traceback
    import warnings

    from medseg.errors import MedsegError

    warnings.simplefilter("ignore")
    logging.disable(logging.CRITICAL)

    def alarm(*_: object) -> None:
        raise _CaseTimeout

    signal.signal(signal.SIGALRM, alarm)
    cases = json.loads(manifest.read_text())
    with open(results, "a") as out:
        for case in cases:
            out.write(json.dumps({"start": case["name"]}) + "\n")
            out.flush()
            with open("/proc/self/clear_refs", "w") as fh:  # reset VmHWM to the current resident size
                fh.write("5")
            base = _status_kib("VmRSS")
            outcomes, details = [], []
            for read in _readers(Path(case["path"])):
                signal.alarm(CASE_SECONDS)
                try:
                    outcome, detail = "volume", read()
                except MedsegError as exc:
                    outcome, detail = "refused", str(exc)[:300]
                except _CaseTimeout:
                    outcome, detail = "timeout", ""
                except BaseException as exc:  # noqa: BLE001 - the finding this test looks for
                    tb = traceback.extract_tb(exc.__traceback__)[-3:]
                    where = " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in reversed(tb))
                    outcome, detail = "crash", f"{type(exc).__name__}: {str(exc)[:300]} at {where}"
                finally:
                    signal.alarm(0)
                outcomes.append(outcome)
                details.append(detail)
            # the worst outcome of the readers decides
            outcome = next((o for o in ("crash", "timeout", "refused") if o in outcomes), "volume")
            peak = _status_kib("VmHWM") - base
            record = {"case": case["name"], "outcome": outcome, "peak": peak, "detail": " | ".join(details)}
            out.write(json.dumps(record) + "\n")
            out.flush()


# --------------------------------------------------------------------------------------------------
# the tests


@pytest.mark.slow
@pytest.mark.skipif(
    not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc (a writable clear_refs)"
)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_readers_survive_damaged_files(tmp_path: Path, family: str) -> None:
    """Every damaged file ends in a Volume or a MedsegError, in time and within its memory bound."""
    (tmp_path / "seeds").mkdir()
    cases = FAMILIES[family](tmp_path)
    manifest, results = tmp_path / "cases.json", tmp_path / "results.jsonl"
    manifest.write_text(json.dumps(cases))
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "child.log", "wb") as log:
        try:
            proc = subprocess.run(
                [sys.executable, __file__, str(manifest), str(results)],
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=BATCH_SECONDS,
                env=env,
            )
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = None
    lines = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    done = {r["case"]: r for r in lines if "case" in r}
    started = [r["start"] for r in lines if "start" in r]
    running = started[-1] if started and started[-1] not in done else None
    if rc != 0 or running is not None:
        log_tail = (tmp_path / "child.log").read_text(errors="replace")[-2000:]
        reason = "did not finish in time" if rc is None else f"exited with {rc}"
        pytest.fail(f"the child reading the {family} cases {reason} during case {running}:\n{log_tail}")
    assert len(done) == len(cases)
    problems = []
    for case in cases:
        r = done[case["name"]]
        limit = 2 * case["content"] + ALLOWANCE
        if r["outcome"] not in ("volume", "refused"):
            problems.append(f"{case['name']}: {r['outcome']} {r['detail']}")
        elif r["peak"] > limit:
            problems.append(
                f"{case['name']}: peak {r['peak']} bytes > {limit} ({r['outcome']} {r['detail']})"
            )
    outcomes = {k: sum(r["outcome"] == k for r in done.values()) for k in ("volume", "refused")}
    print(f"{family}: {len(cases)} cases, {outcomes}")
    assert not problems, f"{len(problems)} of {len(cases)} cases failed ({outcomes}):\n" + "\n".join(problems)
    # the damage must reach the readers' checks, not only their happy path
    assert outcomes["refused"] >= len(cases) // 3, outcomes


if __name__ == "__main__":
    _run_cases(Path(sys.argv[1]), Path(sys.argv[2]))
