"""README.md and docs/: a guide of bounded length whose Python example runs, whose result blocks are exactly
what scripts/update_readme.py generates from results/, whose links resolve, and which speak to users."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import update_readme

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]


def test_readme_is_a_short_guide_with_the_quickstart():
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    for needed in ("make app", "make test", "make lab", "## Adding a method", "## Where things live"):
        assert needed in text


@pytest.mark.parametrize("page", DOCS, ids=lambda p: p.name)
def test_result_blocks_are_generated_from_results(page):
    text = page.read_text()
    assert update_readme.regenerate(text) == text, f"run python scripts/update_readme.py ({page.name} is stale)"


def test_a_stale_block_is_detected():
    stale = "<!-- results:eval_clip -->\n| metric | value |\n| zero_shot_shape_acc | 0.5 |\n<!-- /results:eval_clip -->"
    assert update_readme.regenerate(stale) != stale


def test_the_readme_python_example_runs_as_written():
    code = re.search(r"```python\n# README example\n(.*?)```", README.read_text(), re.S).group(1)
    env = {**os.environ, "LABKIT_FAST": "1", "MPLBACKEND": "Agg"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "novel shapes, 16 shots each:" in done.stdout


@pytest.mark.parametrize("page", DOCS, ids=lambda p: p.name)
def test_pages_speak_to_users(page):
    text = page.read_text()
    for phrase in ("/tmp/", "/work/", "DESIGN.md", "the issue", "device machine", "was lent", "../shared"):
        assert phrase not in text, f"{page.name} mentions {phrase!r}"


@pytest.mark.parametrize("page", DOCS, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
        assert (page.parent / target).exists(), f"{page.name} links to missing {target}"


def test_a_device_check_json_becomes_a_table():
    row = {"strategy": "none", "ratio": 0.0, "images_per_s": 900.0, "speedup": 1.0, "ideal": 1.0, "amdahl_ideal": 1.0,
           "of_amdahl": 1.0, "kept_token_fraction": 1.0, "amdahl_ideal_kept_tokens": 1.0, "of_amdahl_kept_tokens": 1.0}
    bench = {"model": "toy", "batch": 256, "rows": [row]}
    data = {"device": "NVIDIA H200", "torch": "2.x", "fast_mode": False,
            "masking": {"readme_batches": {"dtype": "bf16", "models": [bench], "targets": {}}}, "masking_wall_s": 60.0,
            "tip": {"toy": {"cache_build_ms": 12.5, "query_ms": 0.8}}, "clip": {"error": "RuntimeError: out of memory"}}
    table = update_readme.render_data("device_check", data)
    assert "Device: NVIDIA H200" in table and "| toy | 256 | none | 0.0 |" in table
    assert "| tip.toy.query_ms | 0.800 |" in table and "| clip.error | RuntimeError: out of memory |" in table
    assert "masking.readme_batches" not in table

