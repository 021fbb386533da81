"""Headers that promise more than the file holds are refused before the promise is allocated.

Each damaged file is a few hundred bytes whose header declares gigabytes (or petabytes). The readers
must refuse it with a DataError that names the file and the declared shape, exit code 2 in the CLI,
without the multi-gigabyte allocation the libraries (nibabel, ITK, GDCM, libpng) would make: peak
memory is measured in a fresh subprocess (``VmHWM``). Also: unusable affines (zero, singular,
non-finite) are refused with a message that says how to fix the header.
"""

from __future__ import annotations

import gzip
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from medseg.cli.main import main
from medseg.errors import DataError
from medseg.io import load_volume
from medseg.io.dicom import read_dicom_file
from medseg.io.nifti import NiftiSlabs
from medseg.types import Volume

#: Peak memory allowed for refusing a damaged file (the interpreter and the libraries take ~150 MB).
PEAK_LIMIT = 500 * 2**20


# --------------------------------------------------------------------------------------------------
# damaged files


def nifti_header_only(path: Path, shape: tuple[int, ...], *, nifti2: bool = False) -> Path:
    """A NIfTI file holding only a header that declares an int16 image of ``shape``."""
    hdr = nib.Nifti2Header() if nifti2 else nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(np.int16)
    hdr.set_sform(np.eye(4), code=1)
    hdr.set_qform(np.eye(4), code=1)
    block = hdr.binaryblock + bytes(4)  # no extensions
    path.write_bytes(gzip.compress(block) if path.name.endswith(".gz") else block)
    return path


def nrrd_header_only(path: Path, encoding: str) -> Path:
    head = "NRRD0004\ntype: short\ndimension: 3\nsizes: 1500 1500 500\nspacings: 1 1 1\n"
    data = gzip.compress(b"abcd") if encoding == "gzip" else b"abcd"
    path.write_bytes(f"{head}encoding: {encoding}\nendian: little\n\n".encode() + data)
    return path


def mha_header_only(path: Path) -> Path:
    head = (
        "ObjectType = Image\nNDims = 3\nCompressedData = True\nDimSize = 1500 1500 500\n"
        "ElementType = MET_SHORT\nElementDataFile = LOCAL\n"
    )
    path.write_bytes(head.encode() + zlib.compress(b"abcd"))
    return path


