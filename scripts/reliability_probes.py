"""Reliability probes of the medseg command line; writes ``docs/reliability.md``.

Every probe runs ``python -m medseg ...`` in a child process, as a user would, with ``TMPDIR`` pointed at
a folder owned by that probe (so that temporary files left behind can be seen) and
``MEDSEG_MALLOC=default``. Three groups of probes:

1. bad inputs: damaged or misleading files through ``medseg info``, ``medseg predict`` and
   ``medseg data check``: what the user sees, the exit code, the peak memory of the medseg process
   (``ru_maxrss`` of that one child, from ``os.wait4``) and what is left on disk;
2. faults: SIGKILL and SIGTERM at a random time (seeded, uniform within the duration of an
   uninterrupted run measured first), and at the moment a temporary file appears, during
   ``medseg train`` (then ``--resume`` to completion) and ``medseg predict`` of NIfTI files and a
   DICOM series (then the same command again); the final state is compared with the uninterrupted
   run;
3. security: hostile pickles in a model folder, path names from model folders and configs,
   spreadsheet formulas in CSV cells, HTML in label names, and patient identifiers in every output
   format of ``medseg predict --format both --report --save-probabilities`` with and without
   ``--anonymize``.

Nothing in the document is typed in by hand: every table cell comes from what a probe observed. Tiny
phantoms and a tiny model keep the whole run to about 10-15 minutes on 2 CPU cores. The document is
produced with (from the repository root)::

    .venv/bin/python scripts/reliability_probes.py --out docs/reliability.md --trials 5 --seed 0

The work folder (data, model, every command's stdout/stderr under ``logs/``) is a fresh temporary folder
removed at the end; ``--keep`` keeps it, ``--workdir DIR`` puts it in DIR (and keeps it).
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import html
import json
import os
import platform
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "demo_ct.yaml"

#: ``--set`` overrides of configs/demo_ct.yaml that make a model train in seconds on a CPU.
TINY = [
    "model.channels=[4,8,16]",
    "train.patch_size=[32,32,16]",
    "train.target_spacing_mm=[3.0,3.0,4.0]",
    "train.iterations_per_epoch=3",
    "train.epochs=2",
]
EPOCHS = 2
#: Wall-clock limit of one medseg command.
TIMEOUT = 300.0
#: A refusal may use at most this much more memory than the same command on a valid small input.
PEAK_MARGIN_MB = 256.0

INTRO = """
What `medseg` does with bad inputs, under SIGKILL/SIGTERM, and with hostile or identifying data, as a
user sees it. Every probe runs `python -m medseg ...` in a child process with `TMPDIR` set to a folder
owned by that probe (`MEDSEG_MALLOC=default`), and records the first error or warning line, the exit
code (a shell's: 128 + N when killed by signal N), and what is left on disk: files in the probe's
`TMPDIR` and hidden temporary outputs (`.*.tmp-*`, `.medseg-*`) in the folders it wrote. Peak memory is
`ru_maxrss` of the medseg process alone (`os.wait4` on that child). Every cell is written by the
script from what it observed; nothing is typed in by hand.
"""

SIGNALS = {signal.SIGKILL: "SIGKILL", signal.SIGTERM: "SIGTERM"}


# --------------------------------------------------------------------------------------------------
# running medseg


@dataclass
class Result:
    """One finished child process."""

    argv: list[str]
    status: int  # os.waitstatus_to_exitcode: negative = killed by that signal
    stdout: str
    stderr: str
    seconds: float
    peak_mb: float
    signal_sent_at: float | None = None
    timed_out: bool = False

    @property
    def rc(self) -> int:
        """The exit code as a shell shows it (128 + N when killed by signal N)."""
        return 128 - self.status if self.status < 0 else self.status

    @property
    def exit_text(self) -> str:
        if self.timed_out:
            return f"{self.rc} (timed out after {TIMEOUT:.0f} s)"
        if self.status < 0:
            return f"{self.rc} (killed by {signal.Signals(-self.status).name})"
        return str(self.rc)


class Probes:
    """The probe work folder, the environment of the children and the log of commands run."""

    def __init__(self, workdir: Path, seed: int) -> None:
        self.w = workdir
        self.rng = random.Random(seed)
        self.seed = seed
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.n = 0
        self.commands: list[Result] = []

    def tmpdir(self, name: str) -> Path:
        """A fresh, empty TMPDIR for one probe."""
        path = self.w / "tmp" / name
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        return path

    def env(self, tmpdir: Path) -> dict[str, str]:
        return {**os.environ, "TMPDIR": str(tmpdir), "MEDSEG_MALLOC": "default", "PYTHONUNBUFFERED": "1"}

    def medseg(
        self,
        args: Sequence[str | Path],
        tmpdir: Path,
        *,
        signal_at: tuple[int, float | Callable[[], bool]] | None = None,
        shell_pipe: str | None = None,
    ) -> Result:
        """Run ``python -m medseg ARGS`` (or ``... | SHELL_PIPE`` in bash) and wait for it.

        ``signal_at`` = (signal, seconds after the start, or a condition polled every 2 ms) sends that
        signal once. The peak memory is
        ``ru_maxrss`` of this child alone (``os.wait4``), i.e. of the medseg process (or, with a pipe,
        of the largest process of the pipeline).
        """
        argv = [sys.executable, "-m", "medseg", *map(str, args)]
        cmd = argv
        if shell_pipe is not None:
            cmd = ["bash", "-c", f'"$@" | {shell_pipe}; exit "${{PIPESTATUS[0]}}"', "bash", *argv]
        self.n += 1
        out_path, err_path = self.logs / f"{self.n:03d}.out", self.logs / f"{self.n:03d}.err"
        with open(out_path, "wb") as fo, open(err_path, "wb") as fe:
            (self.logs / f"{self.n:03d}.cmd").write_text(shlex.join(cmd) + f"\nTMPDIR={tmpdir}\n")
            t0 = time.monotonic()
            proc = subprocess.Popen(
                cmd, stdout=fo, stderr=fe, stdin=subprocess.DEVNULL, env=self.env(tmpdir), cwd=self.w
            )
            sent: float | None = None
            timed_out = False
            while True:
                pid, wstatus, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                now = time.monotonic() - t0
                if signal_at is not None and sent is None:
                    when = signal_at[1]
                    if when() if callable(when) else now >= when:
                        os.kill(proc.pid, signal_at[0])
                        sent = now
                if now > TIMEOUT and not timed_out:
                    os.kill(proc.pid, signal.SIGKILL)
                    timed_out = True
                time.sleep(0.002)
            seconds = time.monotonic() - t0
        status = os.waitstatus_to_exitcode(wstatus)
        proc.returncode = status  # reaped here; keeps Popen from waiting again
        result = Result(
            argv=[str(a) for a in args],
            status=status,
            stdout=out_path.read_text(errors="replace"),
            stderr=err_path.read_text(errors="replace"),
            seconds=seconds,
            peak_mb=usage.ru_maxrss / 1024,
            signal_sent_at=sent,
            timed_out=timed_out,
        )
        self.commands.append(result)
        return result

    def must(self, args: Sequence[str | Path], tmpdir: Path) -> Result:
        """Run a set-up command that has to succeed."""
        r = self.medseg(args, tmpdir)
        if r.rc != 0:
            raise SystemExit(
                f"set-up command failed ({r.exit_text}): medseg {shlex.join(r.argv)}\n{r.stderr}"
            )
        return r

    def short(self, text: str, limit: int = 150) -> str:
        """``text`` on one line, the work folder written as ``$W``, cut to ``limit`` characters."""
        text = " ".join(text.replace(str(self.w), "$W").split())
        return text if len(text) <= limit else text[: limit - 1] + "…"


_ERROR = re.compile(r"^(unexpected )?error\b|Traceback|^[A-Za-z]*Error:|failed:|^\s*FAILED|: error", re.I)
_WARN = re.compile(r"warning|^\s*!", re.I)


def first_message(r: Result, prefer: str = "") -> str:
    """The first error line, else the first line that says ``prefer`` (a warning a probe expects),
    else the first warning line, else the last line the user sees."""
    lines = [x for x in (r.stderr + "\n" + r.stdout).splitlines() if x.strip()]
    patterns = [_ERROR, re.compile(re.escape(prefer), re.I)] if prefer else [_ERROR]
    for pattern in [*patterns, _WARN]:
        k = next((k for k, x in enumerate(lines) if pattern.search(x)), None)
        if k is not None:  # "... has 2 problems:" is followed by the problems
            return lines[k] + (
                " " + lines[k + 1].strip() if lines[k].endswith(":") and k + 1 < len(lines) else ""
            )
    if r.status < 0 and not lines:
        return "(nothing: the process was killed)"
    return lines[-1] if lines else "(nothing)"


# --------------------------------------------------------------------------------------------------
# what is left on disk


def _is_temporary(p: Path) -> bool:
    return ".tmp-" in p.name or p.name.startswith((".medseg-", "medseg-")) or p.suffix == ".tmp"


def hidden_temporaries(*folders: Path) -> list[Path]:
    """Temporary files and folders (``.x.tmp-PID``, ``.medseg-*``) anywhere below ``folders``."""
    found: list[Path] = []
    for folder in folders:
        if folder.exists():
            found += [p for p in folder.rglob("*") if _is_temporary(p)]
    return sorted(set(found))


def tmpdir_entries(tmpdir: Path) -> list[str]:
    """Files and empty folders in a probe's TMPDIR, relative to it (folders end with ``/``)."""
    out = []
    for p in sorted(tmpdir.rglob("*")):
        if p.is_dir():
            if not any(p.iterdir()):
                out.append(f"{p.relative_to(tmpdir)}/")
        else:
            out.append(f"{p.relative_to(tmpdir)} ({p.stat().st_size} B)")
    return out


def files_in(folder: Path) -> list[str]:
    if not folder.exists():
        return []
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def describe_left(
    pr: Probes, tmpdir: Path, folders: Sequence[Path] = (), baseline: Iterable[str] = ()
) -> tuple[str, list[str]]:
    """(text for the table, the entries that count as left behind).

    Entries in ``baseline`` (what an uninterrupted run of the same command leaves) are shown but not
    counted.
    """
    base = set(baseline)
    tmp = tmpdir_entries(tmpdir)
    hidden = [pr.short(str(p)) for p in hidden_temporaries(*folders)]
    counted = [f"TMPDIR/{e}" for e in tmp if e not in base] + hidden
    parts = []
    if tmp:
        shown = [f"{e}" + (" (also after an uninterrupted run)" if e in base else "") for e in tmp]
        parts.append("TMPDIR: " + ", ".join(shown))
    else:
        parts.append("TMPDIR empty")
    if hidden:
        parts.append("temporary outputs: " + ", ".join(hidden))
    return "; ".join(parts), counted


# --------------------------------------------------------------------------------------------------
# damaged and misleading inputs


def nifti_header_only(path: Path, shape: tuple[int, ...], *, nifti2: bool = False) -> Path:
    """A gzipped NIfTI holding only a header that declares an int16 image of ``shape``."""
    import nibabel as nib

    hdr = nib.Nifti2Header() if nifti2 else nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(np.int16)
    hdr.set_sform(np.eye(4), code=1)
    hdr.set_qform(np.eye(4), code=1)
    path.write_bytes(gzip.compress(hdr.binaryblock + bytes(4), mtime=0))
    return path


def nifti_raw_header(path: Path, shape: tuple[int, int, int], **fields: Any) -> Path:
    """A plain int16 NIfTI with raw header fields written byte for byte (nibabel's writer would
    replace the transforms)."""
    import nibabel as nib

    data = np.full(shape, -1000, np.int16)
    data[4:-4, 4:-4, 1:-1] = 40
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(np.int16)
    hdr.set_sform(np.diag([1.5, 1.5, 3.0, 1.0]), code=1)
    hdr.set_qform(np.diag([1.5, 1.5, 3.0, 1.0]), code=1)
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


def modified_ct(src: Path, dst: Path, change: Callable[[np.ndarray], np.ndarray]) -> Path:
    """``src`` with its voxels replaced by ``change(voxels)`` (float32), same affine."""
    import nibabel as nib

    img = nib.load(str(src))
    data = np.asarray(img.dataobj).astype(np.float32)
    out = nib.Nifti1Image(change(data).astype(np.float32), img.affine)
    nib.save(out, str(dst))
    return dst


def _with_nan(ct: np.ndarray) -> np.ndarray:
    out = ct.copy()
    cx, cy, cz = (s // 2 for s in out.shape)
    out[cx - 4 : cx + 4, cy - 4 : cy + 4, max(cz - 2, 0) : cz + 2] = np.nan
    return out


def copy_series(src: Path, dst: Path, **tags: str) -> Path:
    """A copy of the DICOM series ``src`` with ``tags`` set in every file (pydicom)."""
    import pydicom

    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()):
        ds = pydicom.dcmread(f)
        for key, value in tags.items():
            setattr(ds, key, value)
        ds.save_as(dst / f.name)
    return dst


def second_series(src: Path, folder: Path) -> None:
    """Add a copy of ``src`` with new series and instance UIDs to ``folder`` (two series, one folder)."""
    import pydicom
    from pydicom.uid import generate_uid

    series_uid = generate_uid(entropy_srcs=["medseg-probe-second-series"])
    for k, f in enumerate(sorted(src.iterdir())):
        ds = pydicom.dcmread(f)
        uid = generate_uid(entropy_srcs=["medseg-probe-second-series", str(k)])
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = uid
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.SeriesNumber = 99
        ds.save_as(folder / f"B{f.name}")


# --------------------------------------------------------------------------------------------------
# shared state of the run


@dataclass
class Ctx:
    """Data, model and reference measurements shared by the probes."""

    ct: Path
    cxr: Path
    model: Path
    inputs: list[Path]
    series: Path
    train_seconds: float
    train_tmp_baseline: list[str]
    predict_seconds: float = 0.0
    predict_baseline: Path | None = None
    reference_peaks: dict[str, float] = field(default_factory=dict)
    setup_commands: list[str] = field(default_factory=list)


def train_args(data: Path, cache: Path, run: Path) -> list[str]:
    args = ["train", "--config", str(CONFIG), "--run-dir", str(run), "--no-progress", "--device", "cpu"]
    for s in [f"data.root={data}", f"train.cache_dir={cache}", *TINY]:
        args += ["--set", s]
    return args


def predict_args(ctx: Ctx, out: Path, *extra: str) -> list[str]:
    inputs = [str(p) for p in ctx.inputs]
    return [
        "predict",
        "--model",
        str(ctx.model),
        "--input",
        *inputs,
        "--output",
        str(out),
        "--no-progress",
        "--device",
        "cpu",
        *extra,
    ]


def setup(pr: Probes) -> Ctx:
    """Phantoms, the tiny model (its run time is the train baseline) and the predict inputs."""
    tmp = pr.tmpdir("setup")
    ct, cxr = pr.w / "data" / "ct", pr.w / "data" / "cxr"
    synth_ct = ["data", "synth", "ct", "--out", str(ct), "--cases", "6", "--seed", "3", "--no-progress"]
    synth_cxr = [
        "data",
        "synth",
        "chest_xray",
        "--out",
        str(cxr),
        "--cases",
        "3",
        "--seed",
        "3",
        "--no-progress",
    ]
    pr.must(synth_ct, tmp)
    pr.must(synth_cxr, tmp)
    ttmp = pr.tmpdir("setup-train")
    model = pr.w / "model"
    r = pr.must(train_args(ct, pr.w / "cache" / "model", model), ttmp)
    inputs_dir = pr.w / "inputs"
    inputs_dir.mkdir()
    names = {"phantom_000": "a", "phantom_001": "b", "phantom_003": "c"}
    inputs = []
    for case, name in names.items():
        dst = inputs_dir / f"{name}.nii.gz"
        shutil.copy(ct / "imagesTr" / f"{case}_0000.nii.gz", dst)
        inputs.append(dst)
    series_src = next(p for p in sorted((ct / "dicomTs").iterdir()) if p.is_dir())
    series = inputs_dir / "series"
    shutil.copytree(series_src, series)
    inputs.append(series)
    ctx = Ctx(
        ct=ct,
        cxr=cxr,
        model=model,
        inputs=inputs,
        series=series,
        train_seconds=r.seconds,
        train_tmp_baseline=tmpdir_entries(ttmp),
    )
    ctx.setup_commands = [
        pr.short("medseg " + shlex.join(a), 1000)
        for a in (synth_ct, synth_cxr, train_args(ct, pr.w / "cache" / "model", model))
    ]
    return ctx


def reference_peaks(pr: Probes, ctx: Ctx) -> None:
    """Peak memory of info, predict and data check on valid small inputs (the yardstick of refusals)."""
    tmp = pr.tmpdir("reference")
    ctx.reference_peaks["info"] = pr.must(["info", ctx.inputs[0]], tmp).peak_mb
    out = pr.w / "reference" / "predict"
    r = pr.must(
        [
            "predict",
            "--model",
            ctx.model,
            "--input",
            ctx.inputs[0],
            "--output",
            out,
            "--no-progress",
            "--device",
            "cpu",
        ],
        tmp,
    )
    ctx.reference_peaks["predict"] = r.peak_mb
    ds = small_dataset(ctx, pr.w / "reference" / "dataset", None)
    ctx.reference_peaks["data check"] = pr.must(["data", "check", ds, "--no-progress"], tmp).peak_mb


def small_dataset(ctx: Ctx, root: Path, bad_image: Path | None) -> Path:
    """Two cases of the CT phantoms in the MSD layout; the first case's image replaced by ``bad_image``."""
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True)
    shutil.copy(ctx.ct / "dataset.json", root / "dataset.json")
    for case in ("phantom_000", "phantom_001"):
        shutil.copy(ctx.ct / "labelsTr" / f"{case}.nii.gz", root / "labelsTr" / f"{case}.nii.gz")
        shutil.copy(ctx.ct / "imagesTr" / f"{case}_0000.nii.gz", root / "imagesTr" / f"{case}_0000.nii.gz")
    if bad_image is not None:
        shutil.copy(bad_image, root / "imagesTr" / "phantom_000_0000.nii.gz")
    return root


