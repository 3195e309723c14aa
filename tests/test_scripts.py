"""scripts/make_digits.py: real scans written as an ImageFolder that kd reads as it is."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from kd.data.sources.folder import scan_image_folder

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "make_digits.py"


def _make(out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), str(out)], capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_digits_become_a_train_val_image_folder(tmp_path):
    result = _make(tmp_path / "digits")
    assert result.returncode == 0, result.stderr
    layout = scan_image_folder(tmp_path / "digits")
    assert layout.classes == [str(d) for d in range(10)]
    assert (len(layout.train), len(layout.val)) == (1347, 450)  # all 1,797 scans, a quarter of each class held out
    assert not {p for p, _ in layout.train.samples} & {p for p, _ in layout.val.samples}
    with Image.open(layout.val.describe(0)) as image:
        assert image.size == (8, 8) and image.mode == "L"


def test_existing_folder_is_never_overwritten(tmp_path):
    out = tmp_path / "digits"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    result = _make(out)
    assert result.returncode == 2 and result.stderr.startswith(f"error: {out} exists already")
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