def dicom_dx(path: Path, rows: int = 8, cols: int = 10, **tags: Any) -> Path:
    """A small uncompressed DX radiograph written with pydicom (``tags`` set before saving)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelSpacing = [0.2, 0.1]
    ds.PixelData = (np.arange(rows * cols, dtype=np.uint16) % 4000).tobytes()
    compress = tags.pop("compress", None)
    if compress is not None:
        ds.compress(compress, generate_instance_uid=False)
    ts = tags.pop("file_meta_ts", None)
    if tags.pop("PrivateCreator", False) is None:  # a private element that readers never look at
        ds.add_new(0x00290010, "LO", "MEDSEG TEST")
        ds.add_new(0x00291001, "OB", b"xy")
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.save_as(path, enforce_file_format=True)
    if ts is not None:  # a transfer syntax that does not match the encoding, written into the bytes
        data = path.read_bytes()
        old = b"\x02\x00\x10\x00UI\x14\x001.2.840.10008.1.2.1\x00"
        value = str(ts).encode() + b"\x00" * (len(str(ts)) % 2)
        new = b"\x02\x00\x10\x00UI" + struct.pack("<H", len(value)) + value
        assert data.count(old) == 1
        data = data.replace(old, new)
        group = data.find(b"\x02\x00\x00\x00UL\x04\x00")
        (length,) = struct.unpack("<I", data[group + 8 : group + 12])
        data = data[: group + 8] + struct.pack("<I", length + len(new) - len(old)) + data[group + 12 :]
        path.write_bytes(data)
    return path


def png_with_chunk_length(path: Path, length: int) -> Path:
    """An 8x8 PNG whose second chunk (after IHDR) declares ``length`` bytes."""
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(np.arange(64, dtype=np.uint8).reshape(8, 8)), str(path))
    data = bytearray(path.read_bytes())
    data[33:37] = struct.pack(">I", length)  # 8-byte signature + IHDR (4 + 4 + 13 + 4 bytes)
    path.write_bytes(bytes(data))
    return path


def png_with_size(path: Path, width: int, height: int) -> Path:
    """An 8x8 PNG whose IHDR (with a correct checksum) declares ``width`` x ``height`` pixels."""
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(np.arange(64, dtype=np.uint8).reshape(8, 8)), str(path))
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


def _big_files(root: Path) -> dict[str, tuple[Path, list[str]]]:
    """Damaged files and the text the refusal must contain (besides the file name)."""
    from pydicom.uid import JPEGBaseline8Bit, RLELossless

    shape_1500 = ["1500 x 1500 x 500 int16"]
    return {
        "nifti": (nifti_header_only(root / "big.nii", (1500, 1500, 500)), shape_1500),
        "nifti-gz": (nifti_header_only(root / "big.nii.gz", (1500, 1500, 500)), shape_1500),
        "nifti2-huge": (
            nifti_header_only(root / "huge.nii", (100000,) * 3, nifti2=True),
            ["100000 x 100000 x 100000 int16", "2000000000000000 bytes", "available"],
        ),
        "nifti2-huge-gz": (
            nifti_header_only(root / "huge.nii.gz", (100000,) * 3, nifti2=True),
            ["100000 x 100000 x 100000 int16", "2000000000000000 bytes", "available"],
        ),
        "nrrd-raw": (nrrd_header_only(root / "raw.nrrd", "raw"), shape_1500),
        "nrrd-gzip": (nrrd_header_only(root / "gz.nrrd", "gzip"), shape_1500),
        "mha-compressed": (mha_header_only(root / "z.mha"), shape_1500),
        "dicom-rle": (
            dicom_dx(root / "rle.dcm", compress=RLELossless, Rows=30000, Columns=30000),
            ["30000 x 30000 pixels", "RLE"],
        ),
        "dicom-plain-bytes-under-jpeg": (
            dicom_dx(root / "jpeg.dcm", Rows=65535, Columns=65535, file_meta_ts=JPEGBaseline8Bit),
            ["JPEG Baseline", "plain bytes"],
        ),
        "png-chunk-length": (png_with_chunk_length(root / "chunk.png", 0x30000000), ["corrupt", "PNG"]),
    }


_PEAK_SCRIPT = """
import json, sys
from medseg.cli.main import main
out = {}
for name, path in json.loads(sys.argv[1]).items():
    with open("/proc/self/clear_refs", "w") as fh:  # restart VmHWM from the current resident size
        fh.write("5")
    rc = main(["info", path])
    peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
    out[name] = {"rc": rc, "peak": peak}
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def refusals(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """``medseg info`` on every damaged file, in one fresh process: exit code, stderr, peak memory."""
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux /proc (a writable clear_refs) to measure peak memory")
    root = tmp_path_factory.mktemp("big")
    files = _big_files(root)
    proc = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, json.dumps({k: str(p) for k, (p, _) in files.items()})],
        capture_output=True,
        text=True,
        timeout=300,
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line is not None, f"the child failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    results = json.loads(line[len("RESULT ") :])
    for name, (path, expected) in files.items():
        errors = [x for x in proc.stderr.splitlines() if x.startswith(f"error: {path}")]
        results[name].update({"path": path, "expected": expected, "error": errors[0] if errors else ""})
    return results


@pytest.mark.parametrize(
    "name",
    [
        "nifti",
        "nifti-gz",
        "nifti2-huge",
        "nifti2-huge-gz",
        "nrrd-raw",
        "nrrd-gzip",
        "mha-compressed",
        "dicom-rle",
        "dicom-plain-bytes-under-jpeg",
        "png-chunk-length",
    ],
)
def test_info_refuses_a_header_that_declares_more_than_the_file_holds(
    refusals: dict[str, dict[str, Any]], name: str
) -> None:
    r = refusals[name]
    assert r["peak"] < PEAK_LIMIT, f"peak {r['peak'] / 2**20:.0f} MiB while reading {r['path']}"
    assert r["rc"] == 2, r
    for text in r["expected"]:
        assert text in r["error"], (text, r["error"])