# --------------------------------------------------------------------------------------------------
# 1. bad inputs


@dataclass
class Row:
    """One row of a probe table."""

    probe: str
    given: str
    sees: str
    exit: str
    left: str
    verdict: str
    peak: str = ""


def damaged_series(src: Path, dst: Path, where: str, cut: str) -> tuple[Path, Path]:
    """A copy of the series ``src`` with one file damaged: the middle or the end slice (by position
    along the slice normal), cut to half its size or to its first 1000 bytes. Returns (folder, file)."""
    import pydicom

    shutil.copytree(src, dst)

    def position(f: Path) -> float:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        o = [float(x) for x in ds.ImageOrientationPatient]
        return float(np.dot(np.cross(o[:3], o[3:]), [float(x) for x in ds.ImagePositionPatient]))

    slices = sorted(dst.iterdir(), key=position)
    victim = slices[len(slices) // 2] if where == "middle" else slices[-1]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2] if cut == "half" else data[:1000])
    return dst, victim


def bad_input_files(pr: Probes, ctx: Ctx) -> tuple[dict[str, tuple[Path, str]], dict[str, str]]:
    """name -> (file or folder, description of the input); name -> the damaged file of a series."""
    d = pr.w / "bad"
    d.mkdir()
    src = ctx.inputs[0]
    rnd = random.Random(pr.seed)
    files: dict[str, tuple[Path, str]] = {}
    damaged: dict[str, str] = {}
    big = nifti_header_only(d / "big1500.nii.gz", (1500, 1500, 500))
    files["big1500"] = (big, f"{big.stat().st_size}-byte .nii.gz whose header declares 1500×1500×500 int16")
    huge = nifti_header_only(d / "huge1e5.nii.gz", (100000,) * 3, nifti2=True)
    files["huge"] = (huge, f"{huge.stat().st_size}-byte NIfTI-2 .nii.gz declaring 100000³ int16")
    zero = nifti_raw_header(
        d / "zero_affine.nii",
        (40, 40, 12),
        srow_x=0,
        srow_y=0,
        srow_z=0,
        pixdim=0,
        quatern_b=0,
        quatern_c=0,
        quatern_d=0,
    )
    files["zero"] = (zero, "NIfTI with zero sform, qform and pixdim")
    sing = nifti_raw_header(
        d / "singular.nii", (40, 40, 12), srow_x=[1, 2, 0, 0], srow_y=0, srow_z=[0, 0, 1, 0], qform_code=0
    )
    files["singular"] = (sing, "NIfTI whose sform has parallel voxel axes (singular), no qform")
    noise = d / "noise.nii.gz"
    noise.write_bytes(rnd.randbytes(4096))
    files["noise"] = (noise, "4096 random bytes named .nii.gz")
    empty = d / "empty.nii.gz"
    empty.write_bytes(b"")
    files["empty"] = (empty, "empty (0-byte) .nii.gz")
    trunc = d / "truncated.nii.gz"
    data = src.read_bytes()
    trunc.write_bytes(data[: len(data) // 2])
    files["truncated"] = (trunc, f"a phantom .nii.gz cut to half ({len(data) // 2} of {len(data)} bytes)")
    n = len(list(ctx.series.iterdir()))
    for key, where, cut in (("tseries-pixels", "middle", "half"), ("tseries-header", "middle", "1000"),
                            ("tseries-end", "end", "1000")):  # fmt: skip
        folder, victim = damaged_series(ctx.series, d / key, where, cut)
        damaged[key] = victim.name
        what = (
            "its pixel data cut (file cut to half)"
            if cut == "half"
            else "cut to 1000 bytes (inside the header)"
        )
        files[key] = (folder, f"DICOM series of {n} files; {victim.name} ({where} slice) {what}")
    files["nan"] = (modified_ct(src, d / "nan_ct.nii.gz", _with_nan), "phantom CT with 8×8×4 NaN voxels")
    mr = modified_ct(src, d / "mr_like.nii.gz", lambda ct: np.clip(ct + 1000, 0, None) * 0.8)
    files["mr"] = (mr, "MR-like scan (CT shifted to ≥0 and scaled) to the CT model")
    rescaled = modified_ct(src, d / "rescaled.nii.gz", lambda ct: np.clip((ct + 1000) / 2000, 0, 1))
    files["rescaled"] = (rescaled, "phantom CT rescaled to 0..1 to the CT model")
    png = sorted((ctx.cxr / "images").glob("*.png"))[0]
    files["png"] = (png, "2D chest X-ray PNG to the 3D CT model")
    blocker = d / "existing_file"
    blocker.write_text("a file where the output folder should go\n")
    files["blocker"] = (blocker, "--output names an existing file")
    two = d / "two_series"
    shutil.copytree(ctx.series, two)
    second_series(ctx.series, two)
    files["two"] = (two, "DICOM folder holding two series, no --series-uid")
    return files, damaged


@dataclass
class BadProbe:
    """One command on one bad input and what counts as handled."""

    name: str
    key: str
    command: str  # info | predict | data check | info-pipe
    expect_rc: tuple[int, ...]
    expect_text: str = ""  # a substring the user must see (case-insensitive)


BAD_PROBES = [
    BadProbe("huge header (1500×1500×500)", "big1500", "info", (2,), "1500 x 1500 x 500"),
    BadProbe("huge header (1500×1500×500)", "big1500", "predict", (1, 2), "1500 x 1500 x 500"),
    BadProbe("huge header (1500×1500×500)", "big1500", "data check", (2,), "1500 x 1500 x 500"),
    BadProbe("huge header (100000³)", "huge", "info", (2,), "100000 x 100000 x 100000"),
    BadProbe("huge header (100000³)", "huge", "predict", (1, 2), "100000 x 100000 x 100000"),
    BadProbe("huge header (100000³)", "huge", "data check", (2,), "100000 x 100000 x 100000"),
    BadProbe("zero affine", "zero", "info", (2,), "zero spacing"),
    BadProbe("zero affine", "zero", "predict", (1, 2), "zero spacing"),
    BadProbe("singular affine", "singular", "info", (2,), "singular"),
    BadProbe("singular affine", "singular", "predict", (1, 2), "singular"),
    BadProbe("random bytes", "noise", "info", (2,)),
    BadProbe("random bytes", "noise", "predict", (1, 2)),
    BadProbe("empty file", "empty", "info", (2,)),
    BadProbe("truncated .nii.gz", "truncated", "info", (2,)),
    BadProbe("truncated .nii.gz", "truncated", "predict", (1, 2)),
    BadProbe("truncated .nii.gz", "truncated", "data check", (2,)),
    BadProbe("truncated DICOM pixel data in a series", "tseries-pixels", "info", (2,), "{damaged}"),
    BadProbe("truncated DICOM pixel data in a series", "tseries-pixels", "predict", (1, 2), "{damaged}"),
    BadProbe("damaged DICOM header inside a series", "tseries-header", "info", (2,), "{damaged}"),
    BadProbe("damaged DICOM header inside a series", "tseries-header", "predict", (1, 2), "{damaged}"),
    BadProbe("damaged DICOM header at the end of a series", "tseries-end", "info", (0, 2), "{damaged}"),
    BadProbe("damaged DICOM header at the end of a series", "tseries-end", "predict", (0, 1, 2), "{damaged}"),
    BadProbe("NaN voxels", "nan", "predict", (0,), "are NaN or infinite"),
    BadProbe("MR-like scan", "mr", "predict", (0,), "not a CT in Hounsfield units"),
    BadProbe("CT rescaled to 0..1", "rescaled", "predict", (0,), "the scan looks rescaled"),
    BadProbe("2D PNG to a 3D model", "png", "predict", (1, 2)),
    BadProbe("output folder is a file", "blocker", "predict", (2,), "cannot write there"),
    BadProbe("two series in one folder", "two", "info", (0, 2), "series"),
    BadProbe("two series in one folder", "two", "predict", (1, 2), "--series-uid"),
    BadProbe("closed pipe (`| head -0`)", "nan", "info-pipe", (141,)),
]


def run_bad_probe(
    pr: Probes, ctx: Ctx, files: dict[str, tuple[Path, str]], damaged: dict[str, str], bp: BadProbe, k: int
) -> Row:
    path, what = files[bp.key]
    expect_text = bp.expect_text.format(damaged=damaged.get(bp.key, ""))
    tmp = pr.tmpdir(f"bad-{k:02d}")
    out = pr.w / "bad-out" / f"{k:02d}"
    folders: list[Path] = [out]
    if bp.command == "info":
        r = pr.medseg(["info", path], tmp)
    elif bp.command == "info-pipe":
        r = pr.medseg(["info", ctx.inputs[0]], tmp, shell_pipe="head -0")
        what = "`medseg info a.nii.gz | head -0`"
    elif bp.command == "data check":
        ds = small_dataset(ctx, pr.w / "bad-ds" / f"{k:02d}", path)
        r = pr.medseg(["data", "check", ds, "--no-progress"], tmp)
        folders = [ds]
        what = f"dataset (MSD, 2 cases) whose first image is: {what}"
    else:
        target = path if bp.key == "blocker" else out
        inp = ctx.inputs[0] if bp.key == "blocker" else path
        r = pr.medseg(
            [
                "predict",
                "--model",
                ctx.model,
                "--input",
                inp,
                "--output",
                target,
                "--no-progress",
                "--device",
                "cpu",
            ],
            tmp,
        )
        if bp.key == "blocker":
            folders = [path.parent]
    left, counted = describe_left(pr, tmp, folders)
    if bp.command == "predict" and bp.key != "blocker":
        left += "; --output: " + (", ".join(files_in(out)) or "nothing")
    problems = []
    seen = r.stderr + r.stdout
    if r.rc not in bp.expect_rc:
        problems.append(f"exit {r.rc}, expected {' or '.join(map(str, bp.expect_rc))}")
    if expect_text and expect_text.lower() not in seen.lower():
        problems.append(
            f"does not name {expect_text}" if bp.key in damaged else f"does not say '{expect_text}'"
        )
    if "Traceback" in seen:
        problems.append("shows a traceback")
    if bp.command == "info-pipe" and r.stderr.strip():
        problems.append("writes to stderr")
    ref = ctx.reference_peaks.get("info" if bp.command == "info-pipe" else bp.command)
    if ref is not None and r.peak_mb > ref + PEAK_MARGIN_MB:
        problems.append(f"peak {r.peak_mb:.0f} MB vs {ref:.0f} MB on a valid input")
    if counted:
        problems.append("leaves " + ", ".join(counted))
    if r.rc != 0 and any(f.endswith((".nii.gz", ".png", ".npy")) for f in files_in(out)):
        problems.append("writes an output for a refused input")
    sees = first_message(r, expect_text) if bp.command != "info-pipe" else (r.stderr or "(nothing)")
    if r.rc == 0 and bp.key in damaged:  # what was read: the shape of the scan, or of its label map
        n = len(list(path.iterdir()))
        what_read, shape = series_shape(r, out)
        sees = f"{what_read} (the folder holds {n} files); {sees}"
        if shape and shape[-1] < n and expect_text.lower() not in seen.lower():
            problems.append(f"{damaged[bp.key]} skipped without a word: {shape[-1]} of {n} slices read")
    return Row(
        probe=bp.name,
        given=f"`{bp.command.replace('-pipe', '')}`: {what}",
        sees=pr.short(sees),
        exit=r.exit_text,
        left=left,
        verdict="; ".join(problems) or "ok",
        peak=f"{r.peak_mb:.0f}",
    )


def series_shape(r: Result, out: Path) -> tuple[str, tuple[int, ...]]:
    """The shape ``medseg info`` printed, else the shape of the label map ``predict`` wrote."""
    line = next((x for x in r.stdout.splitlines() if x.startswith("shape:")), None)
    if line is not None:
        shape = tuple(int(x) for x in re.findall(r"\d+", line))
        return f"shape {' x '.join(map(str, shape))}", shape
    import nibabel as nib

    maps = sorted(out.glob("*.nii.gz"))
    if not maps:
        return "no label map", ()
    shape = tuple(int(x) for x in nib.load(str(maps[0])).shape)
    return f"label map {' x '.join(map(str, shape))}", shape


def bad_inputs(pr: Probes, ctx: Ctx) -> list[Row]:
    files, damaged = bad_input_files(pr, ctx)
    return [run_bad_probe(pr, ctx, files, damaged, bp, k) for k, bp in enumerate(BAD_PROBES)]


# --------------------------------------------------------------------------------------------------
# 2. faults


@dataclass
class Trial:
    command: str
    sig: str
    k: int
    when: str  # "random time", or the event that triggered the signal
    at: float | None  # seconds after the start: planned (random time) or when the event was seen
    landed: bool  # the signal reached a running process
    first_exit: str
    state: str  # what the interrupted run had done
    left_after_signal: str
    counted_after_signal: list[str]
    recovery: str
    left_after_recovery: str
    problems: list[str]
    seconds: float = 0.0  # wall time of the signalled command
    window: float = 0.0  # random time: the signal time was drawn uniformly in [0, window]


def _losses(run: Path) -> list[tuple[str, str]]:
    with open(run / "metrics.csv", newline="") as fh:
        return [(r["epoch"], r["train_loss"]) for r in csv.DictReader(fh)]


def check_train_run(run: Path, baseline: Path) -> list[str]:
    """Problems of a finished (resumed) run compared with the uninterrupted one."""
    import torch

    problems = []
    try:
        rows, ref = _losses(run), _losses(baseline)
    except (OSError, KeyError) as exc:
        return [f"metrics.csv unreadable ({exc})"]
    epochs = [e for e, _ in rows]
    if epochs != [str(e) for e in range(1, EPOCHS + 1)]:
        problems.append(f"metrics.csv epochs {epochs}")
    elif any(
        abs(float(a) - float(b)) > 1e-5 * max(1.0, abs(float(b)))
        for (_, a), (_, b) in zip(rows, ref, strict=True)
    ):
        problems.append(f"losses {[x for _, x in rows]} differ from the uninterrupted {[x for _, x in ref]}")
    for name in ("best.pt", "last.pt"):
        try:
            ck = torch.load(run / "checkpoints" / name, weights_only=True, map_location="cpu")
            if name == "last.pt" and ck.get("epoch") != EPOCHS:
                problems.append(f"last.pt is epoch {ck.get('epoch')}")
        except Exception as exc:  # noqa: BLE001 - any failure to load is the finding
            problems.append(f"{name} does not load ({type(exc).__name__})")
    return problems


def train_state(run: Path) -> str:
    n = len(_losses(run)) if (run / "metrics.csv").exists() else 0
    ck = "last.pt" if (run / "checkpoints" / "last.pt").exists() else "no checkpoint"
    return f"{n} epoch row(s), {ck}" if run.exists() else "no run folder yet"


#: Events that trigger a signal in the targeted trials, by command: (a temporary file is there,
#: seconds to wait after it first appeared, the signals to send).
TRAIN_EVENTS: dict[str, tuple[Callable[[Path, Path], bool], float, tuple[int, ...]]] = {
    "a checkpoint is being written": (
        lambda run, cache: any((run / "checkpoints").glob(".*tmp-*")),
        0.0,
        (signal.SIGKILL,),
    ),
    "the preprocessing cache is being written": (
        lambda run, cache: any(cache.glob("*/.*tmp-*")),
        0.0,
        (signal.SIGKILL,),
    ),
}
PREDICT_EVENTS: dict[str, tuple[Callable[[Path, Path], bool], float, tuple[int, ...]]] = {
    "the DICOM series is being decoded": (
        lambda out, tmp: any(tmp.glob("medseg-dicom-*")),
        0.0,
        (signal.SIGKILL, signal.SIGTERM),
    ),
    "a probabilities file appears": (
        lambda out, tmp: any(out.glob(".*_probabilities.tmp-*")),
        0.0,
        (signal.SIGKILL, signal.SIGTERM),
    ),
    "a probabilities file has been open for 0.2 s": (
        lambda out, tmp: any(out.glob(".*_probabilities.tmp-*")),
        0.2,
        (signal.SIGTERM,),
    ),
}


def after(found: Callable[[], bool], delay: float) -> Callable[[], bool]:
    """A condition that becomes true ``delay`` seconds after ``found()`` first was."""
    first: list[float] = []

    def condition() -> bool:
        if not first and found():
            first.append(time.monotonic())
        return bool(first) and time.monotonic() - first[0] >= delay

    return condition


def train_trial(pr: Probes, ctx: Ctx, sig: int, k: int, when: float | str) -> Trial:
    name = f"train-{SIGNALS[sig]}-{k}" if isinstance(when, float) else f"train-{SIGNALS[sig]}-event-{k}"
    base = pr.w / "faults" / name
    run, cache = base / "run", base / "cache"
    tmp = pr.tmpdir(name)
    args = train_args(ctx.ct, cache, run)
    if isinstance(when, str):
        found, delay, _ = TRAIN_EVENTS[when]
        r = pr.medseg(args, tmp, signal_at=(sig, after(lambda: found(run, cache), delay)))
    else:
        r = pr.medseg(args, tmp, signal_at=(sig, when))
    state = train_state(run)
    left1, counted1 = describe_left(pr, tmp, [run, cache], ctx.train_tmp_baseline)
    problems: list[str] = []
    steps = []
    resume = pr.medseg(["train", "--resume", "--run-dir", run, "--no-progress", "--device", "cpu"], tmp)
    steps.append(f"`train --resume`: exit {resume.exit_text}")
    if resume.rc != 0:
        steps[-1] += f" ({pr.short(first_message(resume), 90)})"
        again = pr.medseg(args, tmp)  # what the message tells the user to do: start the run again
        steps.append(f"original command again: exit {again.exit_text}")
        if again.rc != 0:
            steps[-1] += f" ({pr.short(first_message(again), 90)})"
            problems.append("no way to finish the run")
    if not problems:
        problems += check_train_run(run, ctx.model)
    left2, counted = describe_left(pr, tmp, [run, cache], ctx.train_tmp_baseline)
    if counted:
        problems.append("left " + ", ".join(counted))
    return Trial(
        "train",
        SIGNALS[sig],
        k,
        when if isinstance(when, str) else "random time",
        when if isinstance(when, float) else r.signal_sent_at,
        r.signal_sent_at is not None,
        r.exit_text,
        state,
        left1,
        counted1,
        "; ".join(steps),
        left2,
        problems,
        seconds=r.seconds,
    )


def _manifest(out: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out / "predict.json").read_text())
    except (OSError, ValueError):
        return None


def predict_state(out: Path) -> str:
    m = _manifest(out)
    if m is None:
        return "no predict.json"
    done = [c["case"] for c in m.get("cases", [])]
    interrupted = [
        Path(f["input"]).name for f in m.get("failures", []) if "interrupted" in f.get("error", "")
    ]
    text = f"predict.json: {len(done)} case(s) done"
    return text + (f", {', '.join(interrupted)} listed as interrupted" if interrupted else "")


def check_predict_out(ctx: Ctx, out: Path) -> list[str]:
    """Every case exactly once in predict.json, no failures, outputs equal the uninterrupted run's."""
    import nibabel as nib

    assert ctx.predict_baseline is not None
    m = _manifest(out)
    if m is None:
        return ["predict.json missing or unreadable"]
    expected = sorted(p.name.removesuffix(".nii.gz") for p in ctx.inputs)
    cases = sorted(c["case"] for c in m.get("cases", []))
    problems = []
    if cases != expected:
        problems.append(f"predict.json cases {cases}")
    if m.get("failures"):
        problems.append(f"predict.json failures {m['failures']}")
    for name in sorted(files_in(ctx.predict_baseline)):
        if name == "predict.json":
            continue
        mine, ref = out / name, ctx.predict_baseline / name
        if not mine.exists():
            problems.append(f"{name} missing")
        elif name.endswith(".nii.gz"):
            if not np.array_equal(
                np.asarray(nib.load(str(mine)).dataobj), np.asarray(nib.load(str(ref)).dataobj)
            ):
                problems.append(f"{name} differs from the uninterrupted run")
        elif name.endswith(".npy") and not np.array_equal(np.load(mine), np.load(ref)):
            problems.append(f"{name} differs from the uninterrupted run")
    return problems


def predict_trial(pr: Probes, ctx: Ctx, sig: int, k: int, when: float | str) -> Trial:
    name = f"predict-{SIGNALS[sig]}-{k}" if isinstance(when, float) else f"predict-{SIGNALS[sig]}-event-{k}"
    out = pr.w / "faults" / name
    tmp = pr.tmpdir(name)
    args = predict_args(ctx, out, "--save-probabilities")
    if isinstance(when, str):
        found, delay, _ = PREDICT_EVENTS[when]
        r = pr.medseg(args, tmp, signal_at=(sig, after(lambda: found(out, tmp), delay)))
    else:
        r = pr.medseg(args, tmp, signal_at=(sig, when))
    state = predict_state(out)
    left1, counted1 = describe_left(pr, tmp, [out])
    again = pr.medseg(args, tmp)
    summary = next((x for x in again.stdout.splitlines() if " predicted, " in x), first_message(again))
    recovery = f"same command again: exit {again.exit_text} ({pr.short(summary, 90)})"
    problems = [] if again.rc == 0 else ["the rerun failed"]
    problems += check_predict_out(ctx, out)
    left2, counted = describe_left(pr, tmp, [out])
    if counted:
        problems.append("left " + ", ".join(counted))
    return Trial(
        "predict",
        SIGNALS[sig],
        k,
        when if isinstance(when, str) else "random time",
        when if isinstance(when, float) else r.signal_sent_at,
        r.signal_sent_at is not None,
        r.exit_text,
        state,
        left1,
        counted1,
        recovery,
        left2,
        problems,
        seconds=r.seconds,
    )


def faults(pr: Probes, ctx: Ctx, trials: int) -> list[Trial]:
    # the duration the signal times are drawn within: the mean of two uninterrupted runs (the first
    # predict run is the reference output)
    again = pr.w / "faults" / "train-baseline-2"
    second = pr.must(train_args(ctx.ct, again / "cache", again / "run"), pr.tmpdir(again.name)).seconds
    ctx.train_seconds = (ctx.train_seconds + second) / 2
    ctx.predict_baseline = pr.w / "faults" / "predict-baseline"
    seconds = [
        pr.must(predict_args(ctx, folder, "--save-probabilities"), pr.tmpdir(folder.name)).seconds
        for folder in (ctx.predict_baseline, pr.w / "faults" / "predict-baseline-2")
    ]
    ctx.predict_seconds = sum(seconds) / len(seconds)
    out: list[Trial] = []
    for trial, window in ((train_trial, ctx.train_seconds), (predict_trial, ctx.predict_seconds)):
        for k in range(trials):
            for sig in SIGNALS:
                t = trial(pr, ctx, sig, k, pr.rng.uniform(0, window))
                t.window = window
                out.append(t)
    # targeted: the signal the moment a temporary file appears (a random time rarely hits these)
    for k, (event, (_, _, sigs)) in enumerate(TRAIN_EVENTS.items()):
        out += [train_trial(pr, ctx, sig, k, event) for sig in sigs]
    for k, (event, (_, _, sigs)) in enumerate(PREDICT_EVENTS.items()):
        out += [predict_trial(pr, ctx, sig, k, event) for sig in sigs]
    return out


# --------------------------------------------------------------------------------------------------
# 3. security


class _Payload:
    """Unpickling this runs ``touch MARKER`` (what a hostile model folder would carry)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def hostile_run(ctx: Ctx, dst: Path, marker: Path, names: Sequence[str]) -> Path:
    import torch

    shutil.copytree(ctx.model, dst)
    for name in names:
        torch.save({"model": {}, "epoch": 1, "extra": _Payload(marker)}, dst / "checkpoints" / name)
    return dst


def tree_snapshot(root: Path, skip: Sequence[Path]) -> set[str]:
    out = set()
    for p in root.rglob("*"):
        if any(p == s or s in p.parents for s in skip):
            continue
        out.add(str(p.relative_to(root)))
    return out


def pickle_probes(pr: Probes, ctx: Ctx) -> list[Row]:
    rows = []
    d = pr.w / "security" / "pickle"
    cases: list[tuple[str, Sequence[str], Callable[[Path, Path], list[str | Path]]]] = [
        (
            "`predict --model`",
            ["best.pt"],
            lambda run, out: [
                "predict",
                "--model",
                run,
                "--input",
                ctx.inputs[0],
                "--output",
                out,
                "--no-progress",
                "--device",
                "cpu",
            ],
        ),
        (
            "`train --resume`",
            ["last.pt"],
            lambda run, out: ["train", "--resume", "--run-dir", run, "--no-progress", "--device", "cpu"],
        ),
        ("`convert-run`", ["best.pt", "last.pt"], lambda run, out: ["convert-run", run]),
    ]
    for k, (what, names, argv) in enumerate(cases):
        marker = d / f"MARKER-{k}"
        run = hostile_run(ctx, d / f"run{k}", marker, names)
        before = {n: (run / "checkpoints" / n).read_bytes() for n in names}
        tmp = pr.tmpdir(f"pickle-{k}")
        out = d / f"out{k}"
        r = pr.medseg(argv(run, out), tmp)
        problems = []
        if marker.exists():
            problems.append("THE PAYLOAD RAN (marker file created)")
        if r.rc != 2:
            problems.append(f"exit {r.rc}, expected 2")
        if any((run / "checkpoints" / n).read_bytes() != before[n] for n in names):
            problems.append("the hostile checkpoint was rewritten")
        if files_in(out):
            problems.append(f"wrote {files_in(out)}")
        left, counted = describe_left(pr, tmp, [run, out])
        if counted:
            problems.append("leaves " + ", ".join(counted))
        marker_text = "marker file: " + ("CREATED" if marker.exists() else "not created")
        rows.append(
            Row(
                "malicious pickle",
                f"{what}: {' and '.join(names)} = torch.save of an object whose "
                "`__reduce__` is `os.system('touch MARKER')`",
                pr.short(first_message(r)),
                r.exit_text,
                f"{marker_text}; {left}",
                "; ".join(problems) or "ok",
            )
        )
    return rows


def path_probes(pr: Probes, ctx: Ctx) -> list[Row]:
    rows = []
    d = pr.w / "security" / "paths"
    # a model folder whose plan.json names a structure '../../../x'
    run = d / "run"
    shutil.copytree(ctx.model, run)
    plan = json.loads((run / "plan.json").read_text())
    plan["structure_names"][0] = "../../../x"
    (run / "plan.json").write_text(json.dumps(plan, indent=2))
    out = d / "out" / "a" / "b"
    tmp = pr.tmpdir("paths-plan")
    before = tree_snapshot(pr.w, [pr.w / "logs", pr.w / "tmp", out])
    r = pr.medseg(
        [
            "predict",
            "--model",
            run,
            "--input",
            ctx.series,
            "--output",
            out,
            "--no-progress",
            "--device",
            "cpu",
            "--format",
            "both",
            "--report",
            "--save-probabilities",
        ],
        tmp,
    )
    ancestors = {str(p.relative_to(pr.w)) for p in out.parents if pr.w in p.parents}
    outside = sorted(tree_snapshot(pr.w, [pr.w / "logs", pr.w / "tmp", out]) - before - ancestors)
    left, counted = describe_left(pr, tmp, [out])
    problems = [f"wrote outside --output: {outside}"] if outside else []
    problems += [f"exit {r.rc}, expected 2"] if r.rc != 2 else []
    problems += ["leaves " + ", ".join(counted)] if counted else []
    rows.append(
        Row(
            "path in a model folder",
            "plan.json of a copied model names structure `../../../x`; "
            "`predict --format both --report --save-probabilities` into `out/a/b`",
            pr.short(first_message(r)),
            r.exit_text,
            f"outside --output: {', '.join(outside) or 'nothing'}; {left}",
            "; ".join(problems) or "ok",
        )
    )
    # a config that names a structure '../../../x'
    text = CONFIG.read_text().replace("liver: 1", "'../../../x': 1")
    cfg = d / "hostile.yaml"
    cfg.write_text(text)
    tmp = pr.tmpdir("paths-config")
    run2 = d / "run2"
    r = pr.medseg(
        [
            "train",
            "--config",
            cfg,
            "--run-dir",
            run2,
            "--no-progress",
            "--device",
            "cpu",
            "--set",
            f"data.root={ctx.ct}",
            "--set",
            f"train.cache_dir={d / 'cache'}",
            *[x for s in TINY for x in ("--set", s)],
        ],
        tmp,
    )
    left, counted = describe_left(pr, tmp, [d])
    problems = [f"exit {r.rc}, expected 2"] if r.rc != 2 else []
    problems += [f"created {run2.name}/"] if run2.exists() else []
    problems += ["leaves " + ", ".join(counted)] if counted else []
    rows.append(
        Row(
            "path in a config",
            "`train --config` with `data.labels: {'../../../x': 1, ...}`",
            pr.short(first_message(r)),
            r.exit_text,
            f"run folder: {'created' if run2.exists() else 'not created'}; {left}",
            "; ".join(problems) or "ok",
        )
    )
    rows.append(report_symlink_probe(pr, ctx, d))
    return rows


def report_symlink_probe(pr: Probes, ctx: Ctx, d: Path) -> Row:
    """An output folder whose ``<case>_report`` is a symlink to a folder outside it."""
    out, outside = d / "out-link", d / "outside"
    out.mkdir(parents=True)
    outside.mkdir()
    (out / "a_report").symlink_to(outside)
    tmp = pr.tmpdir("paths-symlink")
    r = pr.medseg(
        [
            "predict",
            "--model",
            ctx.model,
            "--input",
            ctx.inputs[0],
            "--output",
            out,
            "--no-progress",
            "--device",
            "cpu",
            "--report",
        ],
        tmp,
    )
    written = files_in(outside)
    left, counted = describe_left(pr, tmp, [out, outside])
    problems = [f"wrote through the link: {written}"] if written else []
    problems += ["leaves " + ", ".join(counted)] if counted else []
    problems += ["shows a traceback"] if "Traceback" in r.stderr else []
    return Row(
        "symlink in the output folder",
        "`predict --report` where `out/a_report` is a symlink to a folder outside `out`",
        pr.short(first_message(r)),
        r.exit_text,
        f"in the link's target: {', '.join(written) or 'nothing'}; {left}",
        "; ".join(problems) or "ok",
    )


FORMULAS = {
    "1": "=1+2",
    "2": "@SUM(A1)",
    "3": '=HYPERLINK("x")',
    "4": "+1",
    "5": "-2+3",
    "6": "spine",
}
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$|^[+-]?(inf|nan)$", re.I)


def unsafe_cells(path: Path) -> tuple[list[str], list[str]]:
    """(cells that a spreadsheet would run as a formula, cells quoted with a leading ')."""
    bad, quoted = [], []
    with open(path, newline="") as fh:
        for row in csv.reader(fh):
            for cell in row:
                if cell[:1] in ("=", "+", "-", "@", "\t", "\r") and not _NUMBER.match(cell):
                    bad.append(cell)
                elif cell[:1] == "'" and cell[1:2] in ("=", "+", "-", "@", "\t", "\r"):
                    quoted.append(cell)
    return bad, quoted


def formula_probes(pr: Probes, ctx: Ctx) -> list[Row]:
    d = pr.w / "security" / "formula"
    labels = d / "labels.json"
    d.mkdir(parents=True)
    labels.write_text(json.dumps(FORMULAS))
    case = sorted((ctx.ct / "labelsTs").glob("*.nii.gz"))[0]
    for side in ("pred", "ref"):
        (d / side).mkdir()
        shutil.copy(case, d / side / "=1+2.nii.gz")
    rows = []
    tmp = pr.tmpdir("formula-evaluate")
    r = pr.medseg(
        [
            "evaluate",
            "--pred",
            d / "pred",
            "--ref",
            d / "ref",
            "--output",
            d / "ev",
            "--labels",
            labels,
            "--no-plot",
        ],
        tmp,
    )
    rows.append(
        _formula_row(
            pr, r, d / "ev" / "metrics.csv", tmp, "`evaluate` → metrics.csv", "case file `=1+2.nii.gz`"
        )
    )
    image = ctx.ct / "imagesTs" / case.name.replace(".nii.gz", "_0000.nii.gz")
    tmp = pr.tmpdir("formula-report")
    r = pr.medseg(
        ["report", "--image", image, "--mask", case, "--labels", labels, "--output", d / "rep", "--no-pdf"],
        tmp,
    )
    rows.append(_formula_row(pr, r, d / "rep" / "volumes.csv", tmp, "`report` → volumes.csv", ""))
    # label names that are HTML
    html_labels = d / "html_labels.json"
    html_labels.write_text(json.dumps({**FORMULAS, "1": "<img src=x onerror=alert(1)>"}))
    tmp = pr.tmpdir("html-report")
    r = pr.medseg(
        [
            "report",
            "--image",
            image,
            "--mask",
            case,
            "--labels",
            html_labels,
            "--output",
            d / "rep-html",
            "--no-pdf",
        ],
        tmp,
    )
    page = d / "rep-html" / "report.html"
    text = page.read_text(errors="replace") if page.exists() else ""
    raw = "<img src=x" in text
    problems = ["report.html holds the raw tag"] if raw else []
    problems += [f"exit {r.rc}"] if r.rc not in (0, 2) else []
    problems += ["shows a traceback"] if "Traceback" in r.stderr else []
    seen = "refused" if r.rc == 2 else "report.html: "
    if r.rc != 2:
        seen += "raw tag" if raw else ("`&lt;img` (escaped)" if "&lt;img src=x" in text else "name not shown")
    rows.append(
        Row(
            "HTML in a label name",
            "`report --labels` with label 1 named `<img src=x onerror=alert(1)>`",
            pr.short(first_message(r)),
            r.exit_text,
            f"{seen}; {describe_left(pr, tmp, [d])[0]}",
            "; ".join(problems) or "ok",
        )
    )
    return rows


def _formula_row(pr: Probes, r: Result, table: Path, tmp: Path, what: str, extra: str) -> Row:
    names = ", ".join(f"`{v}`" for v in FORMULAS.values())
    given = f"{what}: labels JSON naming structures {names}" + (f"; {extra}" if extra else "")
    if not table.exists():
        return Row(
            "formula injection",
            given,
            pr.short(first_message(r)),
            r.exit_text,
            "no CSV written",
            f"exit {r.rc}; no CSV to check",
        )
    bad, quoted = unsafe_cells(table)
    problems = [f"{len(bad)} cell(s) a spreadsheet would evaluate: {sorted(set(bad))[:4]}"] if bad else []
    problems += [f"exit {r.rc}, expected 0"] if r.rc != 0 else []
    left, counted = describe_left(pr, tmp, [table.parent])
    problems += ["leaves " + ", ".join(counted)] if counted else []
    sample = ", ".join(f"`{q}`" for q in sorted(set(quoted))[:3])
    return Row(
        "formula injection",
        given,
        pr.short(first_message(r)),
        r.exit_text,
        f"{table.name}: {len(quoted)} quoted cell(s) (e.g. {sample}), {len(bad)} unquoted; {left}",
        "; ".join(problems) or "ok",
    )


# --------------------------------------------------------------------------------------------------
# PHI


PHI = {
    "PatientName": "Zzyzx^Quentin",
    "PatientID": "PRB0884123",
    "PatientBirthDate": "19470315",
    "AccessionNumber": "ACC5521PRB",
    "ReferringPhysicianName": "Refdoc^Ophelia",
    "InstitutionName": "Probe General Hospital",
}
#: What is searched for (case-insensitive) per identifier.
PHI_TOKENS = {
    "name": ["Zzyzx", "Quentin"],
    "ID": ["PRB0884123"],
    "birth date": ["19470315", "1947-03-15", "15.03.1947", "03/15/1947"],
    "accession": ["ACC5521PRB"],
    "referring physician": ["Refdoc", "Ophelia"],
    "institution": ["Probe General"],
}


def pdf_text(data: bytes) -> str:
    """The strings drawn in a PDF: every stream inflated, the literal strings of Tj/TJ joined (kerning
    splits words into several literals), plus the raw bytes."""
    parts = [data.decode("latin-1")]
    for m in re.finditer(rb"stream\r?\n(.*?)\r?\nendstream", data, re.S):
        try:
            text = zlib.decompress(m.group(1)).decode("latin-1")
        except zlib.error:
            text = m.group(1).decode("latin-1")
        parts.append(text)
        for arr in re.finditer(r"\[(.*?)\]\s*TJ|(\((?:\\.|[^\\)])*\))\s*Tj", text, re.S):
            literals = re.findall(r"\(((?:\\.|[^\\)])*)\)", arr.group(0))
            parts.append("".join(re.sub(r"\\(.)", r"\1", s) for s in literals))
    return "\n".join(parts)


def searchable_text(path: Path) -> str:
    data = path.read_bytes()
    if path.name.endswith(".gz"):
        data = gzip.decompress(data)
    if path.suffix == ".pdf":
        return pdf_text(data)
    text = data.decode("latin-1")
    return html.unescape(text) if path.suffix == ".html" else text


def output_kind(name: str) -> str:
    kinds = [
        ("_seg.dcm", "DICOM SEG"),
        ("_probabilities.npy", "probabilities .npy"),
        ("_probabilities.json", "probabilities .json"),
        ("predict.json", "predict.json"),
        ("report.html", "report.html"),
        ("report.json", "report.json"),
        ("report.pdf", "report.pdf"),
        ("volumes.csv", "report volumes.csv"),
        (".nii.gz", "NIfTI label map"),
        (".png", "PNG"),
    ]
    return next((kind for suffix, kind in kinds if name.endswith(suffix)), name)


@dataclass
class PhiRow:
    kind: str
    file: str
    found: dict[str, list[str]]  # mode ("plain" / "anon") -> identifiers found
    pseudonym: dict[str, bool]  # mode -> the SHA-256 pseudonym of the PatientID is there
    note: str = ""

    def verdict(self) -> str:
        problems = []
        if self.found.get("anon"):
            problems.append("identifiers with --anonymize")
        if self.found.get("plain"):
            if self.kind == "DICOM SEG":
                problems.append("as documented: a SEG carries the source's patient module")
            else:
                problems.append("identifiers without --anonymize")
        return "; ".join(problems) or "ok"


def found_identifiers(text: str) -> list[str]:
    low = text.lower()
    return [what for what, tokens in PHI_TOKENS.items() if any(t.lower() in low for t in tokens)]


def phi_predict(pr: Probes, ctx: Ctx, series: Path, out: Path, anonymize: bool) -> tuple[Result, str]:
    tmp = pr.tmpdir(f"phi-{out.name}")
    args: list[str | Path] = ["predict", "--model", ctx.model, "--input", series, "--output", out]
    args += ["--no-progress", "--device", "cpu", "--format", "both", "--report", "--save-probabilities"]
    r = pr.medseg([*args, *(["--anonymize"] if anonymize else [])], tmp)
    return r, describe_left(pr, tmp, [out])[0]


def _find_key(doc: Any, key: str) -> Any:
    """The first value of ``key`` anywhere in a JSON document."""
    if isinstance(doc, dict):
        if key in doc:
            return doc[key]
        doc = list(doc.values())
    if isinstance(doc, list):
        for item in doc:
            found = _find_key(item, key)
            if found is not None:
                return found
    return None


def run_pseudonym(out: Path) -> str:
    """The patient pseudonym a predict run wrote: the report's, else the DICOM SEG's PatientID."""
    for path in sorted(out.rglob("report.json")):
        value = _find_key(json.loads(path.read_text()), "patient_pseudonym")
        if value:
            return str(value)
    seg = sorted(out.glob("*_seg.dcm"))
    if seg:
        import pydicom

        return str(pydicom.dcmread(seg[0]).get("PatientID", ""))
    return ""


def phi_probe(pr: Probes, ctx: Ctx) -> tuple[list[PhiRow], list[str]]:
    """Predict a series carrying known identifiers with every output on, with and without --anonymize,
    and search every file written (and the console output) for them and for the run's pseudonym."""
    d = pr.w / "security" / "phi"
    series = copy_series(ctx.series, d / "in" / "patient", **PHI)
    rows: dict[str, PhiRow] = {}
    notes = []
    pseudonyms: dict[str, str] = {}
    for mode in ("plain", "anon"):
        out = d / mode
        r, left = phi_predict(pr, ctx, series, out, anonymize=mode == "anon")
        flag = " --anonymize" if mode == "anon" else ""
        notes.append(f"`predict{flag}`: exit {r.exit_text} ({pr.short(first_message(r))}); {left}")
        pseudonyms[mode] = code = run_pseudonym(out).lower()
        texts = {("console output (stdout + stderr)", ""): r.stdout + r.stderr}
        texts |= {(output_kind(name), name): searchable_text(out / name) for name in files_in(out)}
        for (kind, name), text in texts.items():
            row = rows.setdefault(kind, PhiRow(kind, name, {}, {}))
            row.found[mode] = found_identifiers(text)
            row.pseudonym[mode] = bool(code) and code in text.lower()
            if name.endswith(".pdf") and "for research use" not in text.lower():
                row.note = "no text could be extracted: not conclusive"
    notes.append(pseudonym_note(pseudonyms, rows))
    return list(rows.values()), notes


def pseudonym_note(pseudonyms: dict[str, str], rows: dict[str, PhiRow]) -> str:
    """Where the pseudonyms appear, whether the two runs share one, and whether it is an unkeyed SHA-256
    of the PatientID (which trying IDs of the same format reverses)."""
    plain, anon = pseudonyms.get("plain", ""), pseudonyms.get("anon", "")
    where = ", ".join(r.kind for r in rows.values() if r.pseudonym.get("plain") or r.pseudonym.get("anon"))
    text = (
        f"pseudonyms: `{plain or '-'}` (run without --anonymize), `{anon or '-'}` (with --anonymize); "
        f"{'the same' if plain == anon else 'different'} in the two runs; found in {where or 'no file'}"
    )
    code = anon or plain
    digest = hashlib.sha256(PHI["PatientID"].encode()).hexdigest()
    if not code or not digest.startswith(code):
        return text + "; not an unkeyed SHA-256 of the PatientID"
    t0 = time.monotonic()
    prefix, width = PHI["PatientID"][:3], len(PHI["PatientID"]) - 3
    hit = next(
        (
            f"{prefix}{n:0{width}d}"
            for n in range(10**width)
            if hashlib.sha256(f"{prefix}{n:0{width}d}".encode()).hexdigest().startswith(code)
        ),
        None,
    )
    return text + (
        f"; it is the first {len(code)} hex digits of the unkeyed SHA-256 of the PatientID: trying IDs of"
        f" the format `{prefix}` + {width} digits found `{hit}` in {time.monotonic() - t0:.1f} s here"
    )


# --------------------------------------------------------------------------------------------------
# the document


def md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(md(c) for c in row) + " |" for row in rows]
    return out


def source_info() -> str:
    probe = subprocess.run(
        [sys.executable, "-c", "import medseg, sys; print(medseg.__version__, medseg.__file__)"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "MEDSEG_MALLOC": "default"},
    )
    version, _, where = probe.stdout.strip().partition(" ")
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "medseg"], capture_output=True, text=True, cwd=REPO
        )
        state = f"git {head.stdout.strip()}" + (
            " with uncommitted changes under medseg/" if dirty.stdout.strip() else ""
        )
    except OSError:
        state = "not a git checkout"
    return f"medseg {version} ({state}), imported from `{Path(where).parent}`"


