"""The real BLIP-2 path on stand-in weights: a tiny random-init BLIP-2 in a Hugging Face cache laid out as
the hub client writes it (``tests/standin_hub.py``). Query attention maps, a caption and an answer come out
of the same code a real ``Salesforce/blip2-*`` runs through; bad input gets a clear error."""

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from standin_hub import write_blip2  # noqa: E402

from labkit.blip2 import hf  # noqa: E402
from labkit.core.checkpoint import ModelError  # noqa: E402

MODEL = "Salesforce/blip2-opt-2.7b"
PHOTO = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    return tmp_path, write_blip2(tmp_path, MODEL)


def test_query_attention_loads_only_the_vision_tower_and_qformer(hub, monkeypatch):
    read = []
    original = hf._load_tensors
    monkeypatch.setattr(hf, "_load_tensors", lambda *a, **k: read.append(a[1]) or original(*a, **k))
    maps, grid = hf.real_query_attention(MODEL, PHOTO, device="cpu")
    assert read == [("vision_model.", "qformer.", "query_tokens")]  # the language model is never read
    assert maps.shape == (4, grid, grid) and grid == 4  # 4 queries over the 4 x 4 patches of 32 px / 8 px
    np.testing.assert_allclose(maps.sum(dim=(1, 2)).numpy(), 1.0, atol=0.1)  # softmax rows minus the CLS share


def test_caption_and_answer_with_generate(hub):
    out = hf.real_caption_and_answer(MODEL, PHOTO, "what is in the picture?", device="cpu", max_new_tokens=3)
    assert set(out) == {"model", "caption", "question", "answer"} and isinstance(out["answer"], str)
    with pytest.raises(ValueError, match="question is empty"):
        hf.real_caption_and_answer(MODEL, PHOTO, "   ", device="cpu")


def test_uncached_id_missing_file_and_too_little_memory_are_clear_errors(hub, monkeypatch):
    with pytest.raises(ModelError, match="Salesforce/blip2-flan-t5-xl: its config is not in the Hugging Face cache"):
        hf.real_query_attention("Salesforce/blip2-flan-t5-xl", PHOTO, device="cpu")
    monkeypatch.setattr(hf, "_available_memory", lambda: 1024)
    with pytest.raises(ModelError, match="needs about .* GiB .* has 0.0 GiB available"):
        hf.real_query_attention(MODEL, PHOTO, device="cpu")
    monkeypatch.undo()
    _, snapshot = hub
    (snapshot / "model.safetensors").unlink()
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub[0]))
    with pytest.raises(ModelError, match="model.safetensors .* is not in the Hugging Face cache"):
        hf.real_query_attention(MODEL, PHOTO, device="cpu")
    shutil.rmtree(hub[0])


def test_notebook_03_draws_a_real_blip2s_query_attention_from_the_cache(hub, monkeypatch):
    """Notebook 03, section 8, with the stand-in BLIP-2 named by LABKIT_BLIP2 (fast mode, as CI runs notebooks)."""
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("LABKIT_BLIP2", MODEL)
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend turns plt.show() into an image
    monkeypatch.setenv("LABKIT_FAST", "1")
    notebook = Path(__file__).parents[1] / "notebooks" / "03_blip2_qformer.ipynb"
    nb = nbformat.read(notebook, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(notebook.parent)}}).execute()
    real = next(c for c in nb.cells if c.cell_type == "code" and "real_query_attention" in c.source)
    kinds = [o.get("output_type") for o in real.outputs]
    text = "".join(o.get("text", "") for o in real.outputs)
    assert any("image/png" in o.get("data", {}) for o in real.outputs), (kinds, text)
    assert "'caption'" in text and "'answer'" in text and "skipped" not in text
