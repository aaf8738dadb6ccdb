"""The one training loop every method reuses.

``fit(model, loss_fn, make_batch, cfg)`` runs AdamW with linear warm-up then cosine decay, shows
a tqdm bar with loss and images/s, evaluates every ``eval_every`` steps, checkpoints to
safetensors and resumes from them, uses bf16 autocast on CUDA, and runs unchanged under
``torchrun --nproc_per_node N`` (DDP; gloo on CPU, nccl on CUDA).

Data is index-addressable: ``make_batch(step, rank, world_size)`` returns ``(batch, n_images)``
for one global step, so resuming at step ``s`` reproduces the very batches an uninterrupted
run would have seen, and each rank draws its own slice without a sampler.
``loss_fn(model, batch)`` returns a scalar loss, or ``(loss, metrics_dict)``; it may call any of the
model's submodules or methods, since under DDP the whole loss runs inside DDP's forward.

Fast mode lives here too: :func:`fast_mode` reads ``LABKIT_FAST`` and :func:`shorten` is the one way the
lab shrinks a loop, an evaluation or a benchmark for tests and CI; ``fit`` caps ``steps`` at
``TrainConfig.fast_steps`` by itself.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from labkit.core.checkpoint import ModelError, write_atomically
from labkit.core.device import autocast, get_device, seed_everything, synchronize


def fast_mode() -> bool:
    """``LABKIT_FAST=1``: every training loop and evaluation runs at a smoke-test size (tests, CI, nbmake)."""
    return os.environ.get("LABKIT_FAST", "0") not in ("", "0", "false", "False")


def shorten(full: int, fast: int) -> int:
    """``full``, or at most ``fast`` in fast mode: the one way the lab shrinks a loop, an evaluation or a
    benchmark under ``LABKIT_FAST=1`` (:func:`fit` applies it to ``TrainConfig.steps`` itself)."""
    return min(full, fast) if fast_mode() else full


STATE_NAME = "train_state.safetensors"
META_NAME = "train_state.json"


@dataclass
class TrainConfig:
    steps: int
    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup: float = 0.04  # fraction of steps
    grad_clip: float | None = 1.0
    seed: int = 0
    eval_every: int = 0  # 0: only at the end
    checkpoint_every: int = 0  # 0: only at the end (needs out_dir)
    out_dir: str | None = None
    resume: bool = True
    time_budget_s: float | None = None  # stop early once this much training time has passed
    desc: str = "train"
    fast_steps: int = 20  # the step count in fast mode (LABKIT_FAST=1), see :func:`shorten`
    extra: dict = field(default_factory=dict)  # recorded in the checkpoint metadata


def distributed_context() -> tuple[int, int]:
    """(rank, world_size), initialising the process group once when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: no decay for gains, biases, norms, embeddings' scale, temperature."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "logit_scale" in name or "bias" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(steps: int, warmup: float) -> Callable[[int], float]:
    """Linear warm-up over ``warmup * steps`` steps, then cosine decay to zero."""
    warm = max(1, int(warmup * steps))

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, steps - warm))))

    return f


