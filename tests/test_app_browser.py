"""End to end in headless Chromium (Debian's /usr/bin/chromium) through Playwright: upload support images,
build the cache, classify a query, move alpha, check the labels shown, save a screenshot."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from app import main as m

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run"]

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is absent (apt install chromium)")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from app.bench import free_port
    from labkit.clip.model import save_local_dir
    from labkit.clip.pretrain import new_toy_clip

    torch.manual_seed(0)
    clip = new_toy_clip(device="cpu")
    model = "local-dir:" + str(save_local_dir(clip.model, clip.config, tmp_path_factory.mktemp("toy_clip")))
    demo = m.build_demo(model)
    _, url, _ = m.serve(demo, "127.0.0.1", free_port(), block=False)
    yield model, url
    demo.close()


def _images(d: Path) -> dict[str, list[str]]:
    out = {}
    for name, color in (("red", (220, 30, 30)), ("blue", (30, 40, 220))):
        out[name] = []
        for i in range(3):
            img = Image.new("RGB", (96, 96), (110 + 30 * i,) * 3)
            img.paste(color, (12 + 8 * i, 16, 70 + 8 * i, 80))
            out[name].append(str(d / f"{name}_{i}.png"))
            img.save(out[name][-1])
    return out


def _set_number(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def test_upload_build_classify_in_chromium(served, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    model, url = served
    imgs = _images(tmp_path)
    query = imgs["red"][1]
    names, files = ["red", "blue"] + [""] * 4, [imgs["red"], imgs["blue"]] + [None] * 4
    session = m.build_session(model, m.SOURCES[1], "", 2, names, files)

    def expected(alpha, beta) -> str:
        probs = m.classify_batch([session], [query], [alpha], [beta])[0][0]
        return max(probs, key=probs.get)

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1800})
        page.set_default_timeout(30_000)
        try:
            page.goto(url, wait_until="domcontentloaded")
            page.locator("#build-btn").wait_for()
            page.get_by_label("My images").check()
            page.get_by_text("My images: a name and a few images per class").click()
            for i, name in enumerate(("red", "blue")):
                page.locator(f"#class-name-{i} textarea, #class-name-{i} input").first.fill(name)
                page.locator(f"#class-files-{i} input[type=file]").set_input_files(imgs[name])
                for path in imgs[name]:
                    page.locator(f"#class-files-{i}").get_by_text(Path(path).stem).first.wait_for()
            _set_number(page, "shots", 2)
            page.locator("#build-btn").click()
            sync_api.expect(page.locator("#status")).to_contain_text("Cache built: 2 classes × 2 shots")
            page.locator("#query-file input[type=file]").set_input_files(query)
            page.locator("#query-file").get_by_text(Path(query).stem).first.wait_for()
            page.locator("#classify-btn").click()
            want = expected(1.0, 1.0)
            sync_api.expect(page.locator("#result")).to_contain_text(f"Prediction: {want}")
            sync_api.expect(page.locator("#fused-label")).to_contain_text(want)
            # alpha up: the cache dominates, and the page follows without another click
            _set_number(page, "alpha", 50)
            want = expected(50.0, 1.0)
            sync_api.expect(page.locator("#result")).to_contain_text(f"Prediction: {want} (alpha=50")
            sync_api.expect(page.locator("#fused-label")).to_contain_text(want)
            assert want in ("red", "blue")
            page.locator("#nearest").get_by_text("affinity").first.wait_for()
        finally:
            page.screenshot(path=str(ARTIFACTS / "app_browser.png"), full_page=True)
            browser.close()
    assert (ARTIFACTS / "app_browser.png").stat().st_size > 10_000
