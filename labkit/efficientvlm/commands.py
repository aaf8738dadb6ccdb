"""``labkit train teacher|student|pruned`` and ``labkit eval efficient``: EfficientVLM on ToyWorld."""

from __future__ import annotations

import math
import time
from pathlib import Path

from labkit.clip.model import load_clip
from labkit.core.assets import asset_dir
from labkit.core.checkpoint import invocation
from labkit.core.command import Command, save_json
from labkit.core.train import shorten
from labkit.efficientvlm.distill import train_student
from labkit.efficientvlm.eval import eval_efficient, eval_scenes, evaluate_vlm
from labkit.efficientvlm.model import load_vlm, save_vlm
from labkit.efficientvlm.prune import prune_student
from labkit.efficientvlm.train import train_teacher

WHATS = ("teacher", "student", "pruned")


def _shipped(what: str, path: str | None) -> Path:
    return Path(path) if path else asset_dir(f"efficientvlm/{what}")


RECIPES = {  # the shipped checkpoints' recipes (their metadata.json records the exact commands)
    "teacher": {"steps": 900, "lr": 2e-4},
    "student": {"steps": 4000, "lr": 2e-4},
    "pruned": {"steps": 1000, "lr": 1e-4, "target": 0.5, "recover_steps": 1000},  # target chosen on validation
}


def train_vlm(what: str, steps: int | None = None, batch_size: int = 64, lr: float | None = None, seed: int = 0,
              clip: str = "toy", eval_n: int = 500, out: str | None = None, teacher: str | None = None,
              student: str | None = None, init: str | None = None, target: float = 0.5, recover_steps: int = 1000,
              plain_lagrangian: bool = False, progress: bool = True) -> dict:
    """Train one EfficientVLM stage and save it to ``out`` (default: the shipped folder): ``what="teacher"`` from
    the toy CLIP towers, ``"student"`` distilled from ``teacher`` (or further from ``init``), ``"pruned"`` the
    ``student`` pruned to ``target`` sparsity, then recovered for ``recover_steps`` (``plain_lagrangian``: without
    dual restarts, as the shipped checkpoint was pruned). ``steps`` and ``lr`` default
    to the shipped recipe of that stage (:data:`RECIPES`); validation scenes are evaluated during training."""
    if what not in WHATS:
        raise ValueError(f"unknown EfficientVLM stage {what!r}; accepted: {', '.join(WHATS)}")
    steps = RECIPES[what]["steps"] if steps is None else steps
    lr = RECIPES[what]["lr"] if lr is None else lr
    clip_model = load_clip(clip)
    check = eval_scenes(clip_model, shorten(eval_n, 50), split="val")
    evaluate = lambda model: evaluate_vlm(model, check, rerank_k=0)  # noqa: E731
    started = time.perf_counter()
    common = dict(batch_size=batch_size, seed=seed, progress=progress)
    init_model = None
    if what == "teacher":
        model, record = train_teacher(clip_model, steps, lr=lr, evaluate=evaluate, **common)
    else:
        teacher_model = load_vlm(_shipped("teacher", teacher), clip_model.device)
        if what == "student":
            init_model = load_vlm(init, clip_model.device) if init else None
            model, record = train_student(teacher_model, clip_model, steps, lr=lr, evaluate=evaluate, init=init_model,
                                          **common)
        else:
            student_model = load_vlm(_shipped("student", student), clip_model.device)
            model, record = prune_student(student_model, teacher_model, clip_model, target, steps, lr=lr,
                                          recover_steps=recover_steps, dual_restart=not plain_lagrangian, **common)
            record["evals"] = [evaluate(model)]
    wall = time.perf_counter() - started
    out = _shipped(what, out)
    history = record["history"]
    meta = {"command": invocation("labkit.efficientvlm.commands.train_vlm", what=what, steps=steps, batch_size=batch_size,
                                  lr=lr, seed=seed, target=target, recover_steps=recover_steps,
                                  plain_lagrangian=plain_lagrangian),
            "steps": record["steps"], "wall_seconds": round(wall, 1), "device": str(clip_model.device),
            "val": record["evals"][-1],
            "curve": [{k: v for k, v in h.items() if isinstance(v, float | int)}
                      for h in history[::math.ceil(len(history) / 1000)]]}  # <= 1,000 points
    if init_model is not None:  # provenance of a student distilled further
        meta["init_from"] = {k: init_model.meta.get(k) for k in ("command", "steps", "wall_seconds", "init_from")}
    if what == "pruned":
        meta.update(target=target, dual_restart=not plain_lagrangian, sparsity_by_modality=record["sparsity_by_modality"],
                    recover_steps=record.get("recovery", {}).get("steps", 0))
    save_vlm(model, out, meta)
    return {"out": str(out), "steps": record["steps"], "wall_seconds": round(wall, 1), **record["evals"][-1]}