def fault_summary(trials: list[Trial]) -> list[list[str]]:
    """One row per (command, signal, random time or event)."""
    groups: dict[tuple[str, str, str], list[Trial]] = {}
    for t in trials:
        groups.setdefault((t.command, t.sig, t.when), []).append(t)
    rows = []
    for (command, sig, when), mine in groups.items():
        problems = sorted({p for t in mine for p in t.problems})
        rows.append(
            [
                f"`{command}`",
                sig,
                "random time" if when == "random time" else f"when {when}",
                str(len(mine)),
                str(sum(t.landed for t in mine)),
                str(sum(bool(t.counted_after_signal) for t in mine)),
                str(sum(not t.problems for t in mine)),
                "; ".join(problems) or "nothing",
            ]
        )
    return rows


def write_doc(
    path: Path,
    args: argparse.Namespace,
    ctx: Ctx,
    sections: dict[str, Any],
    started: datetime,
    seconds: float,
) -> None:
    command = shlex.join([os.path.relpath(sys.executable, Path.cwd()), *sys.argv])
    lines = [
        "# Reliability probes",
        "",
        " ".join(INTRO.split()),
        "",
        f"- produced by: `{command}` (from the repository root), {seconds / 60:.1f} minutes",
        f"- date: {started:%Y-%m-%d %H:%M}; machine: {platform.platform()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}",
        f"- tested: {source_info()}",
        f"- seed {args.seed}, {args.trials} trial(s) per command and signal; `$W` below is the probe work"
        " folder",
        "",
        "Set-up (tiny phantoms and a tiny model; the training command is also the one the fault trials run):",
        "",
        "```",
        *ctx.setup_commands,
        "```",
        "",
        "An uninterrupted training run (the model above) leaves in its TMPDIR:"
        f" {', '.join(ctx.train_tmp_baseline) or 'nothing'}.",
        "",
    ]
    if "bad" in sections:
        refs = ", ".join(f"`{k}` {v:.0f} MB" for k, v in ctx.reference_peaks.items())
        lines += [
            "## 1. Bad inputs",
            "",
            f"Peak memory of the same commands on a valid small input: {refs}. A refusal counts as ok when it"
            " exits with the expected code, says what is wrong (no traceback), stays within"
            f" {PEAK_MARGIN_MB:.0f} MB of that peak, and leaves nothing behind.",
            "",
            *table(
                [
                    "probe",
                    "input / fault",
                    "what the user sees",
                    "exit code",
                    "peak MB",
                    "left on disk",
                    "verdict",
                ],
                [[r.probe, r.given, r.sees, r.exit, r.peak, r.left, r.verdict] for r in sections["bad"]],
            ),
            "",
        ]
    if "faults" in sections:
        lines += fault_lines(sections["faults"], args.trials, ctx)
    if "security" in sections:
        lines += security_lines(sections["security"])
    findings = collect_findings(sections)
    lines += ["## Findings", ""]
    lines += [f"- {md(f)}" for f in findings] or ["- none: every probe above ended as expected"]
    lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def trial_name(t: Trial) -> str:
    return f"`{t.command}` {t.sig} " + (f"#{t.k + 1}" if t.when == "random time" else f"when {t.when}")