# --------------------------------------------------------------------------------------------------
# in-process checks


def test_memory_check_refuses_what_does_not_fit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A valid image larger than the available memory is refused with shape, dtype, need and what is
    available, for every reader path (NIfTI, NRRD, DICOM)."""
    from medseg.io import save_volume

    vol = Volume(np.zeros((1, 16, 16, 4), np.int16), np.eye(4))
    nii, nrrd = save_volume(vol, tmp_path / "a.nii.gz"), save_volume(vol, tmp_path / "a.nrrd")
    dcm = dicom_dx(tmp_path / "a.dcm", rows=16, cols=16)
    monkeypatch.setattr("medseg.io._limits.available_memory", lambda: 1000)
    with pytest.raises(
        DataError, match=r"a\.nii\.gz: .*16 x 16 x 4 int16 image, which needs 2048 bytes .*1000 bytes"
    ):
        load_volume(nii)
    with pytest.raises(
        DataError, match=r"a\.nrrd: .*16 x 16 x 4 int16 image, which needs 4096 bytes .*1000 bytes"
    ):
        load_volume(nrrd)
    with pytest.raises(DataError, match=r"a\.dcm: .*16 x 16 x 1 .*needs .*1000 bytes"):
        load_volume(dcm)


def test_nifti_slabs_copy_no_more_than_the_declared_voxels(tmp_path: Path) -> None:
    """The streaming reader decompresses a .nii.gz into a temporary file: only the declared voxels,
    however much the gzip stream holds after them; a header-only file is refused at once, by shape."""
    data = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4)
    nib.save(nib.Nifti1Image(data, np.diag([0.5, 0.5, 2.0, 1.0])), str(tmp_path / "plain.nii"))
    path = tmp_path / "trailing.nii.gz"
    path.write_bytes(gzip.compress((tmp_path / "plain.nii").read_bytes() + bytes(8 * 2**20)))  # 8 MiB after
    with NiftiSlabs(path) as slabs:
        assert slabs.raw.stat().st_size == data.nbytes
        np.testing.assert_array_equal(slabs.load().array[0], data)
    big = nifti_header_only(tmp_path / "big.nii.gz", (1500, 1500, 500))
    with pytest.raises(DataError, match=r"big\.nii\.gz: the header declares a 1500 x 1500 x 500 int16 image"):
        NiftiSlabs(big)


def test_empty_and_non_scalar_nifti_are_refused(tmp_path: Path) -> None:
    """A zero in the header's dims, or colour (RGB24) voxels, end in a DataError, not in a crash of
    ``medseg info``."""
    empty = tmp_path / "empty.nii"
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((7, 0))
    empty.write_bytes(hdr.binaryblock + bytes(4))
    with pytest.raises(DataError, match=r"empty\.nii: the header declares an empty image \(shape \(7, 0\)"):
        load_volume(empty)
    rgb = np.zeros((3, 2, 2), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), str(tmp_path / "rgb.nii"))
    assert main(["info", str(tmp_path / "rgb.nii")]) == 2
    with pytest.raises(DataError, match=r"rgb\.nii: the voxels are colour"):
        load_volume(tmp_path / "rgb.nii")


def _patch(data: bytes, old: bytes, new: bytes) -> bytes:
    assert data.count(old) == 1
    return data.replace(old, new)


def test_corrupt_dicom_elements_are_data_errors(tmp_path: Path) -> None:
    """pydicom converts values lazily; a corrupt element must end in a DataError naming the file, not in
    pydicom's NotImplementedError / BytesLengthException, or in GDCM reading a bogus element length."""
    from pydicom.uid import UID

    good = dicom_dx(tmp_path / "good.dcm").read_bytes()
    bad_vr = tmp_path / "bad_vr.dcm"  # Modality (0008,0060) with an unknown VR
    bad_vr.write_bytes(_patch(good, b"\x08\x00\x60\x00CS", b"\x08\x00\x60\x00QQ"))
    bad_meta = tmp_path / "bad_meta.dcm"  # the file meta group length (UL) three bytes long
    bad_meta.write_bytes(_patch(good, b"\x02\x00\x00\x00UL\x04\x00", b"\x02\x00\x00\x00UL\x03\x00"))
    for path in (bad_vr, bad_meta):
        with pytest.raises(DataError, match=f"{path.name}: not a DICOM file"):
            read_dicom_file(path)
    unknown_ts = dicom_dx(tmp_path / "ts.dcm", file_meta_ts=UID("1.2.3.4"))
    with pytest.raises(DataError, match=r"ts\.dcm: .*'1\.2\.3\.4' .*not a DICOM transfer syntax"):
        read_dicom_file(unknown_ts)
    # a private element's length grown over the pixel data's header: the pixel bytes are then read as
    # an element whose length runs far past the end of the file
    data = dicom_dx(tmp_path / "private.dcm", PrivateCreator=None).read_bytes()
    i = data.find(b"\x29\x00\x01\x10OB\x00\x00")
    j = data.find(b"\xe0\x7f\x10\x00OW\x00\x00")
    swallow = bytearray(data)
    swallow[i + 8 : i + 12] = struct.pack("<I", j + 12 - (i + 12))
    swallow[j + 12 : j + 24] = b"\x29\x00\x10\x10OB\x00\x00" + struct.pack("<I", 0xC0000000)
    (tmp_path / "swallow.dcm").write_bytes(bytes(swallow))
    with pytest.raises(DataError, match=r"swallow\.dcm: element \(0029,1010\) declares 3221225472 bytes"):
        read_dicom_file(tmp_path / "swallow.dcm")


