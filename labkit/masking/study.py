"""``labkit eval masking``: what masking costs in accuracy for the same wall-clock budget.

:func:`eval_masking` trains the toy CLIP with none / random / cluster masking for the same
wall-clock budget and reports zero-shot accuracy (shape, colour; shape split by object size),
retrieval R@1, images seen, and an accuracy-versus-training-time curve. :func:`object_drop_rates`
measures why small objects suffer: how often a mask removes every patch of an object.

Each masked variant also runs with FLIP's *unmasked tuning* (Li et al., CVPR 2023, §3 and Table 1e:
0.32 extra epochs without masks after 6.4 masked ones): the last ``unmasked_tuning`` share of its
training images (default 0.05, FLIP's 0.32 / 6.4) sees every patch, inside the same wall-clock
budget. Departure from the official recipe: FLIP tunes in a second run with its own warm-up and a
learning rate 1/100 of pretraining's (``learning_rate=4e-8`` against ``4e-6``); here the unmasked
steps are the tail of the one cosine schedule, where the learning rate has fallen to 0-2.5 % of its
peak, so a budget-bound study needs no second schedule.
"""

from __future__ import annotations

import statistics

import numpy as np
import torch

from labkit.clip.eval import evaluate_clip, zero_shot_eval
from labkit.clip.pretrain import train_toy_clip
from labkit.core.train import TrainConfig, shorten
from labkit.data import toyworld as tw
from labkit.masking import masks as masking
from labkit.masking.bench import set_threads


def accuracy_by_size(clip, task: str = "shape", n: int = 1000, seed: int = 0) -> dict:
    """Zero-shot accuracy of ``task`` on single-object test scenes, split by object size."""
    res = zero_shot_eval(clip, task, n=n, seed=seed)
    data = tw.TaskDataset(task, "test", seed, n)
    sizes = [data.world.scene(i).objects[0].size for i in range(n)]
    correct = (res["pred"] == res["labels"]).tolist()
    out = {}
    for size in tw.SIZES:
        hits = [c for c, s in zip(correct, sizes) if s == size]
        out[size] = round(sum(hits) / max(1, len(hits)), 4)
    return out


def _measure_rate(variant: str, ratio: float, batch_size: int, steps: int, **kw) -> float:
    """Images/s of toy-CLIP training with this masking (a few throwaway steps, median)."""
    _, record = train_toy_clip(steps=steps, batch_size=batch_size, vision_hook=masking.masking_hook(variant, ratio, **kw),
                               eval_n=0, progress=False)
    rates = [h["images_per_s"] for h in record["history"][1:]] or [record["history"][0]["images_per_s"]]
    return statistics.median(rates)


def _parse_variant(variant: str, ratio: float) -> tuple[str, float]:
    """``"random"`` (at ``ratio``), ``"cluster:0.75"`` (its own ratio) or ``"none"``."""
    name, _, r = variant.partition(":")
    if name not in masking.STRATEGIES:
        raise ValueError(f"unknown masking variant {variant!r}; accepted: none, random, cluster, optionally "
                         f"with a ratio such as random:0.75")
    if name == "none":
        return name, 0.0
    return name, masking.check_ratio(float(r) if r else ratio)


def _label(variant: str, ratio: float, tuning: float) -> str:
    """A run's name: ``none``, ``random:0.5``, ``cluster:0.75+tuning``."""
    return variant + (f":{ratio}" if ratio else "") + ("+tuning" if tuning else "")


PLANNED_SHARE = 0.97  # steps are planned for 97 % of the budget, so that a run a little slower than its
# calibration still reaches its last (unmasked tuning) steps before the budget stops it