def trial_time(t: Trial) -> str:
    if t.when == "random time":
        assert t.at is not None
        return f"{t.at:.2f} s of [0, {t.window:.1f}]" + ("" if t.landed else " (the run had already ended)")
    return f"{t.at:.2f} s" if t.at is not None else "never (the event was not seen; the run ended)"


def fault_lines(trials: list[Trial], n: int, ctx: Ctx) -> list[str]:
    text = FAULTS_TEXT.format(n=n, epochs=EPOCHS, train=ctx.train_seconds, predict=ctx.predict_seconds)
    return [
        "## 2. Faults",
        "",
        " ".join(text.split()),
        "",
        *table(
            [
                "command",
                "signal",
                "sent at",
                "trials",
                "signal reached a running process",
                "left something right after the signal",
                "ended cleanly after recovery",
                "problems after recovery",
            ],
            fault_summary(trials),
        ),
        "",
        "Every trial (state and leftovers right after the signal, then after the recovery):",
        "",
        *table(
            [
                "trial",
                "signal sent at",
                "exit code",
                "state at the signal",
                "left right after",
                "recovery",
                "left after recovery",
                "verdict",
            ],
            [
                [
                    trial_name(t),
                    trial_time(t),
                    t.first_exit,
                    t.state,
                    t.left_after_signal,
                    t.recovery,
                    t.left_after_recovery,
                    "; ".join(t.problems) or "ok",
                ]
                for t in trials
            ],
        ),
        "",
    ]


