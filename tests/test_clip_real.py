"""A real open_clip tag through the lab on stand-in weights: random-init ViT-B-32 under the repository and file
name of ``laion2b_s34b_b79k`` in a Hugging Face cache laid out as the hub client writes it. ``load_clip``, its
224 px preprocessing, a Tip-Adapter cache, masking installed into the tower, and the web demo's model list all
go through the same code a real download would."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from standin_hub import write_openclip  # noqa: E402

NAME = "openclip:ViT-B-32/laion2b_s34b_b79k"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    import huggingface_hub.constants

    cache = tmp_path_factory.mktemp("hub")
    write_openclip(cache)
    mp = pytest.MonkeyPatch()
    mp.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    yield cache
    mp.undo()


@pytest.fixture(scope="module")
def clip(hub):
    from labkit.clip.model import load_clip

    return load_clip(NAME, device="cpu")


def test_load_clip_finds_the_cached_tag_and_preprocesses_at_224(clip):
    import numpy as np
    from PIL import Image

    assert clip.image_size == 224 and clip.embed_dim == 512
    photo = Image.fromarray((np.random.default_rng(0).random((300, 200, 3)) * 255).astype(np.uint8))
    assert tuple(clip.preprocess(photo).shape) == (3, 224, 224)
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)  # ToyWorld's size: resized on the way in
    features = clip.encode_image(images)
    assert features.shape == (2, 512) and torch.allclose(features.norm(dim=-1), torch.ones(2), atol=1e-4)


def test_tip_adapter_cache_and_masking_on_the_real_architecture(clip):
    from labkit.masking.masks import PatchMasking, install
    from labkit.tipadapter.cache import build_cache

    images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    cache = build_cache(clip, images, torch.tensor([0, 0, 1, 1]), ["circle", "square"], n_views=1)
    assert cache.keys.shape == (4, 512) and cache.values.shape == (4, 2)
    install(clip.model, "cluster", 0.5)
    assert isinstance(clip.model.visual.patch_dropout, PatchMasking)
    install(clip.model, "none", 0.0)


def test_the_web_demo_offers_the_cached_tag_and_classifies_with_it(hub, tmp_path):
    from PIL import Image

    from app import tipadapter_tab as tab

    assert NAME in tab.available_models()
    paths = {}
    for name, color in (("red", (220, 30, 30)), ("blue", (30, 40, 220))):
        paths[name] = str(tmp_path / f"{name}.png")
        Image.new("RGB", (300, 240), color).save(paths[name])
    names, files = ["red", "blue"] + [""] * 4, [[paths["red"]], [paths["blue"]]] + [None] * 4
    session = tab.on_build(None, NAME, tab.SOURCES[1], "", 1, *names, *files)[0]
    assert session["cache"].keys.shape == (2, 512) and session["model"] == NAME
    out = tab.classify_batch([session], [paths["red"]], [1.0], [1.0])
    assert out[-2][0].startswith("Prediction") and set(out[0][0]) == {"red", "blue"}


def test_eval_tip_runs_on_the_cached_tag(hub):
    from labkit.tipadapter.commands import eval_tip

    result = eval_tip(model=NAME, tasks="shape", shots="1,2", progress=False)  # fast mode: a small run
    shape = result["results"]["shape"]
    assert set(shape["tip_adapter"]) == {"1", "2"} and 0.0 <= shape["zero_shot"] <= 1.0


def test_masking_bench_runs_on_the_cached_tag(hub):
    from labkit.masking.bench import bench_masking

    out = bench_masking(models=(NAME,), ratios=(0.0, 0.5), vit_batch=2, warmup=0, repeats=2)
    (model,) = out["models"]
    assert model["image_size"] == 224 and {(r["strategy"], r["ratio"]) for r in model["rows"]} >= {
        ("random", 0.5), ("cluster", 0.5)}


def test_notebook_05_runs_on_the_cached_tag(hub, monkeypatch):
    """Notebook 05 with LABKIT_MODEL naming the cached ViT-B-32 (fast mode, as CI runs notebooks): the kernel finds
    the stand-in weights in the same Hugging Face cache and runs every section on the 224 px tower."""
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("LABKIT_MODEL", NAME)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("LABKIT_FAST", "1")
    monkeypatch.delenv("MPLBACKEND", raising=False)
    notebook = Path(__file__).parents[1] / "notebooks" / "05_tip_adapter.ipynb"
    nb = nbformat.read(notebook, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(notebook.parent)}}).execute()
    first = next(c for c in nb.cells if c.cell_type == "code" and "LABKIT_MODEL" in c.source)
    assert "ViT-B-32" in "".join(o.get("text", "") for o in first.outputs)
    cache_cell = next(c for c in nb.cells if c.cell_type == "code" and "prepare_task(clip, \"shape\"" in c.source)
    assert "512)" in "".join(o.get("text", "") for o in cache_cell.outputs)  # ViT-B-32's 512-d view features
    figures = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert figures >= 5
