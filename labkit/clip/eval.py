"""Evaluating any CLIP of the lab on ToyWorld: zero-shot classification with a template-ensemble text
classifier (CLIP §3.1.4) and image-text retrieval R@1, on held-out scenes with exact ground truth.
"""

from __future__ import annotations

import numpy as np
import torch

from labkit.clip.model import ClipModel
from labkit.data import toyworld as tw


@torch.no_grad()
def zero_shot_classifier(clip: ClipModel, classnames, templates) -> torch.Tensor:
    """``W_c`` ``[C, D]``: per class, encode every template, normalise, average, renormalise (CLIP's ensembling)."""
    prompts = [t.format(c) for c in classnames for t in templates]
    feats = clip.encode_text(prompts).view(len(classnames), len(templates), -1)
    return torch.nn.functional.normalize(feats.mean(dim=1), dim=-1)


@torch.no_grad()
def zero_shot_eval(clip: ClipModel, task: str, split: str = "test", n: int = 1000, seed: int = 0) -> dict:
    """Zero-shot accuracy, predictions and labels of ``task`` on ``n`` held-out scenes."""
    data = tw.TaskDataset(task, split, seed, n)
    images, labels = data.tensors()
    classifier = zero_shot_classifier(clip, data.task.classnames, data.task.templates)
    pred = (clip.encode_image(images) @ classifier.T).argmax(dim=-1).cpu()
    return {"accuracy": float((pred == labels).float().mean()), "pred": pred, "labels": labels,
            "classnames": data.task.classnames}


@torch.no_grad()
def retrieval_eval(clip: ClipModel, split: str = "test", n: int = 1000, objects=(2, 3), seed: int = 0) -> dict:
    """Image->text and text->image recall@1 of ``n`` scenes against their canonical captions."""
    world = tw.ToyWorld(split, seed, n, objects=objects, canonical_captions=True)
    scenes = [world.scene(i) for i in range(n)]
    images = torch.from_numpy(np.stack([s.render() for s in scenes])).permute(0, 3, 1, 2)
    captions = [s.caption() for s in scenes]
    sim = clip.encode_image(images) @ clip.encode_text(captions).T
    target = torch.arange(n, device=sim.device)
    i2t = sim.argmax(dim=1)
    t2i = sim.argmax(dim=0)
    return {"i2t_r1": float((i2t == target).float().mean()), "t2i_r1": float((t2i == target).float().mean()),
            "similarity": sim.cpu(), "captions": captions, "images": images}


def evaluate_clip(clip: ClipModel, n: int = 1000, split: str = "test") -> dict:
    """The foundation's acceptance metrics on held-out scenes: ``split="val"`` during training, ``"test"`` to report."""
    retrieval = retrieval_eval(clip, split, n=n)
    return {
        "zero_shot_shape_acc": zero_shot_eval(clip, "shape", split, n=n)["accuracy"],
        "zero_shot_color_acc": zero_shot_eval(clip, "color", split, n=n)["accuracy"],
        "retrieval_i2t_r1": retrieval["i2t_r1"],
        "retrieval_t2i_r1": retrieval["t2i_r1"],
    }