FAULTS_TEXT = """
{n} trial(s) per command and signal at a seeded random time, uniform within the mean run time of two
uninterrupted runs measured first (`train` {train:.1f} s, `predict` {predict:.1f} s; the run time varies
with the machine's load, so some signals come after the run ended and some runs are further along than
others: the state column says where each signal landed). Then targeted trials send the signal the
moment a temporary file appears (a checkpoint or cache entry being written, a DICOM series being
decoded into TMPDIR, a probabilities file being written): a random
time rarely hits those moments. `train` (fresh run folder and preprocessing cache per trial) is then
resumed with `medseg train --resume --run-dir RUN` (and, when that says there is nothing to resume,
started again with the original command); it must end with exactly one `metrics.csv` row per epoch
(1..{epochs}), losses equal to the uninterrupted run's (CPU training is deterministic), `best.pt` and
`last.pt` loading with `torch.load(weights_only=True)`, and nothing temporary in the run folder, the
cache or TMPDIR. `predict` (3 NIfTI files and a DICOM series, `--save-probabilities`) is run again with
the same command; every case must then be in `predict.json` exactly once with no failures, every output
equal to the uninterrupted run's, and nothing left in TMPDIR or the output folder.
"""


def security_lines(sec: dict[str, Any]) -> list[str]:
    phi_rows: list[PhiRow] = sec["phi"]
    lines = [
        "## 3. Security",
        "",
        *table(
            ["probe", "input / fault", "what the user sees", "exit code", "left on disk", "verdict"],
            [[r.probe, r.given, r.sees, r.exit, r.left, r.verdict] for r in sec["rows"]],
        ),
        "",
        "### Patient identifiers in each output format",
        "",
        "A copy of the phantom DICOM series with "
        + ", ".join(f"{k} `{v}`" for k, v in PHI.items())
        + " predicted with `medseg predict --format both --report --save-probabilities` (and again with"
        " `--anonymize`). Every file written is searched, case-insensitively, for each identifier (birth"
        " date also as 1947-03-15, 15.03.1947, 03/15/1947): `.gz` files decompressed, HTML entities"
        " decoded, PDF streams inflated and their text strings joined (the PDF counts only if its 'for"
        " research use' note is found that way). Text drawn into images (the overlays) is not searched."
        " `pseudonym`: whether the file holds the patient pseudonym of that run (from its report.json, else"
        " the SEG's PatientID), without / with `--anonymize`.",
        "",
        *table(
            ["output", "file", "identifiers found", "with --anonymize", "pseudonym", "verdict"],
            [
                [
                    r.kind,
                    f"`{r.file}`" if r.file else "",
                    ", ".join(r.found.get("plain", [])) or "none",
                    ", ".join(r.found.get("anon", [])) or "none",
                    "/".join(f"{'yes' if r.pseudonym.get(m) else 'no'}" for m in ("plain", "anon")),
                    r.verdict() + (f" ({r.note})" if r.note else ""),
                ]
                for r in phi_rows
            ],
        ),
        "",
    ]
    lines += [f"- {md(n)}" for n in sec["phi_notes"]]
    return [*lines, ""]


