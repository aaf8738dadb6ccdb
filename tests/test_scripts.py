"""The prepared GPU check (scripts/device_check.py) runs end to end on CPU, so it works when a device is lent."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_device_check(tmp_path, *args):
    env = {**os.environ, "LABKIT_FAST": "1", "MPLBACKEND": "Agg"}
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "device_check.py"), "--out", str(tmp_path), *args],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


def test_device_check_measures_every_figure_without_errors(tmp_path):
    done = run_device_check(tmp_path, "--only", "efficient,tip,blip2,clip", "--steps", "4", "--repeats", "1")
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "device_check.json").read_text())
    assert not [name for name in ("efficient", "tip", "blip2", "clip") if "error" in result[name]], result
    assert result["efficient"]["pairs_16"]["pruned"]["speedup"] > 0
    assert set(result["tip"]) == {"toy", "ViT-B-32 (random init)"}
    assert all(v["cache_build_ms"] > 0 and v["query_ms"] > 0 for v in result["tip"].values())
    for run in (result["blip2"]["stage1"], result["blip2"]["stage2_t5"], result["clip"]):
        assert run["images_per_s"] > 0
        assert run["shipped_run_s"] == pytest.approx(run["shipped_steps"] * run["batch"] / run["images_per_s"], rel=0.01)


def test_device_check_rejects_an_unknown_check(tmp_path):
    done = run_device_check(tmp_path, "--only", "clip,gpu_magic")
    assert done.returncode == 2 and "unknown check(s) gpu_magic; accepted: masking, efficient, tip, blip2, clip" in done.stderr
    assert not (tmp_path / "device_check.json").exists()

