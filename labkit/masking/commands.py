"""``labkit bench masking``, ``labkit eval masking``, ``labkit train masked-clip`` and ``labkit make-dataset``
(``labkit openclip-train`` has its own parser: :mod:`labkit.masking.openclip_train`)."""

from __future__ import annotations

from labkit.clip.commands import train_clip
from labkit.core.command import Command, save_json
from labkit.masking.bench import bench_masking
from labkit.masking.masks import STRATEGIES, masking_hook
from labkit.masking.openclip_train import make_dataset
from labkit.masking.study import eval_masking


def bench_masking_command(models: str = "toy,ViT-B-32", toy_batch: int = 256, vit_batch: int = 32, warmup: int = 2,
                          repeats: int = 7, threads: int = 0, save: str | None = None) -> dict:
    """:func:`labkit.masking.bench.bench_masking` on comma-separated ``models``; also written to ``save``."""
    return save_json(bench_masking(models=tuple(models.split(",")), toy_batch=toy_batch, vit_batch=vit_batch,
                                    warmup=warmup, repeats=repeats, threads=threads), save)


def eval_masking_command(budget_s: float = 450.0, ratio: float = 0.5,
                         variants: str = "none,random,cluster,random:0.75,cluster:0.75", unmasked_tuning: float = 0.05,
                         batch_size: int = 128, seed: int = 0, threads: int = 0, save: str | None = None,
                         progress: bool = True) -> dict:
    """:func:`labkit.masking.study.eval_masking` on comma-separated ``variants``; also written to ``save``."""
    return save_json(eval_masking(budget_s=budget_s, ratio=ratio, variants=tuple(variants.split(",")),
                                   unmasked_tuning=unmasked_tuning, batch_size=batch_size, seed=seed, threads=threads,
                                   progress=progress), save)


def train_masked_clip(masking: str = "random", mask_ratio: float = 0.5, steps: int = 2800, batch_size: int = 128,
                      lr: float = 1e-3, seed: int = 0, out: str = "runs/masked_clip", work_dir: str = "runs/masked_clip_state",
                      progress: bool = True) -> dict:
    """The toy CLIP's recipe (``labkit train clip``) with FLIP random or Cluster Masking in its vision tower."""
    return train_clip(steps=steps, batch_size=batch_size, lr=lr, seed=seed, out=out, work_dir=work_dir,
                      vision_hook=masking_hook(masking, mask_ratio), progress=progress)


SAVE = {"help": "also write the JSON result to this file"}
THREADS = {"help": "CPU threads (0: torch default; 1 on a shared CPU)"}
COMMANDS = [
    Command("bench", "masking", bench_masking_command,
            "vision-tower step speedup of FLIP / cluster masking at ratios 0, 0.5, 0.75", {
                "models": {"help": "comma-separated: toy and/or open_clip architectures"}, "toy_batch": {},
                "vit_batch": {}, "warmup": {}, "repeats": {}, "threads": THREADS, "save": SAVE}),
    Command("eval", "masking", eval_masking_command,
            "toy CLIP trained with none/random/cluster masking, same wall-clock budget", {
                "budget_s": {"help": "training seconds per variant"},
                "ratio": {"help": "mask ratio of variants given without one"}, "variants": {},
                "unmasked_tuning": {"help": "share of a masked run's images seen unmasked at its end (FLIP; 0: none)"},
                "batch_size": {},
                "seed": {}, "threads": THREADS, "save": SAVE}),
    Command("train", "masked-clip", train_masked_clip, "pretrain the toy CLIP with FLIP or Cluster Masking", {
        "masking": {"choices": STRATEGIES}, "mask_ratio": {}, "steps": {}, "batch_size": {}, "lr": {}, "seed": {},
        "out": {"help": "local dir to write"}, "work_dir": {"help": "training state for resume"}}),
    Command(None, "make-dataset", make_dataset, "write ToyWorld scenes as PNG + CSV for open_clip_train", {
        "out": {"help": "folder to write"}, "n": {"help": "scenes"}, "split": {}, "seed": {}}, emits_json=False),
]
