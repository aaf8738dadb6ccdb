import copy
import json
import time

import open_clip
import pytest
import torch
from PIL import Image

from labkit.clip.eval import evaluate_clip
from labkit.clip.model import ModelError, load_clip, save_local_dir
from labkit.clip.pretrain import new_toy_clip, toy_clip_config
from labkit.core.checkpoint import OPEN_CLIP
from labkit.data import toyworld as tw


@pytest.fixture(scope="module")
def toy():
    return load_clip("toy", device="cpu")


def test_toy_clip_interface(toy):
    images = tw.TaskDataset("shape", "test", 0, 5).tensors()[0]
    feats = toy.encode_image(images)
    assert feats.shape == (5, toy.embed_dim) and torch.allclose(feats.norm(dim=-1), torch.ones(5), atol=1e-5)
    text = toy.encode_text(["a red circle", "a blue star"])
    assert text.shape == (2, toy.embed_dim)
    assert toy.tokenize("a red circle").shape == (1, 32)
    array = tw.ToyWorld("test", 0, 1).scene(0).render()
    x = toy.preprocess(Image.fromarray(array))
    assert x.shape == (3, 64, 64)  # PIL path and uint8 tensor path give the same features
    uint8 = torch.from_numpy(array.copy()).permute(2, 0, 1)[None]
    torch.testing.assert_close(toy.encode_image(x[None]), toy.encode_image(uint8), atol=1e-4, rtol=0)
    assert toy.device.type == "cpu"


def test_uint8_images_of_other_sizes_are_resized(toy):
    big = torch.from_numpy(tw.ToyWorld("test", 0, 1, image_size=128).scene(0).render()).permute(2, 0, 1)[None]
    assert toy.encode_image(big).shape == (1, toy.embed_dim)
    with pytest.raises(ValueError, match="64x64"):
        toy.encode_image(torch.zeros(1, 3, 100, 100))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        toy.encode_image(torch.zeros(3, 64, 64))


def test_shipped_checkpoint_meets_its_targets_on_held_out_scenes(toy):
    metrics = evaluate_clip(toy, n=300)
    assert metrics["zero_shot_shape_acc"] >= 0.93
    assert metrics["zero_shot_color_acc"] >= 0.97
    assert metrics["retrieval_i2t_r1"] >= 0.85 and metrics["retrieval_t2i_r1"] >= 0.85
    assert toy.metadata["command"].startswith("labkit train clip")


def test_unknown_model_name_lists_accepted_forms():
    with pytest.raises(ModelError, match="accepted: 'toy', 'local-dir:<path>' or 'openclip:"):
        load_clip("resnet-50")


def test_uncached_openclip_weights_fail_fast_offline():
    start = time.perf_counter()
    with pytest.raises(ModelError, match="not cached") as err:
        load_clip("openclip:ViT-B-32/laion2b_s34b_b79k")
    assert time.perf_counter() - start < 5
    assert "labkit fetch openclip:ViT-B-32/laion2b_s34b_b79k" in str(err.value)  # the one command that downloads
    with pytest.raises(ModelError, match="no pretrained tag"):
        load_clip("openclip:ViT-B-32/no_such_tag")
    with pytest.raises(ModelError, match="unknown open_clip architecture"):
        load_clip("openclip:ViT-Q-99/openai")


def test_local_dir_round_trip_and_corrupt_or_mismatched_files(tmp_path):
    torch.manual_seed(0)
    clip = new_toy_clip(device="cpu")
    save_local_dir(clip.model, clip.config, tmp_path / "ok")
    loaded = load_clip(f"local-dir:{tmp_path / 'ok'}", device="cpu")
    images = tw.TaskDataset("color", "test", 0, 4).tensors()[0]
    torch.testing.assert_close(loaded.encode_image(images), clip.encode_image(images))

    corrupt = tmp_path / "corrupt"
    save_local_dir(clip.model, clip.config, corrupt)
    (corrupt / OPEN_CLIP.weights).write_bytes(b"garbage")
    with pytest.raises(ModelError, match="corrupt weights"):
        load_clip(f"local-dir:{corrupt}")

    mismatched = tmp_path / "mismatched"
    save_local_dir(clip.model, clip.config, mismatched)
    config = json.loads((mismatched / OPEN_CLIP.config).read_text())
    config["model_cfg"]["vision_cfg"]["width"] = 64
    (mismatched / OPEN_CLIP.config).write_text(json.dumps(config))
    with pytest.raises(ModelError, match="do not match"):
        load_clip(f"local-dir:{mismatched}")
    with pytest.raises(ModelError, match="needs open_clip_config.json"):
        load_clip(f"local-dir:{tmp_path / 'missing'}")


def test_image_size_the_vit_cannot_take_is_rejected():
    config = copy.deepcopy(toy_clip_config())
    config["model_cfg"]["vision_cfg"]["image_size"] = 60
    with pytest.raises(ModelError, match="not divisible by patch_size"):
        new_toy_clip(config)


def test_stock_local_dir_loads_with_plain_open_clip_too(tmp_path):
    config = {"model_cfg": {"embed_dim": 32, "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1,
                                                            "head_width": 16},
                            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2,
                                         "layers": 1}},
              "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}}
    torch.manual_seed(0)
    model = open_clip.CLIP(**config["model_cfg"])
    save_local_dir(model, config, tmp_path)
    ours = load_clip(f"local-dir:{tmp_path}", device="cpu")
    theirs, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path}")
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(ours.encode_image(x, normalize=False), theirs.eval().encode_image(x))
    tokens = open_clip.get_tokenizer(f"local-dir:{tmp_path}")(["a photo"])
    torch.testing.assert_close(ours.tokenize(["a photo"]), tokens)
