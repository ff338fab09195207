"""Batch prediction's record survives odd names, kills at any point, and spreadsheets."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from iadkit.cli import main
from iadkit.deploy.batch import decode_path

ODD_NAMES = [b"plain.png", b"caf\xc3\xa9.png", b"latin1-\xe9.png", b"cr\r.png", b"fs\x1c.png",
             b"nel\xc2\x85.png", b"ls\xe2\x80\xa8.png", b"=HYPERLINK(1).png", b".hidden.png",
             b"-minus.png"]


@pytest.fixture
def saved_model(fitted_patchcore, tmp_path: Path) -> Path:
    detector, _ = fitted_patchcore
    return detector.save(tmp_path / "model")


def _odd_folder(toy_root: Path, folder: Path) -> None:
    """A folder of copies of one test image under awkward names."""
    source = next((toy_root / "alpha" / "test" / "good").glob("*.png")).read_bytes()
    folder.mkdir()
    for name in ODD_NAMES:
        with open(os.path.join(os.fsencode(folder), name), "wb") as handle:
            handle.write(source)


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]


def test_awkward_names_are_recorded_losslessly_and_resume_finds_them(
        saved_model: Path, toy_root: Path, tmp_path: Path, capsys,
        monkeypatch: pytest.MonkeyPatch) -> None:
    _odd_folder(toy_root, tmp_path / "odd")
    names = {os.fsdecode(n) for n in ODD_NAMES}
    out = tmp_path / "out"
    monkeypatch.chdir(tmp_path / "odd")  # relative names: the CSV cells start with them
    assert main(["predict", str(saved_model), ".", "--out", str(out), "-q"]) == 0
    records = _records(out)
    assert {decode_path(r["path"], r["path_encoding"]) for r in records} == names
    assert all(r["score"] and not r["error"] for r in records)  # hidden file included
    rows = list(csv.DictReader((out / "scores.csv").open(encoding="utf-8", newline="")))
    assert len(rows) == len(ODD_NAMES)
    cells = {r["path"] for r in rows}
    # formula-like names are text to a spreadsheet; the log keeps the real name
    assert not any(c.startswith(("=", "-", "+", "@")) for c in cells)
    assert {"'=HYPERLINK(1).png", "'-minus.png", "plain.png", "café.png"} <= cells
    capsys.readouterr()
    assert main(["predict", str(saved_model), ".", "--out", str(out), "--resume", "-q"]) == 0
    assert f"0 images scored, 0 unreadable, {len(ODD_NAMES)} already done" in \
        capsys.readouterr().out
    assert _records(out) == records


def test_a_kill_before_any_record_still_gives_a_csv_with_a_header(
        saved_model: Path, toy_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "scores.jsonl").write_text("")  # killed right after starting
    images = str(toy_root / "alpha" / "test")
    assert main(["predict", str(saved_model), images, "--out", str(out), "--resume",
                 "-q"]) == 0
    rows = list(csv.DictReader((out / "scores.csv").open()))
    assert len(rows) == 12 and rows[0]["score"]


def test_absolute_and_relative_globs(saved_model: Path, toy_root: Path, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    pattern = str(toy_root / "alpha" / "test" / "**" / "*.png")
    assert main(["predict", str(saved_model), pattern, "--out", str(tmp_path / "a"),
                 "-q"]) == 0
    monkeypatch.chdir(toy_root / "alpha")
    assert main(["predict", str(saved_model), "test/*/*.png", "--out", str(tmp_path / "r"),
                 "-q"]) == 0
    assert len(_records(tmp_path / "a")) == len(_records(tmp_path / "r")) == 12


def test_a_kill_at_any_point_then_resume_gives_exactly_the_uninterrupted_result(
        saved_model: Path, toy_root: Path, tmp_path: Path) -> None:
    images = tmp_path / "many"
    for copy in range(2):  # 24 files, scored one at a time so that kills land mid-run
        shutil.copytree(toy_root / "alpha" / "test", images / str(copy))
    arguments = ["predict", str(saved_model), str(images), "--batch-size", "1", "--no-heatmaps",
                 "-q", "--out"]
    reference = tmp_path / "reference"
    assert main([*arguments, str(reference)]) == 0
    expected = (reference / "scores.csv").read_text()
    for after in (1, 9, 17):  # killed in a process of its own, resumed in this one
        out = tmp_path / f"killed-{after}"
        process = subprocess.Popen([sys.executable, "-m", "iadkit", *arguments, str(out)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        log = out / "scores.jsonl"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            if log.is_file() and log.read_bytes().count(b"\n") >= after:
                process.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
        process.wait()
        assert main([*arguments, str(out), "--resume"]) == 0
        assert (out / "scores.csv").read_text() == expected, f"killed after {after}"
