"""Launched by test_core_train.py under torchrun: a few DDP steps of every trainer family (the toy CLIP, the
EfficientVLM teacher, BLIP-2's text LM and stage 1), then each rank saves its trained parameters."""

import sys

import torch
from safetensors.torch import save_file

from labkit.blip2.data import FrozenPatchEncoder
from labkit.blip2.train import train_stage1, train_text_lm
from labkit.clip.pretrain import train_toy_clip
from labkit.efficientvlm.train import train_teacher

out = sys.argv[1]
clip, record = train_toy_clip(steps=3, batch_size=8, progress=False, eval_n=0)
teacher, _ = train_teacher(clip, 2, batch_size=8, progress=False, vision_layers=4, text_layers=2, fusion_layers=2)
lm, _ = train_text_lm("opt", steps=2, batch_size=4, progress=False)
stage1, _ = train_stage1(FrozenPatchEncoder(clip), clip, steps=2, batch_size=4, progress=False)
# parameters only: BatchNorm running stats are per-rank until DDP broadcasts rank 0's at the next forward
state = {f"{family}.{k}": v.detach().contiguous() for family, model in
         (("clip", clip.model), ("teacher", teacher), ("text_lm", lm), ("stage1", stage1))
         for k, v in model.named_parameters()}
save_file(state, f"{out}/rank{record['rank']}_of_{record['world_size']}.safetensors")
torch.distributed.barrier()