def save_train_state(out_dir: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer, step: int,
                     meta: dict) -> None:
    """Model + optimizer tensors in one safetensors file, scalars in JSON; written atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    for idx, state in opt["state"].items():
        for key, value in state.items():
            tensors[f"optim.{idx}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    info = {"step": step, "param_groups": opt["param_groups"], **meta}
    write_atomically(out_dir, {STATE_NAME: lambda p: save_file(tensors, p),
                               META_NAME: lambda p: Path(p).write_text(json.dumps(info, indent=2, default=str))})


def load_train_state(out_dir: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> int:
    """Restore model (and optimizer) from ``out_dir``; returns the step, or raises ModelError.

    Everything is validated before anything is assigned, so a bad file leaves the model untouched.
    """
    out_dir = Path(out_dir)
    try:
        tensors = load_file(str(out_dir / STATE_NAME))
        info = json.loads((out_dir / META_NAME).read_text())
    except (SafetensorError, OSError, json.JSONDecodeError) as e:
        raise ModelError(f"corrupt training checkpoint in {out_dir}: {e}") from e
    model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    own = model.state_dict()
    missing, unexpected = own.keys() - model_state.keys(), model_state.keys() - own.keys()
    bad_shapes = [k for k in own.keys() & model_state.keys() if own[k].shape != model_state[k].shape]
    if missing or unexpected or bad_shapes:
        raise ModelError(f"checkpoint in {out_dir} does not match the model: missing {sorted(missing)[:5]}, "
                              f"unexpected {sorted(unexpected)[:5]}, wrong shape {bad_shapes[:5]}")
    model.load_state_dict(model_state)
    if optimizer is not None:
        state: dict[int, dict] = {}
        for k, v in tensors.items():
            if k.startswith("optim."):
                _, idx, key = k.split(".", 2)
                state.setdefault(int(idx), {})[key] = v
        optimizer.load_state_dict({"state": state, "param_groups": info["param_groups"]})
    return int(info["step"])


def has_train_state(out_dir: str | os.PathLike | None) -> bool:
    return out_dir is not None and (Path(out_dir) / STATE_NAME).is_file()


class _LossOf(nn.Module):
    """``loss_fn(model, batch)`` as a module, so that under DDP its forward runs the whole loss: whatever the loss
    calls (``model.encode_image``, an LM's embeddings, gates) happens inside DDP's forward, which is what lets
    DDP synchronise the gradients. ``find_unused_parameters`` covers losses that leave a head out of a step."""

    def __init__(self, model: nn.Module, loss_fn: Callable):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch):
        return self.loss_fn(self.model, batch)


def fit(model: nn.Module, loss_fn: Callable, make_batch: Callable[[int, int, int], tuple[object, int]],
        cfg: TrainConfig, evaluate: Callable[[nn.Module], dict] | None = None,
        device: torch.device | None = None, progress: bool = True, groups: list[dict] | None = None,
        after_step: Callable[[nn.Module], None] | None = None) -> dict:
    """Train ``model`` in place; returns ``{"history": [...], "evals": [...], "steps": n, "seconds": s, "images_per_s": ...}``.

    ``groups`` overrides the AdamW parameter groups (default: :func:`param_groups`); a group may
    set its own ``lr`` (scaled by the same schedule unless ``scheduled=False``) or ``maximize=True``
    (gradient ascent, e.g. the Lagrange multipliers of EfficientVLM's pruning). ``after_step(model)`` runs
    after every optimizer step (e.g. a projection such as the pruning gates' clamp).
    """
    rank, world = distributed_context()
    if device is None:
        device = get_device()
        if device.type == "cuda" and world > 1:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    cfg = replace(cfg, steps=shorten(cfg.steps, cfg.fast_steps))
    seed_everything(cfg.seed)
    model.to(device)
    groups = groups if groups is not None else param_groups(model, cfg.weight_decay)
    for group in groups:
        group["base_lr"] = group.get("lr", cfg.lr)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    start = 0
    if cfg.resume and has_train_state(cfg.out_dir):
        start = load_train_state(cfg.out_dir, model, optimizer)
    schedule = lr_lambda(cfg.steps, cfg.warmup)
    train_model = nn.parallel.DistributedDataParallel(_LossOf(model, loss_fn), find_unused_parameters=True) if world > 1 else None
    history, evals = [], []
    bar = tqdm(range(start, cfg.steps), desc=cfg.desc, disable=not progress or rank != 0, initial=start,
               total=cfg.steps, dynamic_ncols=True)
    t_start, train_seconds, images_seen = time.perf_counter(), 0.0, 0
    last = start
    for step in bar:
        model.train()
        synchronize(device)  # every timer read waits for the device's queued work (CUDA runs asynchronously)
        t0 = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * (schedule(step) if group.get("scheduled", True) else 1.0)
        batch, n_images = make_batch(step, rank, world)
        with autocast(device):
            out = train_model(batch) if train_model is not None else loss_fn(model, batch)
        loss, metrics = out if isinstance(out, tuple) else (out, {})
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        if after_step is not None:
            after_step(model)
        synchronize(device)
        dt = time.perf_counter() - t0
        train_seconds += dt
        images_seen += n_images * world
        record = {"step": step + 1, "loss": loss.item(), "images_per_s": n_images * world / dt,
                  "train_seconds": train_seconds, "images_seen": images_seen, "lr": optimizer.param_groups[0]["lr"],
                  **{k: float(v) for k, v in metrics.items()}}
        history.append(record)
        last = step + 1
        bar.set_postfix(loss=f"{record['loss']:.3f}", img_s=f"{record['images_per_s']:.0f}")
        done = step + 1 == cfg.steps or (cfg.time_budget_s is not None and train_seconds >= cfg.time_budget_s)
        if evaluate is not None and rank == 0 and (done or (cfg.eval_every and (step + 1) % cfg.eval_every == 0)):
            model.eval()
            evals.append({"step": step + 1, "train_seconds": train_seconds, "images_seen": images_seen,
                          **evaluate(model)})
            bar.write(f"step {step + 1}: " + ", ".join(f"{k}={v:.3f}" for k, v in evals[-1].items()
                                                       if isinstance(v, float)))
        if cfg.out_dir and rank == 0 and (done or (cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0)):
            save_train_state(cfg.out_dir, model, optimizer, step + 1, {"config": asdict(cfg)})
        if done:
            break
    model.eval()
    return {"history": history, "evals": evals, "steps": last, "images_per_s": steady_images_per_s(history),
            "seconds": time.perf_counter() - t_start, "rank": rank, "world_size": world}


def steady_images_per_s(history: list[dict]) -> float:
    """Median training throughput after the first tenth of the steps (warm-up: allocator, kernels, caches)."""
    timed = history[len(history) // 10:]
    return statistics.median(h["images_per_s"] for h in timed) if timed else 0.0
