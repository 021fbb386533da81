"""report.html rendered by headless Chromium: organ table and every overlay in the DOM, and a picture
that is not blank. Skipped when ``chromium`` is not on PATH (CI installs it)."""

from __future__ import annotations

import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from medseg.labels import LabelLayout
from medseg.report import write_report
from medseg.types import Volume

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium")
_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--hide-scrollbars",
    "--allow-file-access-from-files",
]


class _Dom(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.imgs: list[dict[str, str | None]] = []
        self.table_rows: list[str] = []
        self.tables: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a)
        elif tag == "table" and a.get("id"):
            self.tables.append(str(a["id"]))
        elif tag == "tr" and a.get("data-structure"):
            self.table_rows.append(str(a["data-structure"]))


def _chromium(*args: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    return subprocess.run(
        [CHROMIUM, *_FLAGS, *args], capture_output=True, text=True, timeout=180, check=False
    )


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (CI installs it)")
def test_report_renders_in_headless_chromium(
    ph: tuple[Volume, Volume], spec: LabelLayout, tmp_path: Path
) -> None:
    from PIL import Image

    img, lab = ph
    html = write_report(img, lab, tmp_path / "out", spec=spec, pdf=False)["html"]
    url = html.resolve().as_uri()

    dom = _chromium("--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    parsed = _Dom()
    parsed.feed(dom.stdout)
    assert "organ-table" in parsed.tables and "scan-facts" in parsed.tables
    assert parsed.table_rows == ["liver", "spleen"]
    overlays = [a for a in parsed.imgs if a.get("class") == "structure-overlay"]
    assert sorted(str(a["data-structure"]) for a in overlays) == ["liver", "spleen"]
    assert any(a.get("id") == "overview" for a in parsed.imgs)
    assert all(str(a.get("src")).startswith("data:image/png;base64,") for a in parsed.imgs)

    shot = tmp_path / "report.png"
    res = _chromium(f"--screenshot={shot}", "--window-size=1100,1800", url)
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    rgb = np.asarray(Image.open(shot).convert("RGB")).astype(np.int16)
    assert rgb.shape[:2] == (1800, 1100)
    grey = rgb.mean(axis=2)
    assert grey.std() > 20  # text, table and pictures, not a blank page
    assert (grey < 128).mean() > 0.01  # enough dark pixels (text, scan background)
    # the overlays were decoded and drawn: saturated colours of the structure fills are on screen
    saturation = rgb.max(axis=2) - rgb.min(axis=2)
    assert (saturation > 80).sum() > 500
