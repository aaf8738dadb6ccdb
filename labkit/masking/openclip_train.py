"""Scale-out: open_clip's own trainer (``open_clip_train.main``) with labkit's masking installed.

``open_clip_train`` builds its model with ``create_model_and_transforms``; this launcher wraps
that function so every model it builds gets :func:`labkit.masking.install` (FLIP random masking,
CVPR 2023, or Cluster Masking, CVPR 2024) in place of its ``patch_dropout``, then hands all other
arguments to ``open_clip_train.main.main`` unchanged. DDP, precision, data loading, logging and
checkpoints are open_clip_train's. It also registers ``labkit-ToyViT-8``, a small patchify CLIP
for 64 px ToyWorld images (BPE tokenizer, so open_clip's own text side works), for CPU tests.

Single process::

    labkit make-dataset --out data/toyworld --n 2000
    labkit openclip-train --masking cluster --mask-ratio 0.5 -- \
        --train-data data/toyworld/train.csv --csv-img-key filepath --csv-caption-key title \
        --model labkit-ToyViT-8 --batch-size 64 --epochs 1 --device cpu --workers 0 --logs runs/oc

Distributed (gloo on CPU, nccl on GPU)::

    torchrun --nproc_per_node 2 -m labkit.masking.openclip_train --masking random --mask-ratio 0.5 -- <same args>
"""

from __future__ import annotations

import argparse
import csv
import functools
import sys
from pathlib import Path

from labkit.data import toyworld as tw
from labkit.masking import masks as masking

TOY_ARCH = "labkit-ToyViT-8"
TOY_ARCH_CFG = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 128, "layers": 4, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 3},
}


def register_toy_arch() -> None:
    """Make ``labkit-ToyViT-8`` known to open_clip's model registry (idempotent)."""
    from open_clip import factory

    factory._MODEL_CONFIGS.setdefault(TOY_ARCH, dict(TOY_ARCH_CFG))


def make_dataset(out: str | Path, n: int = 2000, split: str = "train", seed: int = 0) -> dict:
    """Write ``n`` ToyWorld scenes as PNG files plus ``<split>.csv`` (tab-separated ``filepath``,
    ``title``), the CSV layout ``open_clip_train`` reads with ``--csv-img-key filepath
    --csv-caption-key title``."""
    from PIL import Image



    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    out = Path(out)
    images = out / split
    images.mkdir(parents=True, exist_ok=True)
    world = tw.ToyWorld(split, seed, n, caption_drop=0.2 if split == "train" else 0.0)
    csv_path = out / f"{split}.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(["filepath", "title"])
        for i in range(n):
            scene = world.scene(i)
            path = images / f"{i:07d}.png"
            Image.fromarray(scene.render()).save(path)
            writer.writerow([str(path.resolve()), world.caption(i, scene)])
    return {"csv": str(csv_path), "images": n, "split": split}


def _with_masking(create, strategy: str, ratio: float, options: dict):

    @functools.wraps(create)
    def wrapped(*args, **kwargs):
        model, *rest = create(*args, **kwargs)
        masking.install(model, strategy, ratio, **options)
        return (model, *rest)

    return wrapped


def _cpu_friendly_ddp():
    """open_clip_train passes ``device_ids=[device]`` to DDP, which torch rejects for CPU modules
    (gloo); this subclass drops CPU device ids and stays an ``isinstance`` of DDP."""
    import torch
    from torch.nn.parallel import DistributedDataParallel

    class CpuFriendlyDDP(DistributedDataParallel):
        def __init__(self, module, device_ids=None, **kwargs):
            if device_ids and all(torch.device(d).type == "cpu" for d in device_ids):
                device_ids = None
            super().__init__(module, device_ids=device_ids, **kwargs)

    return CpuFriendlyDDP


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="labkit openclip-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--masking", choices=("none", "random", "cluster"), default="random")
    p.add_argument("--mask-ratio", type=float, default=0.5)
    p.add_argument("--anchor-ratio", type=float, default=None, help="cluster masking only (default 0.03)")
    p.add_argument("--threshold", type=float, default=None, help="cluster masking only (default 0.68)")
    p.add_argument("--embed-weight", type=float, default=None, help="cluster masking only (default 0)")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="arguments for open_clip_train (after --)")
    return p


def run(masking_strategy: str, ratio: float, train_args: list[str], **options) -> None:
    """Install the masking hook and run ``open_clip_train.main.main(train_args)``."""
    if masking_strategy not in masking.STRATEGIES:
        raise ValueError(f"unknown masking strategy {masking_strategy!r}; accepted: {', '.join(masking.STRATEGIES)}")
    masking.check_ratio(ratio)
    if "anchor_ratio" in options:
        masking.check_anchor_ratio(options["anchor_ratio"])
    try:
        import open_clip_train.main as oc_main
    except ModuleNotFoundError as e:  # open_clip_train needs open_clip's "training" extra
        raise ValueError(f"open_clip_train cannot start: missing module {e.name!r}. Install open_clip's training "
                         "extra: pip install 'open_clip_torch[training]' (braceexpand, webdataset, pandas, ...)") from e

    register_toy_arch()
    original, original_ddp = oc_main.create_model_and_transforms, oc_main.torch.nn.parallel.DistributedDataParallel
    oc_main.create_model_and_transforms = _with_masking(original, masking_strategy, ratio, options)
    oc_main.torch.nn.parallel.DistributedDataParallel = _cpu_friendly_ddp()
    try:
        oc_main.main(train_args)
    finally:
        oc_main.create_model_and_transforms = original
        oc_main.torch.nn.parallel.DistributedDataParallel = original_ddp


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rest = list(args.train_args)
    if rest and rest[0] == "--":
        rest = rest[1:]
    options = {k: v for k, v in (("anchor_ratio", args.anchor_ratio), ("threshold", args.threshold),
                                 ("embed_weight", args.embed_weight)) if v is not None}
    if args.masking != "cluster" and options:
        raise ValueError("--anchor-ratio, --threshold and --embed-weight apply to --masking cluster only")
    run(args.masking, args.mask_ratio, rest, **options)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ValueError as e:
        print(f"labkit openclip-train: error: {e}", file=sys.stderr)
        sys.exit(2)
