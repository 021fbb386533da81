"""The public API is deliberate: removing or adding a name means updating tests/public_api.json."""

import json
import subprocess
import sys
from pathlib import Path

import medseg


def test_public_api_matches_snapshot() -> None:
    expected = json.loads((Path(__file__).parent / "public_api.json").read_text())
    assert sorted(medseg.__all__) == sorted(expected)
    for name in medseg.__all__:
        assert hasattr(medseg, name), name


def test_import_does_not_load_torch() -> None:
    code = "import sys, medseg, medseg.cli.main; print('torch' in sys.modules, 'monai' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
