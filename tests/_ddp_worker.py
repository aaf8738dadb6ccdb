"""Launched by test_core_train.py under torchrun: a few DDP steps of the toy CLIP, then each rank saves its weights."""

import sys

import torch
from safetensors.torch import save_file

from labkit.clip.pretrain import train_toy_clip

out = sys.argv[1]
clip, record = train_toy_clip(steps=3, batch_size=8, progress=False, eval_n=0)
# parameters only: BatchNorm running stats are per-rank until DDP broadcasts rank 0's at the next forward
state = {k: v.detach().contiguous() for k, v in clip.model.named_parameters()}
save_file(state, f"{out}/rank{record['rank']}_of_{record['world_size']}.safetensors")
torch.distributed.barrier()
