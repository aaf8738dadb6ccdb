"""End to end in headless Chromium (Debian's /usr/bin/chromium) through Playwright: every tab of the demo with one
happy path and one bad input, and the layout at 1400, 1024 and 390 px (no horizontal overflow), with screenshots
saved under ``test-artifacts/`` (CI keeps them)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from app import main as m
from app import tipadapter_tab as tab

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


@contextlib.contextmanager
def _page(url: str, width: int, height: int, timeout_ms: int, screenshot: str | None = None):
    """A headless Chromium page on ``url`` at the given viewport; on the way out (passed or failed) an optional
    full-page screenshot into ``ARTIFACTS`` and the browser closed."""
    sync_api = pytest.importorskip("playwright.sync_api")
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        page = browser.new_page(viewport={"width": width, "height": height})
        page.set_default_timeout(timeout_ms)
        try:
            page.goto(url, wait_until="domcontentloaded")
            yield page
        finally:
            if screenshot:
                page.screenshot(path=str(ARTIFACTS / screenshot), full_page=True)
            browser.close()


def test_tip_adapter_upload_build_classify_in_chromium(served, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    model, url = served
    imgs = _images(tmp_path)
    query = imgs["red"][1]
    names, files = ["red", "blue"] + [""] * 4, [imgs["red"], imgs["blue"]] + [None] * 4
    session = tab.build_session(model, tab.SOURCES[1], "", 2, names, files)

    def expected(log_alpha, beta) -> str:
        probs = tab.classify_batch([session], [query], [log_alpha], [beta])[0][0]
        return max(probs, key=probs.get)

    with _page(url, 1400, 1800, 30_000, "app_tipadapter_upload.png") as page:
        page.locator("#build-btn").wait_for()
        sync_api.expect(page.locator("#my-images")).to_be_hidden()
        page.get_by_label("My images").check()  # opens the upload panel
        sync_api.expect(page.locator("#my-images")).to_be_visible()
        for i, name in enumerate(("red", "blue")):
            page.locator(f"#class-name-{i} textarea, #class-name-{i} input").first.fill(name)
            page.locator(f"#class-files-{i} input[type=file]").set_input_files(imgs[name])
            for path in imgs[name]:
                page.locator(f"#class-files-{i}").get_by_text(Path(path).stem).first.wait_for()
        _set_number(page, "shots", 2)
        page.locator("#build-btn").click()
        sync_api.expect(page.locator("#status")).to_contain_text("Cache built: 2 classes × 2 shots")
        sync_api.expect(page.locator("#support-gallery")).to_contain_text("red #2")
        page.locator("#query-file input[type=file]").set_input_files(query)
        page.locator("#query-file").get_by_text(Path(query).stem).first.wait_for()
        sync_api.expect(page.locator("#query-preview img")).to_be_visible()
        page.locator("#classify-btn").click()
        want = expected(0.0, 1.0)
        sync_api.expect(page.locator("#result")).to_contain_text(f"Prediction: {want}")
        sync_api.expect(page.locator("#fused-label")).to_contain_text(want)
        # alpha up (log10 alpha = 2): the cache dominates, and the page follows without another click
        _set_number(page, "alpha", 2)
        want = expected(2.0, 1.0)
        sync_api.expect(page.locator("#result")).to_contain_text(f"Prediction: {want} (alpha=100")
        sync_api.expect(page.locator("#fused-label")).to_contain_text(want)
        assert want in ("red", "blue")
        page.locator("#nearest").get_by_text("affinity").first.wait_for()
        sync_api.expect(page.locator("#logits")).to_contain_text("α·cache")
        # bad input: a file that is not an image gets a message, and the stale result is cleared
        bad = tmp_path / "notes.png"
        bad.write_text("not an image")
        page.locator("#query-file").get_by_label("Clear").first.click()
        page.locator("#query-file input[type=file]").set_input_files(str(bad))
        page.locator("#query-file").get_by_text("notes").first.wait_for()
        page.locator("#classify-btn").click()
        sync_api.expect(page.locator("#result")).to_contain_text("not a readable image")
        sync_api.expect(page.locator("#logits")).not_to_contain_text("α·cache")


def _tab(page, name: str) -> None:
    """Open a tab; on a narrow screen Gradio lists the tabs that do not fit under "More tabs"."""
    tab = page.get_by_role("tab", name=name)
    if tab.count() and tab.first.is_visible():
        tab.first.click()
        return
    page.get_by_label("More tabs").click()
    page.locator(".overflow-dropdown button", has_text=name).click()


def _run_tab(page, name: str, button: str, result: str, text: str, figure: str) -> None:
    """One tab's happy path: open it, press its button, see ``text`` in ``result`` and the figure drawn; keep a
    screenshot."""
    from playwright.sync_api import expect

    _tab(page, name)
    page.locator(button).click()
    expect(page.locator(result)).to_contain_text(text)
    page.locator(f"{figure} img, {figure} canvas").first.wait_for()
    page.screenshot(path=str(ARTIFACTS / f"app_{name.lower().replace('-', '')}_1400.png"), full_page=True)


def test_every_tab_in_chromium(served):
    sync_api = pytest.importorskip("playwright.sync_api")
    _, url = served
    with _page(url, 1400, 1600, 60_000, "app_last.png") as page:
        # Tip-Adapter on its default built-in task: alpha and beta come from the validation search
        page.locator("#build-btn").click()
        sync_api.expect(page.locator("#status")).to_contain_text("validation search")
        sync_api.expect(page.locator("#val-accuracy")).to_contain_text("zero-shot CLIP")
        page.locator("#pick-btn").click()
        sync_api.expect(page.locator("#result")).to_contain_text("true class")
        page.screenshot(path=str(ARTIFACTS / "app_tipadapter_1400.png"), full_page=True)
        # masking: a happy path, then an upload choice without an upload
        _run_tab(page, "Masking", "#mask-btn", "#mask-info", "98 of 196 patches kept", "#mask-pair")
        page.locator("#mask-image input").fill("My image (upload)")
        page.locator("#mask-image input").press("Enter")
        page.locator("#mask-btn").click()
        sync_api.expect(page.locator("#mask-info")).to_contain_text("upload an image first")
        # BLIP-2: a question answered, then a word outside the vocabulary
        _run_tab(page, "BLIP-2", "#blip2-btn", "#blip2-answer", "true answer", "#blip2-attention")
        page.locator("#blip2-question textarea, #blip2-question input").first.fill("is it a banana?")
        page.locator("#blip2-btn").click()
        sync_api.expect(page.locator("#blip2-answer")).to_contain_text("does not know 'it', 'banana'")
        # EfficientVLM: three models side by side, then an empty caption of one's own
        _run_tab(page, "EfficientVLM", "#evlm-btn", "#evlm-table", "P(match)", "#evlm-gates")
        page.get_by_label("my caption", exact=True).first.check()
        page.locator("#evlm-btn").click()
        sync_api.expect(page.locator("#evlm-text")).to_contain_text("type a caption")


@pytest.mark.parametrize("width", [1400, 1024, 390])
def test_layout_fits_the_screen(served, width):
    """No tab overflows the window sideways (nothing clipped or hidden in a side scroll) at laptop, tablet and
    phone widths; a screenshot of every tab per width is kept."""
    sync_api = pytest.importorskip("playwright.sync_api")
    _, url = served
    with _page(url, width, 1200, 60_000) as page:
        page.locator("#build-btn").click()
        sync_api.expect(page.locator("#status")).to_contain_text("Cache built")
        page.locator("#pick-btn").click()
        sync_api.expect(page.locator("#result")).to_contain_text("true class")
        for name, button, done in (("Tip-Adapter", None, None), ("Masking", "#mask-btn", "#mask-info"),
                                   ("BLIP-2", "#blip2-btn", "#blip2-answer"),
                                   ("EfficientVLM", "#evlm-btn", "#evlm-table")):
            _tab(page, name)
            if button:
                page.locator(button).click()
                sync_api.expect(page.locator(done)).not_to_be_empty()
                page.wait_for_timeout(500)
            overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
            page.screenshot(path=str(ARTIFACTS / f"layout_{width}_{name.split()[0].lower()}.png"), full_page=True)
            assert overflow <= 1, f"{name} at {width} px is {overflow} px wider than the window"
