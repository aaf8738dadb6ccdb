"""Every path that runs under bf16 autocast on CUDA, run for a few steps under CPU bf16 autocast: the same
dtype rules apply, so a mismatch (a bf16 tensor meeting a float32 one where an op needs one dtype) shows up
here without a GPU."""

import pytest
import torch

from labkit.blip2.data import FrozenPatchEncoder
from labkit.blip2.train import new_text_lm, train_stage1, train_stage2, train_text_lm
from labkit.clip.eval import zero_shot_classifier
from labkit.clip.pretrain import new_toy_clip, train_toy_clip
from labkit.efficientvlm.distill import make_student, train_student
from labkit.efficientvlm.model import ToyVLM, VLMConfig
from labkit.efficientvlm.prune import prune_student
from labkit.efficientvlm.train import train_teacher
from labkit.masking.masks import masking_hook
from labkit.tipadapter.cache import build_cache, finetune_keys, search_alpha_beta, tip_logits
from labkit.tipadapter.eval import task_data


@pytest.fixture
def bf16():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        yield


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return new_toy_clip(device="cpu")


@pytest.mark.parametrize("strategy", ["none", "random", "cluster"])
def test_toy_clip_training_with_masking(bf16, strategy):
    _, record = train_toy_clip(steps=2, batch_size=8, eval_n=8, progress=False,
                               vision_hook=masking_hook(strategy, 0.5))
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in record["history"])


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_blip2_text_lm_stage1_and_stage2(bf16, clip, kind):
    encoder = FrozenPatchEncoder(clip)
    train_text_lm(kind, steps=2, batch_size=4, progress=False)
    stage1, info1 = train_stage1(encoder, clip, steps=2, batch_size=4, progress=False)
    _, info2 = train_stage2(encoder, new_text_lm(kind), stage1, steps=2, batch_size=4, eval_n=4, progress=False,
                            text_conditioned=True)
    assert 0.0 <= info1["itc_i2t_r1"] <= 1.0 and 0.0 <= info2["vqa_accuracy"] <= 1.0


def test_efficientvlm_teacher_distillation_pruning_and_finalize(bf16, clip):
    cfg = VLMConfig(vision_layers=4, text_layers=2, fusion_layers=2)
    teacher, _ = train_teacher(clip, 2, batch_size=8, progress=False, **{k: getattr(cfg, k) for k in
                                                                          ("vision_layers", "text_layers", "fusion_layers")})
    student, _ = train_student(teacher, clip, 2, batch_size=8, progress=False)
    pruned, record = prune_student(student, teacher, clip, 0.3, 2, batch_size=8, progress=False, recover_steps=1)
    assert isinstance(pruned, ToyVLM) and set(record["sparsity_by_modality"]) == {"vision", "text", "fusion"}
    assert make_student(teacher).cfg.vision_layers == 2


def test_tipadapter_cache_search_and_finetuning(bf16, clip):
    images, labels, classnames, templates = task_data("shape", "support", 24)
    cache = build_cache(clip, images, labels, classnames, n_views=2)
    assert cache.keys.dtype == torch.float32
    W = zero_shot_classifier(clip, classnames, templates)
    val_images, val_labels, _, _ = task_data("shape", "val", 24)
    val = clip.encode_image(val_images)
    best = search_alpha_beta(val, val_labels.to(val.device), W, cache.keys, cache.values)
    keys, _ = finetune_keys(cache, cache.keys[None], cache.labels, W, val, val_labels, 1.0, best["beta"], epochs=2)
    assert torch.isfinite(tip_logits(val, W, keys, cache.values, best["alpha"] or 1.0, best["beta"])).all()