def test_png_decompression_bomb_is_a_data_error(tmp_path: Path) -> None:
    """Pillow's decompression-bomb limit applies before ITK allocates, as a DataError."""
    bomb = png_with_size(tmp_path / "bomb.png", 20000, 20000)
    with pytest.raises(DataError, match=r"bomb\.png: .*400000000 pixels.*decompression bomb"):
        load_volume(bomb)


# --------------------------------------------------------------------------------------------------
# affines


def nifti_with_header(path: Path, **fields: Any) -> Path:
    """A 4 x 3 x 2 int16 NIfTI with the given raw header fields (written byte for byte: nibabel's
    writer would replace the transforms with the image's affine)."""
    data = np.arange(24, dtype=np.int16).reshape(4, 3, 2)
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(data.shape)
    hdr.set_data_dtype(np.int16)
    hdr.set_sform(np.diag([0.5, 0.5, 2.0, 1.0]), code=1)
    hdr.set_qform(np.diag([0.5, 0.5, 2.0, 1.0]), code=1)
    for name, value in fields.items():
        if name == "pixdim":
            hdr["pixdim"][1:4] = value
        elif name.startswith("srow_"):
            hdr[name][:] = value
        else:
            hdr[name] = value
    hdr["vox_offset"] = 352
    path.write_bytes(hdr.binaryblock + bytes(4) + data.tobytes(order="F"))
    return path


def test_zero_sform_qform_and_pixdim_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = nifti_with_header(
        tmp_path / "zero.nii", srow_x=0, srow_y=0, srow_z=0, pixdim=0, quatern_b=0, quatern_c=0, quatern_d=0
    )
    assert main(["info", str(path)]) == 2
    err = capsys.readouterr().err
    assert "zero.nii: the voxel-to-world affine from the header's sform" in err
    assert "zero spacing" in err and "set_sform" in err
    # nibabel reads pixdim 0 as 1 when it builds the qform: that invented qform is not offered as a fix
    assert "qform is usable" not in err
    with pytest.raises(DataError, match=r"zero\.nii: .*sform.*zero spacing"):
        load_volume(path)
    with pytest.raises(DataError, match=r"zero\.nii: .*sform.*zero spacing"):
        NiftiSlabs(path)


