"""The one checkpoint format: round trips, errors that say what to do, and every shipped checkpoint giving
the outputs it gave before it was converted to this format (``tests/data/shipped_outputs.safetensors``
holds those outputs, computed on fixed inputs with the previous format's loaders; a checkpoint retrained since,
the EfficientVLM pruned model with the official pruning rules, has its entry recomputed from the new checkpoint)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from labkit.blip2.data import load_encoder, qa_text, question_prefixes, tokenizer
from labkit.blip2.lm import TextBatch
from labkit.blip2.train import checkpoint_dir, load_stage1, load_stage2, load_text_lm
from labkit.clip.model import load_clip
from labkit.core.assets import SHIPPED, asset_dir
from labkit.core.checkpoint import OPEN_CLIP, ModelError, load_checkpoint, read_metadata, save_checkpoint
from labkit.efficientvlm.model import load_efficient

REFERENCE = load_file(str(Path(__file__).parent / "data" / "shipped_outputs.safetensors"))
CAPTIONS = ["a red circle", "a blue square and a green star", "a small yellow triangle", "a purple diamond at the top"]


@pytest.fixture(scope="module")
def outputs():
    """The same calls that produced the reference, with today's loaders."""
    images = REFERENCE["images"]
    out = {}
    clip = load_clip("toy", device="cpu")
    out["toy_clip.image"] = clip.encode_image(images)
    with torch.no_grad():
        feats = load_encoder(clip)(images)
        out["blip2/stage1.image_embeddings"] = load_stage1().image_embeddings(feats)
        questions = ["what colour is the circle?"] * 4
        ids, mask = question_prefixes(questions)
        tok = tokenizer()
        pairs = [qa_text(tok, q, "red") for q in questions]
        text = TextBatch.from_lists([p for p, _ in pairs], [s for _, s in pairs])
        for kind in ("opt", "t5"):
            lm = load_text_lm(checkpoint_dir(f"lm_{kind}"))
            out[f"blip2/lm_{kind}.input_embeddings"] = lm.get_input_embeddings()(ids)
            stage2 = load_stage2(checkpoint_dir(f"stage2_{kind}"), lm)
            out[f"blip2/stage2_{kind}.prompts"] = stage2.prompts(feats, ids, mask)
            out[f"blip2/stage2_{kind}.loss"] = stage2(feats, text).reshape(1)
    return out, clip


@pytest.mark.parametrize("key", [k for k in REFERENCE if k not in ("images", "toy_clip.text") and "efficientvlm" not in k])
def test_converted_checkpoint_gives_its_previous_outputs(outputs, key):
    torch.testing.assert_close(outputs[0][key].float(), REFERENCE[key], rtol=0, atol=1e-6)


@pytest.mark.parametrize("which", ["teacher", "student", "pruned"])
def test_converted_efficientvlm_gives_its_previous_match_scores(outputs, which):
    clip = outputs[1]
    world_captions = clip.tokenize(_reference_captions())
    scores = load_efficient(which).match_scores(clip.prepare(REFERENCE["images"]), world_captions)
    torch.testing.assert_close(scores, REFERENCE[f"efficientvlm/{which}.match_scores"], rtol=0, atol=1e-6)


def _reference_captions() -> list[str]:
    from labkit.data import toyworld as tw

    world = tw.ToyWorld("test", 0, 4)
    return [world.scene(i).caption() for i in range(4)]


def test_toy_clip_text_side_gives_its_previous_outputs(outputs):
    torch.testing.assert_close(outputs[1].encode_text(_reference_captions()), REFERENCE["toy_clip.text"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_every_shipped_checkpoint_records_the_command_that_made_it(name):
    layout = OPEN_CLIP if name == "toy_clip" else None
    metadata = read_metadata(asset_dir(name), *([layout] if layout else []))
    assert metadata["command"].startswith("labkit train ")
    assert "/tmp" not in metadata["command"] and "--assets" not in metadata["command"]


def test_round_trip_keeps_values_dtype_conversion_and_ties(tmp_path):
    shared = torch.randn(4, 3)
    state = {"a": shared, "b": shared, "c": torch.arange(5)}
    save_checkpoint(tmp_path / "ck", state, {"width": 3}, {"command": "labkit train x"}, dtype=torch.float16)
    loaded, config, metadata = load_checkpoint(tmp_path / "ck")
    assert config == {"width": 3} and metadata == {"command": "labkit train x"}
    assert loaded["a"].dtype == torch.float32 and loaded["c"].dtype == torch.int64
    torch.testing.assert_close(loaded["a"], shared.half().float())
    assert loaded["b"] is loaded["a"]  # stored once, restored as one tensor
    header_len = int.from_bytes((tmp_path / "ck" / "model.safetensors").read_bytes()[:8], "little")
    header = json.loads((tmp_path / "ck" / "model.safetensors").read_bytes()[8:8 + header_len])
    assert set(header) - {"__metadata__"} == {"a", "c"}


def test_save_refuses_metadata_without_its_command(tmp_path):
    with pytest.raises(ValueError, match="command"):
        save_checkpoint(tmp_path / "ck", {"a": torch.zeros(1)}, {}, {"steps": 3})
    assert not (tmp_path / "ck" / "model.safetensors").exists()


def test_load_errors_name_the_folder_and_what_to_do(tmp_path):
    with pytest.raises(ModelError, match="needs config.json and model.safetensors; train one"):
        load_checkpoint(tmp_path, how_to_make="train one with `labkit train ...`")
    save_checkpoint(tmp_path / "ck", {"a": torch.zeros(2)}, {}, {"command": "x"})
    (tmp_path / "ck" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelError, match="corrupt weights file"):
        load_checkpoint(tmp_path / "ck")
    (tmp_path / "ck" / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="corrupt checkpoint file"):
        load_checkpoint(tmp_path / "ck")


def test_unknown_shipped_name_is_rejected():
    with pytest.raises(ModelError, match="no shipped checkpoint 'blip2/stage3'"):
        asset_dir("blip2/stage3")
