"""The toy CLIP's config and its contrastive pretraining on ToyWorld.

Pretraining follows what was measured to work on a 2-core CPU (docs/design.md): a conv-stem ViT,
half of each batch in hard-negative groups (scenes that differ only in their shapes),
attribute words dropped from captions with p=0.2, AdamW lr 1e-3, wd 0.1, betas (0.9, 0.98),
4% warm-up then cosine. The loss is open_clip's ``ClipLoss`` (symmetric InfoNCE, gathered
across DDP ranks). ``vision_hook`` lets a method change the vision tower first (masking does).
"""

from __future__ import annotations

import copy
import json
from importlib import resources
from typing import Callable

import numpy as np
import open_clip
import torch
from torch import nn

from labkit.clip.eval import evaluate_clip
from labkit.clip.model import ClipModel, build_clip
from labkit.core.train import TrainConfig, distributed_context, fit
from labkit.data import toyworld as tw
from labkit.data.tokenizer import WordTokenizer, toyworld_vocabulary

TRAIN_INDEX_SPACE = 10**12  # pretraining never repeats a scene


def toy_clip_config() -> dict:
    """The toy CLIP's ``open_clip_config.json`` (from ``labkit/configs/toy_clip.json`` plus the vocabulary)."""
    config = json.loads((resources.files("labkit.clip") / "configs" / "toy_clip.json").read_text())
    vocab = toyworld_vocabulary()
    config["labkit"]["tokenizer"]["vocab"] = vocab
    config["model_cfg"]["text_cfg"]["vocab_size"] = len(vocab) + 4  # + <pad> <sot> <unk> <eot>
    return config


def new_toy_clip(config: dict | None = None, device=None) -> ClipModel:
    """A randomly initialised toy CLIP wrapped as a :class:`ClipModel`."""
    config = copy.deepcopy(config or toy_clip_config())
    model = build_clip(config)
    tokenizer = WordTokenizer(config["labkit"]["tokenizer"]["vocab"], config["model_cfg"]["text_cfg"]["context_length"])
    pre = config["preprocess_cfg"]
    return ClipModel("toy", model, tokenizer, config["model_cfg"]["vision_cfg"]["image_size"], pre["mean"], pre["std"],
                     device, config)


class PretrainBatches:
    """``make_batch(step, rank, world)`` for CLIP pretraining: random scenes plus hard-negative groups.

    ``vary``: what the scenes of a group differ in, cycled over the groups (``("shape",)`` for CLIP;
    BLIP-2's stage 1 adds ``"color"`` so that ITC and ITM also need each object's colour).
    """

    def __init__(self, clip: ClipModel, batch_size: int = 128, hard_fraction: float = 0.5, group_size: int = 4,
                 caption_drop: float = 0.2, seed: int = 0, vary: tuple[str, ...] = ("shape",)):
        if batch_size < 2:
            raise ValueError(f"batch_size must be at least 2, got {batch_size}")
        if not vary:
            raise ValueError("vary must name at least one attribute ('shape' and/or 'color')")
        for attribute in vary:
            tw.check_varied_attribute(attribute)
        self.clip, self.batch_size, self.group_size, self.vary = clip, batch_size, group_size, tuple(vary)
        self.n_groups = int(batch_size * hard_fraction) // group_size
        self.world = tw.ToyWorld("train", seed, TRAIN_INDEX_SPACE, caption_drop=caption_drop)

    def scenes(self, step: int, rank: int = 0, world: int = 1) -> tuple[list[tw.Scene], list[str]]:
        w = self.world
        base = (step * world + rank) * self.batch_size
        n_random = self.batch_size - self.n_groups * self.group_size
        scenes = [w.scene(base + i) for i in range(n_random)]
        captions = [w.caption(base + i, s) for i, s in enumerate(scenes)]
        for g in range(self.n_groups):
            index = base + n_random + g
            for j, scene in enumerate(w.hard_negative_group(index, self.group_size, self.vary[g % len(self.vary)])):
                scenes.append(scene)
                captions.append(scene.caption(w.rng(index, 3 + j), w.caption_drop))
        return scenes, captions

    def __call__(self, step: int, rank: int = 0, world: int = 1):
        scenes, captions = self.scenes(step, rank, world)
        images = torch.from_numpy(np.stack([s.render(self.world.image_size) for s in scenes])).permute(0, 3, 1, 2)
        return (self.clip.prepare(images), self.clip.tokenize(captions).to(self.clip.device)), len(scenes)


def contrastive_loss_fn():
    """``loss_fn(model, (images, tokens))`` with open_clip's ClipLoss, gathering features across ranks."""
    rank, world = distributed_context()
    criterion = open_clip.ClipLoss(rank=rank, world_size=world)

    def loss_fn(model, batch):
        images, tokens = batch
        image_features, text_features, logit_scale = model(images, tokens)
        loss = criterion(image_features, text_features, logit_scale)
        return loss, {"temperature": 1.0 / logit_scale.item()}

    return loss_fn


def train_toy_clip(steps: int, batch_size: int = 128, out_dir: str | None = None, seed: int = 0, lr: float = 1e-3,
                   eval_every: int = 0, eval_n: int = 500, time_budget_s: float | None = None,
                   clip: ClipModel | None = None, progress: bool = True,
                   vision_hook: Callable[[nn.Module], object] | None = None) -> tuple[ClipModel, dict]:
    """Pretrain a toy CLIP from scratch on ToyWorld; returns the model and the training record.

    ``vision_hook(model)``, when given, is called on the open_clip model before training: it may change
    the vision tower, e.g. :func:`labkit.masking.masks.install` a patch-masking strategy (FLIP, Cluster
    Masking) for training; evaluation always sees every patch.
    """
    torch.manual_seed(seed)
    clip = clip or new_toy_clip()
    if vision_hook is not None:
        vision_hook(clip.model)
    cfg = TrainConfig(steps=steps, lr=lr, seed=seed, eval_every=eval_every, out_dir=out_dir,
                      time_budget_s=time_budget_s, desc="toy CLIP", checkpoint_every=max(1, steps // 10))
    record = fit(clip.model, contrastive_loss_fn(), PretrainBatches(clip, batch_size, seed=seed), cfg,
                 evaluate=(lambda _: evaluate_clip(clip, eval_n, split="val")) if eval_n else None, device=clip.device,
                 progress=progress)
    return clip, record
