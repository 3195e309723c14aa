"""scripts/benchmark.py: a smoke run with tiny models and images (its timings are not checked)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "benchmark.py"
TINY = ["--teacher", "cnn_small", "--student", "cnn_tiny", "--image_size", "32", "--batch_size", "8", "--steps", "2",
        "--warmup", "1", "--rounds", "1", "--images", "16", "--workers", "1", "--accelerator", "cpu"]


@pytest.mark.slow
def test_benchmark_smoke_reports_every_variant_and_ratio(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, str(SCRIPT), *TINY, "--json", str(out)], capture_output=True,
                            text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    variants = {"plain_distill", "kd_distill", "plain_student", "kd_student", "kd_cached",
                "pipeline_pil_w0", "pipeline_cache_w0", "pipeline_pil_w1", "pipeline_cache_w1"}
    assert set(report["variants"]) == variants
    for name, entry in report["variants"].items():
        assert len(entry["rounds"]) == 1 and entry["images_per_s"] > 0, name
        assert len(entry["step_s"]) == (1 if name.startswith(("plain", "kd")) else 0), name
    ratios = {"kd_step / plain_loop time", "kd_student / plain_student time", "cached_distill / student_only time",
              "online_distill / student_only time", "image_cache / PIL images/s (0 workers)",
              "image_cache / PIL images/s (1 workers)"}
    assert set(report["ratios"]) == ratios
    for name, ratio in report["ratios"].items():
        assert math.isfinite(ratio["value"]) and ratio["value"] > 0, name
        assert ratio["met"] in (True, False) if ratio["target"][0] in "<>" else ratio["met"] is None, name
    assert report["settings"]["teacher"] == "cnn_small" and report["settings"]["steps"] == 2
    assert report["versions"]["torch"] and report["machine"]["cpu_count"] and report["torch_threads"] >= 1
    assert report["image_cache_build_s"] > 0
    for name in [*variants, *ratios, "images/s (median)"]:
        assert name in result.stdout, name