def plan_steps(budget_s: float, batch_size: int, masked_rate: float, unmasked_rate: float | None = None,
               tuning: float = 0.0) -> tuple[int, int]:
    """(steps, unmasked tuning steps) that fill :data:`PLANNED_SHARE` of ``budget_s`` at the measured images/s.

    Without tuning: ``budget * masked_rate / batch`` steps. With a ``tuning`` share of the images unmasked, the
    images ``n`` solve ``n (1 - tuning) / masked_rate + n tuning / unmasked_rate = budget``: the slower unmasked
    steps are paid for with fewer masked ones.
    """
    if not 0.0 <= tuning < 1.0:
        raise ValueError(f"unmasked_tuning must be a share of the training images in [0, 1), got {tuning}")
    budget_s = PLANNED_SHARE * budget_s
    images = budget_s / ((1 - tuning) / masked_rate + (tuning / unmasked_rate if tuning else 0.0))
    steps = shorten(max(2, int(images / batch_size)), TrainConfig.fast_steps)  # what fit will run
    return steps, (max(1, round(tuning * steps)) if tuning else 0)


def eval_masking(budget_s: float = 450.0, ratio: float = 0.5,
                 variants=("none", "random", "cluster", "random:0.75", "cluster:0.75"), unmasked_tuning: float = 0.05,
                 batch_size: int = 128, eval_n: int = 500, final_n: int = 1000, curve_points: int = 6,
                 seed: int = 0, progress: bool = True, threads: int = 0, **masking_kwargs) -> dict:
    """Train the toy CLIP once per masking variant for the same wall-clock budget and compare.

    ``variants``: ``none``, ``random``, ``cluster`` (at ``ratio``) or ``random:0.75``-style. Every masked
    variant runs twice: masked throughout, and with the last ``unmasked_tuning`` share of its images unmasked
    (FLIP's unmasked tuning; 0 skips those runs).
    The step count of each run is set from its measured throughput so that its learning-rate
    schedule ends when the budget does (a masked run takes more, cheaper steps); the budget also
    stops each run hard (``TrainConfig.time_budget_s``; evaluation time is not counted), and
    ``tuning_steps_done`` records how many of a run's unmasked steps ran before it did.
    The curve (on ``eval_n`` validation scenes) and the choice of the best run use the validation split;
    the final figures are the test split's (``final_n`` scenes), read once per run.
    """
    set_threads(threads)
    masking.check_ratio(ratio)
    parsed = [_parse_variant(v, ratio) for v in variants]
    plan = [(v, r, t) for v, r in parsed for t in ((0.0,) if v == "none" or not unmasked_tuning else (0.0, unmasked_tuning))]
    budget_s, batch_size = shorten(budget_s, 2.0), shorten(batch_size, 32)
    eval_n, final_n = shorten(eval_n, 32), shorten(final_n, 64)
    calib_steps, curve_points = shorten(6, 2), shorten(curve_points, 2)
    rates: dict[tuple[str, float], float] = {}

    def rate(variant: str, r: float) -> float:
        if (variant, r) not in rates:
            kw = masking_kwargs if variant == "cluster" else {}
            rates[variant, r] = _measure_rate(variant, r, batch_size, calib_steps, **kw)
        return rates[variant, r]

    runs = []
    for variant, r, tuning in plan:
        kw = dict(masking_kwargs) if variant == "cluster" else {}
        steps, tuning_steps = plan_steps(budget_s, batch_size, rate(variant, r),
                                         rate("none", 0.0) if tuning else None, tuning)
        if tuning_steps:
            kw.update(unmasked_tuning_steps=tuning_steps, total_steps=steps)
        clip, record = train_toy_clip(steps=steps, batch_size=batch_size, seed=seed,
                                      vision_hook=masking.masking_hook(variant, r, **kw),
                                      eval_every=max(1, steps // curve_points), eval_n=eval_n,
                                      time_budget_s=budget_s, progress=progress)
        final = evaluate_clip(clip, final_n)
        by_size = accuracy_by_size(clip, "shape", final_n)
        last = record["history"][-1]
        curve = [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in e.items()
                  if isinstance(v, (int, float))} for e in record["evals"]]
        runs.append({"run": _label(variant, r, tuning), "masking": variant, "ratio": r, "unmasked_tuning": tuning,
                     "planned_steps": steps, "tuning_steps": tuning_steps, "steps": record["steps"],
                     "tuning_steps_done": max(0, record["steps"] - (steps - tuning_steps)) if tuning_steps else 0,
                     "train_seconds": round(last["train_seconds"], 1), "images_seen": last["images_seen"],
                     "images_per_s": round(last["images_seen"] / last["train_seconds"], 1),
                     **{k: round(v, 4) for k, v in final.items()},
                     "shape_acc_small": by_size["small"], "shape_acc_large": by_size["large"], "curve": curve,
                     "val_shape_plus_i2t": round(curve[-1]["zero_shot_shape_acc"] + curve[-1]["retrieval_i2t_r1"], 4)})
    best = max(runs, key=lambda x: x["val_shape_plus_i2t"])  # chosen on validation; the test figures only report
    return {"budget_s_per_variant": budget_s, "batch_size": batch_size, "curve_n": eval_n, "eval_n": final_n,
            "unmasked_tuning": unmasked_tuning, "threads": torch.get_num_threads(),
            "masking_kwargs": masking_kwargs, "runs": runs, "best_by_shape_plus_i2t": best["run"]}