def collect_findings(sections: dict[str, Any]) -> list[str]:
    out = []
    for r in sections.get("bad", []):
        if r.verdict != "ok":
            out.append(f"bad input, {r.probe} ({r.given}): {r.verdict}")
    for t in sections.get("faults", []):
        if t.problems:
            out.append(f"{trial_name(t)} ({trial_time(t)}): {'; '.join(t.problems)}")
    sec = sections.get("security", {})
    for r in sec.get("rows", []):
        if r.verdict != "ok":
            out.append(f"security, {r.probe}: {r.verdict}")
    for r in sec.get("phi", []):
        if r.verdict() != "ok" and not r.verdict().startswith("as documented"):
            out.append(f"patient identifiers in {r.kind}: {r.verdict()}")
    out += [n for n in sec.get("phi_notes", []) if "unkeyed SHA-256 of the PatientID:" in n]
    return out


# --------------------------------------------------------------------------------------------------
# main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Run medseg's reliability probes (bad inputs, SIGKILL/SIGTERM during train and predict, "
        "hostile model folders, path names, CSV formulas, patient identifiers in outputs) as a user would, "
        "and write the markdown tables."
    )
    p.add_argument(
        "--out", type=Path, default=REPO / "docs" / "reliability.md", help="markdown file to write"
    )
    p.add_argument("--trials", type=int, default=5, help="trials per command and signal (default 5)")
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the signal times and random inputs (default 0)"
    )
    p.add_argument("--workdir", type=Path, help="work folder (default: a fresh temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the work folder (always kept with --workdir)")
    p.add_argument(
        "--sections",
        default="bad,faults,security",
        help="comma-separated subset of bad,faults,security (default: all)",
    )
    args = p.parse_args(argv)
    if args.trials < 1:
        p.error("--trials must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    wanted = {s.strip() for s in args.sections.split(",") if s.strip()}
    if not wanted <= {"bad", "faults", "security"}:
        raise SystemExit(f"--sections: unknown {sorted(wanted - {'bad', 'faults', 'security'})}")
    if args.workdir is not None:
        workdir = args.workdir.resolve()
        if workdir.exists() and any(workdir.iterdir()):
            raise SystemExit(f"--workdir {workdir}: not empty")
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        workdir = Path(tempfile.mkdtemp(prefix="medseg-probes-")).resolve()
    started, t0 = datetime.now(), time.monotonic()
    pr = Probes(workdir, args.seed)
    print(f"work folder: {workdir}", flush=True)
    ctx = setup(pr)
    sections: dict[str, Any] = {}
    if "bad" in wanted:
        reference_peaks(pr, ctx)
        sections["bad"] = bad_inputs(pr, ctx)
        print(f"bad inputs done ({time.monotonic() - t0:.0f} s)", flush=True)
    if "faults" in wanted:
        sections["faults"] = faults(pr, ctx, args.trials)
        print(f"faults done ({time.monotonic() - t0:.0f} s)", flush=True)
    if "security" in wanted:
        rows = pickle_probes(pr, ctx) + path_probes(pr, ctx) + formula_probes(pr, ctx)
        phi, notes = phi_probe(pr, ctx)
        sections["security"] = {"rows": rows, "phi": phi, "phi_notes": notes}
        print(f"security done ({time.monotonic() - t0:.0f} s)", flush=True)
    write_doc(args.out, args, ctx, sections, started, time.monotonic() - t0)
    print(f"wrote {args.out} ({len(pr.commands)} medseg commands, {(time.monotonic() - t0) / 60:.1f} min)")
    if args.workdir is None and not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