def eval_efficient_command(teacher: str | None = None, student: str | None = None, pruned: str | None = None,
                           clip: str = "toy", n: int = 1000, sweep: str = "0.3,0.5,0.7,0.8", sweep_steps: int = 800,
                           sweep_recover_steps: int = 150, bench_batch: int = 128, repeats: int = 15,
                           save: str | None = None, progress: bool = True) -> dict:
    """:func:`labkit.efficientvlm.eval.eval_efficient` on the shipped (or given) checkpoints; also written to ``save``."""
    clip_model = load_clip(clip)
    models = [load_vlm(_shipped(w, p), clip_model.device) for w, p in zip(WHATS, (teacher, student, pruned))]
    targets = tuple(float(t) for t in sweep.split(",") if t.strip())
    result = eval_efficient(clip_model, *models, sweep_targets=targets, sweep_steps=shorten(sweep_steps, 2),
                            sweep_recover_steps=shorten(sweep_recover_steps, 2), n=shorten(n, 60), bench_batch=bench_batch,
                            repeats=shorten(repeats, 2), progress=progress)
    return save_json(result, save)


CKPT = "checkpoint (default: the shipped one)"
COMMON = {"steps": {}, "batch_size": {}, "lr": {}, "seed": {},
          "clip": {"help": "CLIP for preprocessing, tokenizer and (teacher) initial towers"},
          "eval_n": {"help": "validation scenes evaluated during training"},
          "out": {"help": "checkpoint folder (default: the shipped labkit/assets/efficientvlm/...)"}}
COMMANDS = [
    Command("train", "teacher", train_vlm, "EfficientVLM teacher: X-VLM-style VLM from the toy CLIP towers",
            COMMON, fixed={"what": "teacher"}, defaults=RECIPES["teacher"]),
    Command("train", "student", train_vlm, "EfficientVLM student: half the layers, distilled from the teacher",
            {**COMMON, "teacher": {"help": "teacher " + CKPT},
             "init": {"help": "start from this student checkpoint and distil it further"}},
            fixed={"what": "student"}, defaults=RECIPES["student"]),
    Command("train", "pruned", train_vlm, "EfficientVLM: modal-adaptive L0 pruning of the student",
            {**COMMON, "teacher": {"help": "teacher " + CKPT}, "student": {"help": "student " + CKPT},
             "target": {"help": "global target sparsity in [0, 1)"},
             "recover_steps": {"help": "distil the finalized model from the teacher for this many more steps"},
             "plain_lagrangian": {"help": "train the Lagrange multipliers without dual restarts, as the official code "
                                          "does (the shipped checkpoint's recipe)"}},
            fixed={"what": "pruned"}, defaults=RECIPES["pruned"]),
    Command("eval", "efficient", eval_efficient_command,
            "EfficientVLM: sizes, speedup and retention of student and pruned model", {
                "teacher": {"help": "teacher " + CKPT}, "student": {"help": "student " + CKPT},
                "pruned": {"help": "pruned " + CKPT}, "clip": {}, "n": {"help": "held-out test scenes"},
                "sweep": {"help": "comma-separated target sparsities pruned afresh"},
                "sweep_steps": {"help": "pruning steps per sweep point"},
                "sweep_recover_steps": {"help": "recovery distillation steps per sweep point"},
                "bench_batch": {"help": "image-caption pairs per timed inference"},
                "repeats": {"help": "timed repeats (median) after 3 warm-up runs"},
                "save": {"help": "also write the JSON result to this file"}}),
]