def object_patches(obj, patch_size: int = 8, image_size: int = 64) -> list[int]:
    """Indices of the patches a ToyWorld object's bounding box touches (row-major)."""
    r = tw.SIZES[obj.size] * image_size / tw.IMAGE_SIZE
    scale = image_size / tw.IMAGE_SIZE
    grid = image_size // patch_size
    x0, x1 = int((obj.cx * scale - r) // patch_size), int((obj.cx * scale + r - 1e-6) // patch_size)
    y0, y1 = int((obj.cy * scale - r) // patch_size), int((obj.cy * scale + r - 1e-6) // patch_size)
    return [i * grid + j for i in range(max(0, y0), min(grid, y1 + 1)) for j in range(max(0, x0), min(grid, x1 + 1))]


def object_drop_rates(strategy: str, ratio: float, n: int = 500, seed: int = 0, **cluster_kwargs) -> dict:
    """Per object size: mean patches covered, and how often masking drops *every* patch of an object.

    Measured on ``n`` test scenes (64 px, 8 px patches). This is what makes small objects hard to
    learn under high masking ratios (docs/design.md: a 12-16 px object covers about four patches).
    """
    world = tw.ToyWorld("test", seed, n)
    scenes = [world.scene(i) for i in range(n)]
    images = torch.from_numpy(np.stack([s.render() for s in scenes])).permute(0, 3, 1, 2).float() / 255
    gen = torch.Generator().manual_seed(seed)
    if strategy == "random":
        keep = masking.random_keep_indices(n, 64, ratio, generator=gen)
    elif strategy == "cluster":
        keep = masking.cluster_keep_indices(images, 8, ratio, generator=gen, **cluster_kwargs)
    else:
        raise ValueError(f"unknown masking strategy {strategy!r}; accepted: random, cluster")
    masked = masking.keep_to_mask(keep, 64)
    stats = {size: {"objects": 0, "patches": 0, "dropped": 0, "visible_fraction": 0.0} for size in tw.SIZES}
    for b, scene in enumerate(scenes):
        for obj in scene.objects:
            idx = object_patches(obj)
            st = stats[obj.size]
            st["objects"] += 1
            st["patches"] += len(idx)
            hidden = masked[b, idx]
            st["dropped"] += int(hidden.all())
            st["visible_fraction"] += float((~hidden).float().mean())
    return {size: {"mean_patches": round(st["patches"] / max(1, st["objects"]), 2),
                   "fully_dropped": round(st["dropped"] / max(1, st["objects"]), 4),
                   "visible_patch_fraction": round(st["visible_fraction"] / max(1, st["objects"]), 4)}
            for size, st in stats.items()}
