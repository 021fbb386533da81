"""``medseg info``: geometry and intensity summary of an image file or DICOM series folder."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info",
        help="shape, spacing, orientation, origin, affine, dtype and intensity range of a scan",
        description="Print the voxel grid of a scan as medseg reads it: shape, spacing (mm), "
        "orientation code (e.g. RAS, LPS: the world direction each voxel axis points to), origin "
        "(RAS mm of voxel 0), the 4x4 voxel->RAS-world affine, dtype and intensity range.",
    )
    p.add_argument("path", help="NIfTI/NRRD/MHA/PNG/JPEG file, DICOM file, or DICOM series folder")
    p.add_argument("--series-uid", help="which series to read when a folder holds several")
    p.add_argument(
        "--json",
        action="store_true",
        help="print JSON with keys shape, spacing, orientation, origin, affine, dtype, min, max",
    )
    p.set_defaults(func=run)


def _fmt(v: float) -> str:
    return f"{v:.4f}".rstrip("0").rstrip(".") if isinstance(v, float) else str(v)


def run(args: argparse.Namespace) -> int:
    from medseg.io import describe_volume, load_volume

    vol = load_volume(args.path, series_uid=args.series_uid)
    d = describe_volume(vol)
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    print(f"file:        {args.path}")
    print(f"shape:       {' x '.join(str(s) for s in d['shape'])}")
    print(f"spacing:     {' x '.join(_fmt(s) for s in d['spacing'])} mm")
    print(f"orientation: {d['orientation']}")
    print(f"origin:      ({', '.join(_fmt(v) for v in d['origin'])}) mm (RAS)")
    print("affine (voxel -> RAS mm):")
    for row in d["affine"]:
        print("  [" + "  ".join(f"{v:10.4f}" for v in row) + " ]")
    print(f"dtype:       {d['dtype']}")
    print(f"range:       {d['min']} .. {d['max']}")
    return 0
