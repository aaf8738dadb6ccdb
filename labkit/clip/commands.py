"""``labkit train clip`` and ``labkit eval clip``: the toy CLIP every method shares."""

from __future__ import annotations

import time

from labkit.clip.eval import evaluate_clip
from labkit.clip.model import load_clip, save_local_dir
from labkit.clip.pretrain import train_toy_clip
from labkit.core.assets import asset_dir
from labkit.core.checkpoint import invocation
from labkit.core.command import Command


def train_clip(steps: int = 2800, batch_size: int = 128, lr: float = 1e-3, seed: int = 0, eval_every: int = 400,
               eval_n: int = 500, out: str | None = None, work_dir: str = "runs/toy_clip", vision_hook=None,
               progress: bool = True) -> dict:
    """Pretrain the toy CLIP on ToyWorld (the shipped recipe's defaults) and save it to ``out`` (default: the
    shipped folder) in open_clip's local-dir layout, its metadata recording the command, metrics and curve.

    ``vision_hook`` changes the vision tower before training (e.g. masking, see ``labkit train masked-clip``).
    """
    started = time.perf_counter()
    clip, record = train_toy_clip(steps=steps, batch_size=batch_size, out_dir=work_dir, seed=seed, lr=lr,
                                  eval_every=eval_every, eval_n=eval_n, vision_hook=vision_hook, progress=progress)
    wall = time.perf_counter() - started
    if record["rank"] != 0:
        return {}
    metrics = evaluate_clip(clip)
    out = out or str(asset_dir("toy_clip"))
    metadata = {"command": invocation("labkit.clip.commands.train_clip", steps=steps, batch_size=batch_size, lr=lr,
                                      seed=seed),
                "steps": record["steps"], "batch_size": batch_size, "seed": seed, "wall_seconds": round(wall, 1),
                "world_size": record["world_size"], "device": str(clip.device), "metrics": metrics, "curve": record["evals"]}
    save_local_dir(clip.model, clip.config, out, metadata)
    return {"out": out, "steps": record["steps"], "wall_seconds": round(wall, 1), **metrics}


def eval_clip(model: str = "toy", n: int = 1000) -> dict:
    """Zero-shot shape and colour accuracy and retrieval R@1 of ``model`` on ``n`` held-out test scenes."""
    return {"model": model, **evaluate_clip(load_clip(model), n=n)}


COMMANDS = [
    Command("train", "clip", train_clip, "pretrain the toy CLIP on ToyWorld from scratch", {
        "steps": {}, "batch_size": {}, "lr": {}, "seed": {}, "eval_every": {}, "eval_n": {},
        "out": {"help": "local dir to write (default: the shipped one)"},
        "work_dir": {"help": "training state for resume"}}),
    Command("eval", "clip", eval_clip, "zero-shot accuracy and retrieval R@1 on held-out scenes",
            {"model": {"help": "toy, local-dir:<path> or openclip:<arch>/<tag>"}, "n": {"help": "held-out scenes"}}),
]
