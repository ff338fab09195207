"""The HTML report renders in a real headless Chromium: its plots and overlays are drawn.

Marked slow (it starts a browser); skipped where no Chromium is installed.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from iadkit.cli import main

CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(name)), None)
#: matplotlib's colours of the report's ROC and precision-recall curves.
ROC_RED, PR_PURPLE = (214, 39, 40), (148, 103, 189)


def _pixels_near(image: np.ndarray, colour: tuple[int, int, int], tolerance: int = 20) -> int:
    """Pixels within ``tolerance`` of ``colour`` per channel (Chromium colour-manages images,
    which shifts them by a few levels)."""
    return int((np.abs(image.astype(int) - colour).max(axis=-1) <= tolerance).sum())


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed")
def test_report_renders_plots_in_headless_chromium(toy_root: Path, tmp_path: Path) -> None:
    run, report = tmp_path / "run", tmp_path / "report"
    assert main(["fit", "--method", "patchcore", "--data", str(toy_root), "--category", "alpha",
                 "--out", str(run), "--param", "image_size=64", "--quiet"]) == 0
    assert main(["test", str(run), "--report", str(report), "--quiet"]) == 0
    screenshot = tmp_path / "page.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                    "--hide-scrollbars", f"--screenshot={screenshot}", "--window-size=1280,2400",
                    (report / "index.html").as_uri()],
                   check=True, capture_output=True, timeout=120)
    page = np.asarray(Image.open(screenshot).convert("RGB"))
    assert page.shape[:2] == (2400, 1280)
    # The ROC and precision-recall curves are drawn (the embedded PNGs decoded and laid out),
    # and the page is not a blank or an error page.
    assert _pixels_near(page, ROC_RED) > 100
    assert _pixels_near(page, PR_PURPLE) > 100
    assert len(np.unique(page.reshape(-1, 3), axis=0)) > 500