def test_singular_and_non_finite_affines_are_refused(tmp_path: Path) -> None:
    parallel = nifti_with_header(
        tmp_path / "parallel.nii", srow_x=[1, 2, 0, 0], srow_y=0, srow_z=[0, 0, 1, 0]
    )
    with pytest.raises(DataError, match=r"parallel\.nii: .*sform.*singular: its voxel axes are parallel"):
        load_volume(parallel)
    nan = nifti_with_header(tmp_path / "nan.nii", srow_x=np.nan)
    # the qform (code 1, pixdim 0.5 0.5 2) is usable and is offered
    with pytest.raises(DataError, match=r"nan\.nii: .*non-finite.*qform is usable.*img\.get_qform\(\)"):
        load_volume(nan)
    inf = nifti_with_header(tmp_path / "inf.nii", sform_code=0, pixdim=np.inf)
    with pytest.raises(DataError, match=r"inf\.nii: .*from the header's qform .*non-finite"):
        load_volume(inf)


def test_metaimage_header_running_into_the_data_is_refused(tmp_path: Path) -> None:
    """A MetaImage whose last header line runs into the compressed data (its newline damaged) is
    refused before ITK parses it: ITK's reader takes the binary bytes for a file name and can abort the
    process (``double free or corruption``), so the read runs in a child process here."""
    from medseg.io import save_volume

    path = save_volume(
        Volume(np.arange(120, dtype=np.int16).reshape(1, 6, 5, 4), np.eye(4)), tmp_path / "z.mha"
    )
    data = path.read_bytes()
    path.write_bytes(_patch(data, b"ElementDataFile = LOCAL\n", b"ElementDataFile = LOCAL\x7f"))
    code = (
        "import sys\nfrom medseg.errors import DataError\nfrom medseg.io import load_volume\n"
        "try:\n    load_volume(sys.argv[1])\nexcept DataError as exc:\n    print('REFUSED', exc)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "REFUSED" in proc.stdout and "z.mha: header line" in proc.stdout, proc.stdout
    assert "holds the binary byte 0x7f" in proc.stdout


def test_sweep_removes_only_this_hosts_files_of_dead_processes(tmp_path: Path) -> None:
    import subprocess
    import sys

    from medseg.io._atomic import host_tag
    from medseg.io._slabs import sweep_stale_temp_files

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    pid = int(dead.stdout)
    host = host_tag()
    stale = tmp_path / f"medseg-dicom-{pid}-{host}-abc.raw"
    other_host = tmp_path / f"medseg-dicom-{pid}-00000000-abc.raw"  # a shared temp dir: not ours
    alive = tmp_path / f"medseg-nifti-{os.getpid()}-{host}-abc.raw"
    for p in (stale, other_host, alive):
        p.write_bytes(b"x")
    assert sweep_stale_temp_files(tmp_path) == [stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([other_host.name, alive.name])


def test_stale_temporary_outputs_of_dead_processes_are_swept(tmp_path: Path) -> None:
    import subprocess
    import sys

    from medseg.io._atomic import atomic_target, host_tag, sweep_stale_temps

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    pid, host = int(dead.stdout), host_tag()
    stale_file = tmp_path / f".last.tmp-{pid}-{host}.pt"
    stale_dir = tmp_path / f".case7.tmp-{pid}-{host}"
    stale_dir.mkdir()
    (stale_dir / "lung.nii.gz").write_bytes(b"x")
    mine = atomic_target(tmp_path / "predict.json")  # this process's own, still being written
    other_host = tmp_path / f".x.tmp-{pid}-00000000.npy"
    for p in (stale_file, mine, other_host):
        p.write_bytes(b"x")
    assert sorted(sweep_stale_temps(tmp_path)) == sorted([stale_file, stale_dir])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mine.name, other_host.name])
