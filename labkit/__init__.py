"""VLM Efficiency Lab: five efficiency methods for vision-language models, small, real and runnable on a laptop.

The public API, importable as ``from labkit import ...``::

    clip = load_clip("toy")                      # or "openclip:ViT-B-32/laion2b_s34b_b79k", "local-dir:<path>"
    world = ToyWorld("test", seed=0, size=100)   # a procedural image-caption world with exact ground truth
    print(evaluate_clip(clip, n=200))            # zero-shot accuracy and retrieval R@1

The methods live in one package each, with the same file roles (see ``METHODS``):
``labkit.masking`` (FLIP, Cluster Masking), ``labkit.blip2`` (the Q-Former), ``labkit.efficientvlm``
(distil, then prune with L0 gates) and ``labkit.tipadapter`` (training-free few-shot adaptation).
They are built on ``labkit.core`` (device, transformer blocks, the training loop, checkpoints, shipped
assets, plotting), ``labkit.data`` (ToyWorld, its tokenizer) and ``labkit.clip`` (the toy CLIP every
method shares).
"""

from labkit.clip.eval import evaluate_clip, zero_shot_classifier
from labkit.clip.model import ClipModel, load_clip
from labkit.clip.pretrain import train_toy_clip
from labkit.core.checkpoint import ModelError
from labkit.core.device import autocast, get_device, seed_everything, synchronize
from labkit.core.train import TrainConfig, fast_mode, fit
from labkit.data.toyworld import TaskDataset, ToyWorld

METHODS = ("masking", "blip2", "efficientvlm", "tipadapter")  # one package each, in the order the lab teaches them
__all__ = ["METHODS", "ClipModel", "ModelError", "TaskDataset", "ToyWorld", "TrainConfig", "autocast", "evaluate_clip",
           "fast_mode", "fit", "get_device", "load_clip", "seed_everything", "synchronize", "train_toy_clip",
           "zero_shot_classifier"]
