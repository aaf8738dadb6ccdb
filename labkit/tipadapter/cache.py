"""Tip-Adapter and Tip-Adapter-F (Zhang et al., "Tip-Adapter: Training-free Adaption of CLIP for
Few-shot Classification", ECCV 2022, Sec. 3).

The cache model, for N classes and K shots per class:

* keys ``F_train`` ``[N*K, D]``: L2-normalised CLIP image features of the support images, each
  averaged over 10 augmented views (random resized crop, scale 0.5-1, and horizontal flip) and
  re-normalised; values ``L_train`` ``[N*K, N]``: one-hot labels.
* affinity ``A = exp(-beta * (1 - f F_train^T))`` (the paper's ``phi``), cache prediction ``A L_train``;
* fused logits ``100 f W_c^T + alpha * A L_train``, with ``W_c`` the zero-shot text classifier
  (:func:`labkit.clip.zero_shot_classifier`, a template ensemble).

``alpha`` weighs the cache (larger when the target domain is far from CLIP's pretraining data),
``beta`` sharpens the affinities. Both are grid-searched on a *validation* split (the official
ImageNet script searched on the test set; we never do). Tip-Adapter-F unfreezes the keys
(initialised from the cache) and fine-tunes them for 20 epochs with AdamW (lr 1e-3, eps 1e-4) and a
cosine schedule, the text classifier and values frozen.

Everything after the image encoder works on cached features, so it is vectorised and cheap. The
evaluation behind ``labkit eval tip`` (the few-shot tasks, every method at every shot count) is
:mod:`labkit.tipadapter.eval`.

Departures from the official code (gaopengcuhk/Tip-Adapter), and why:

* Keys: labkit averages the *unit* features of the 10 views and normalises again; the official code
  averages the raw features over views and normalises once. With CLIP's features of similar norm the
  two agree closely; labkit's gives every view the same weight.
* Tip-Adapter-F draws, like the official code, one augmented view of every support image per epoch,
  but from the cache's 10 encoded views instead of a fresh augmentation each epoch (no image
  re-encoding: fine-tuning stays a loop over cached features).
* alpha and beta are searched on a validation split, never on test (the official ImageNet script
  searched on test).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from labkit.clip.model import ClipModel

LOGIT_SCALE = 100.0  # CLIP's logit scale, as in the paper's fused logits
DEFAULT_ALPHAS = (0.0, *(round(0.01 * 1.5**i, 4) for i in range(29)))  # zero-shot itself, then 0.01 ... ~850
DEFAULT_BETAS = (0.5, 1.0, 2.0, 3.0, 5.0, 7.0, 10.0, 15.0)


@dataclass
class TipCache:
    """The cache model: ``keys`` ``[N*K, D]`` (unit rows), one-hot ``values`` ``[N*K, N]``."""

    keys: torch.Tensor
    values: torch.Tensor
    labels: torch.Tensor
    classnames: tuple[str, ...]

    @property
    def n_classes(self) -> int:
        return self.values.shape[1]


def check_support(images: torch.Tensor, labels: torch.Tensor, n_classes: int) -> None:
    """Reject support sets Tip-Adapter cannot use, with a message naming the problem."""
    if n_classes < 2:
        raise ValueError(f"Tip-Adapter needs at least 2 classes, got {n_classes}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"support images must be [B, 3, H, W], got shape {tuple(images.shape)}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(f"need one label per support image: {len(images)} images, labels of shape "
                         f"{tuple(labels.shape)}")
    if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(f"labels must lie in [0, {n_classes - 1}], got {labels.min()}..{labels.max()}")
    counts = torch.bincount(labels.long().cpu(), minlength=n_classes)
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"class(es) {empty} have no support image; every class needs at least one")


def check_classnames(classnames) -> tuple[str, ...]:
    """Strip names; reject fewer than two, empty or duplicate (case-insensitive) names."""
    names = tuple(str(c).strip() for c in classnames)
    if len(names) < 2:
        raise ValueError(f"need at least 2 classes, got {len(names)}: {list(names)}")
    if any(not n for n in names):
        raise ValueError(f"class names must not be empty, got {list(names)}")
    lowered = [n.lower() for n in names]
    dups = sorted({n for n in lowered if lowered.count(n) > 1})
    if dups:
        raise ValueError(f"duplicate class names: {dups}")
    return names


def select_shots(labels: torch.Tensor, shots: int, n_classes: int) -> torch.Tensor:
    """Indices of the first ``shots`` examples of every class (nested: 1-shot is inside 2-shot ...)."""
    if shots < 1:
        raise ValueError(f"shots must be at least 1, got {shots}")
    out = []
    for c in range(n_classes):
        idx = (labels == c).nonzero().flatten()
        if len(idx) < shots:
            raise ValueError(f"class {c} has only {len(idx)} image(s), fewer than shots={shots}")
        out.append(idx[:shots])
    return torch.cat(out)


def augment_views(images: torch.Tensor, n_views: int = 10, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3),
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """``n_views`` random resized crops (area ``scale``, aspect ``ratio``) + random flips of uint8 images.

    Returns uint8 ``[n_views, B, 3, H, W]``. Each view of each image gets its own crop, so this uses
    ``torchvision.ops.roi_align`` (one bilinear crop-and-resize per box, all boxes in one call)
    rather than ``transforms.v2.RandomResizedCrop``, which draws one crop per call for a whole batch.
    """
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"augment_views expects uint8 [B, 3, H, W] images, got {images.dtype} {tuple(images.shape)}")
    B, _, H, W = images.shape
    device = images.device
    n = n_views * B
    rand = torch.rand(5, n, generator=generator).to(device)  # CPU generator: same views on every device
    area = scale[0] + (scale[1] - scale[0]) * rand[0]
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * rand[1]
    aspect = torch.exp(log_r)
    w = torch.sqrt(area * aspect).clamp(max=1.0) * W
    h = torch.sqrt(area / aspect).clamp(max=1.0) * H
    x0, y0 = rand[2] * (W - w), rand[3] * (H - h)
    boxes = torch.stack([torch.arange(B, device=device).repeat(n_views).float(), x0, y0, x0 + w, y0 + h], 1)
    crops = roi_align(images.float(), boxes, output_size=(H, W), spatial_scale=1.0, sampling_ratio=2, aligned=True)
    flip = (rand[4] < 0.5).view(n, 1, 1, 1)
    crops = torch.where(flip, crops.flip(-1), crops)
    return crops.round().clamp(0, 255).to(torch.uint8).view(n_views, B, *images.shape[1:])


@torch.no_grad()
def view_features(clip: ClipModel, images: torch.Tensor, n_views: int = 10, seed: int = 0,
                  deadline: float | None = None) -> torch.Tensor:
    """CLIP features of ``n_views`` augmented views: ``[n_views, B, D]`` (each unit norm).

    ``deadline`` (a ``time.monotonic()`` value) bounds the work: past it, raise ``TimeoutError``.
    """
    gen = torch.Generator().manual_seed(seed)
    views = augment_views(images.to(clip.device), n_views, generator=gen).flatten(0, 1)
    chunk = max(len(images), 256)  # whole views per chunk, at least a full encoder batch
    feats = []
    for part in views.split(chunk):
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"building the cache of {len(images)} images x {n_views} views ran out of time; "
                               "use fewer shots or a smaller model")
        feats.append(clip.encode_image(part))
    return torch.cat(feats).view(n_views, len(images), -1)


def cache_from_features(view_feats: torch.Tensor, labels: torch.Tensor, classnames) -> TipCache:
    """Keys = mean over views, re-normalised; values = one-hot labels."""
    keys = F.normalize(view_feats.mean(dim=0), dim=-1)
    values = F.one_hot(labels.long().to(keys.device), len(classnames)).float()
    return TipCache(keys, values, labels.to(keys.device), tuple(classnames))


def build_cache(clip: ClipModel, images: torch.Tensor, labels: torch.Tensor, classnames, n_views: int = 10,
                seed: int = 0, deadline: float | None = None) -> TipCache:
    """The Tip-Adapter cache from uint8 support images ``[N*K, 3, H, W]`` and integer labels."""
    classnames = check_classnames(classnames)
    labels = torch.as_tensor(labels)
    check_support(images, labels, len(classnames))
    return cache_from_features(view_features(clip, images, n_views, seed, deadline), labels, classnames)


def affinity(features: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of (unit) query features ``[B, D]`` to the cache keys ``[M, D]``."""
    return features @ keys.T


def cache_logits(aff: torch.Tensor, values: torch.Tensor, beta: float) -> torch.Tensor:
    """``exp(-beta * (1 - affinity)) @ values``: the cache's vote, per class."""
    return torch.exp(-beta * (1.0 - aff)) @ values


def zero_shot_logits(features: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """``100 * f W_c^T``."""
    return LOGIT_SCALE * features @ classifier.T


def tip_logits(features: torch.Tensor, classifier: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               alpha: float = 1.0, beta: float = 1.0) -> torch.Tensor:
    """Tip-Adapter's fused logits ``100 f W_c^T + alpha * exp(-beta (1 - f keys^T)) values``."""
    return zero_shot_logits(features, classifier) + alpha * cache_logits(affinity(features, keys), values, beta)


@torch.no_grad()
def explain(feature: torch.Tensor, classifier: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
            alpha: float = 1.0, beta: float = 1.0) -> dict:
    """One query's three views of the decision: zero-shot, cache and fused class probabilities.

    ``cache`` is the affinity-weighted vote normalised to sum to one (independent of ``alpha``);
    ``fused`` is the softmax of Tip-Adapter's logits (``logits``, of which ``zero_shot_logits`` is the text part).
    Also returns the affinities to every key.
    """
    f = feature.view(1, -1)
    zs = zero_shot_logits(f, classifier)[0]
    aff = affinity(f, keys)[0]
    votes = cache_logits(aff.view(1, -1), values, beta)[0]
    fused = zs + alpha * votes
    return {"zero_shot": zs.softmax(-1), "cache": votes / votes.sum(), "fused": fused.softmax(-1),
            "logits": fused, "zero_shot_logits": zs, "affinity": aff, "prediction": int(fused.argmax())}


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy with ties split evenly (the expected accuracy under random tie-breaking).

    Matters for degenerate zero-shot classifiers: a text tower with no words for the classes (the toy
    CLIP on MNIST digits) gives every class the same logit, which scores chance, not the share of class 0.
    """
    logits, labels = logits.float().cpu(), labels.cpu()
    top = logits == logits.max(-1, keepdim=True).values
    return float((top.gather(-1, labels.view(-1, 1)).squeeze(-1).double() / top.sum(-1)).mean())


def mcnemar_critical(n_settings: int, level: float = 0.05) -> float:
    """Critical chi-squared (1 degree of freedom) of McNemar's test at ``level``, Bonferroni-corrected for
    ``n_settings`` candidates: the search picks its best setting on the same images it tests it on."""
    z = statistics.NormalDist().inv_cdf(1 - level / (2 * max(1, n_settings)))
    return z * z


def _discordant(logits: torch.Tensor, reference: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """Images ``logits`` gets right and ``reference`` wrong, and the reverse (argmax; a tie counts as wrong)."""
    def right(x):
        top = x == x.max(-1, keepdim=True).values
        return top.gather(-1, labels.view(-1, 1)).squeeze(-1) & (top.sum(-1) == 1)

    a, b = right(logits), right(reference)
    return int((a & ~b).sum()), int((~a & b).sum())


@torch.no_grad()
def search_alpha_beta(features: torch.Tensor, labels: torch.Tensor, classifier: torch.Tensor, keys: torch.Tensor,
                      values: torch.Tensor, alphas=DEFAULT_ALPHAS, betas=DEFAULT_BETAS) -> dict:
    """Grid search of ``alpha`` x ``beta`` on **validation** features; all alphas at once per beta.

    Selection: among the settings within one standard error (``sqrt(p(1-p)/n)``) of the best accuracy,
    the one with the lowest cross-entropy (the best-calibrated mix of text and cache). That setting is
    kept only if it beats zero-shot CLIP (``alpha = 0``, the simplest model) on the same validation
    images by McNemar's test (McNemar 1947: ``(b - c)^2 / (b + c)`` with ``b`` images it fixes and ``c``
    it breaks, above :func:`mcnemar_critical` for 5 % Bonferroni-corrected over the grid's non-zero
    settings, 13.7 for the default grid); otherwise the cache is not shown to help and the smallest
    ``alpha`` in the grid is taken: zero-shot itself with the default grid, which starts at 0.

    Accuracy on a thousand images is noisy and the best of a grid is optimistic. Measured here: the
    plain argmax (the official code's rule, there on the test set) and an unpaired one-standard-error
    check (whose standard error is 0 at a validation accuracy of 1.0) kept settings that lost 1-3 test
    images per 1,000 to zero-shot where it was near perfect (shape); an uncorrected McNemar test (chi2
    4.0-5.5 for the chosen setting) kept settings on the shifted split that lost 2-6. The price of the correction is
    power: a gain of a few images per 1,000 is not used. Returns ``alpha``, ``beta``, ``accuracy``,
    ``zero_shot_accuracy``, ``cache_helps``, ``mcnemar`` (``fixed``, ``broken``, ``chi2``, ``critical``),
    ``grid`` (accuracies ``[len(betas), len(alphas)]``), ``nll`` (same shape), ``alphas`` and ``betas``.
    """
    if len(features) == 0:
        raise ValueError("the validation set is empty")
    labels = labels.to(features.device)
    zs = zero_shot_logits(features, classifier)
    aff = affinity(features, keys)
    a = torch.tensor(alphas, dtype=features.dtype, device=features.device).view(-1, 1, 1)
    acc = torch.empty(len(betas), len(alphas))
    nll = torch.empty(len(betas), len(alphas))
    for i, beta in enumerate(betas):
        fused = zs + a * cache_logits(aff, values, beta)  # [A, B, C]
        top = fused == fused.max(-1, keepdim=True).values  # ties split evenly, as in accuracy()
        acc[i] = (top.gather(-1, labels.expand(len(alphas), -1).unsqueeze(-1)).squeeze(-1) / top.sum(-1)).mean(-1).cpu()
        nll[i] = F.cross_entropy(fused.transpose(1, 2), labels.expand(len(alphas), -1), reduction="none").mean(-1).cpu()
    best = float(acc.max())
    se = math.sqrt(best * (1 - best) / len(labels))
    score = torch.where(acc >= best - se - 1e-9, -nll, torch.tensor(-math.inf))
    i, j = divmod(int(score.argmax()), len(alphas))
    fixed, broken = _discordant(zs + alphas[j] * cache_logits(aff, values, betas[i]), zs, labels)
    chi2 = (fixed - broken) ** 2 / max(fixed + broken, 1)
    critical = mcnemar_critical(sum(a > 0 for a in alphas) * len(betas))
    cache_helps = fixed > broken and chi2 > critical
    if not cache_helps:  # the smallest alpha, at its best-calibrated beta
        j = int(torch.tensor(alphas).argmin())
        i = int(nll[:, j].argmin())
    return {"alpha": float(alphas[j]), "beta": float(betas[i]), "accuracy": float(acc[i, j]),
            "zero_shot_accuracy": accuracy(zs, labels), "cache_helps": cache_helps,
            "mcnemar": {"fixed": fixed, "broken": broken, "chi2": round(chi2, 3), "critical": round(critical, 3)},
            "grid": acc, "nll": nll,
            "alphas": list(alphas), "betas": list(betas)}


def finetune_keys(cache: TipCache, views: torch.Tensor, labels: torch.Tensor, classifier: torch.Tensor,
                  val_feats: torch.Tensor, val_labels: torch.Tensor, alpha: float = 1.0, beta: float = 1.0,
                  epochs: int = 20, lr: float = 1e-3, eps: float = 1e-4, batch_size: int = 256,
                  seed: int = 0) -> tuple[torch.Tensor, dict]:
    """Tip-Adapter-F: train the cache keys (a linear layer initialised from the cache), values and text frozen.

    AdamW (lr 1e-3, eps 1e-4), cosine schedule over all steps, 20 epochs, cross-entropy on the fused
    logits at fixed ``alpha``/``beta``. ``views`` ``[V, N, D]`` are the features of the ``N`` support
    images' augmented views (``labels`` ``[N]``); each epoch sees every support image once, in one of
    its views drawn at random, as the official code sees one fresh augmentation per image per epoch.
    After every epoch the keys are scored on the validation set and the best ones (the initial cache
    included) are returned, as in the official code, but selected on validation, not test.
    A plain loop rather than :func:`labkit.core.train.fit`: a few hundred cached features, the paper's
    optimiser settings and per-epoch model selection, no image stream, no DDP, no checkpoints.
    """
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0 to fine-tune the keys (at alpha={alpha:g} the cache gets no gradient)")
    if views.dim() != 3 or views.shape[1] != len(labels):
        raise ValueError(f"views must be [n_views, n_images, dim] with one label per image, got views "
                         f"{tuple(views.shape)} and {len(labels)} labels")
    gen = torch.Generator().manual_seed(seed)
    keys = torch.nn.Parameter(cache.keys.clone())
    opt = torch.optim.AdamW([keys], lr=lr, eps=eps)
    n_views, n_images = views.shape[:2]
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * math.ceil(n_images / batch_size))
    values, labels = cache.values, labels.to(views.device)

    def val_acc(k):
        with torch.no_grad():
            return accuracy(tip_logits(val_feats, classifier, k, values, alpha, beta), val_labels)

    best_acc, best_keys, curve = val_acc(keys), keys.detach().clone(), []
    for _ in range(epochs):
        view = torch.randint(n_views, (n_images,), generator=gen).to(views.device)  # one view per image
        for idx in torch.randperm(n_images, generator=gen).to(views.device).split(batch_size):
            logits = tip_logits(views[view[idx], idx], classifier, keys, values, alpha, beta)
            loss = F.cross_entropy(logits, labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        acc = val_acc(keys)
        curve.append({"loss": loss.item(), "val_accuracy": acc})
        if acc > best_acc:
            best_acc, best_keys = acc, keys.detach().clone()
    return best_keys, {"curve": curve, "best_val_accuracy": best_acc}


def linear_probe(train_feats: torch.Tensor, train_labels: torch.Tensor, val_feats: torch.Tensor,
                 val_labels: torch.Tensor, n_classes: int, weight_decays=(1e-4, 1e-3, 1e-2, 1e-1),
                 iters: int = 100) -> tuple[torch.nn.Linear, dict]:
    """Linear-probe CLIP (the baseline in the CLIP and Tip-Adapter papers): multinomial logistic
    regression on frozen features, full-batch L-BFGS, L2 strength chosen on validation."""
    labels = train_labels.to(train_feats.device)
    best = (-1.0, None, None)
    for wd in weight_decays:
        torch.manual_seed(0)
        probe = torch.nn.Linear(train_feats.shape[1], n_classes).to(train_feats.device)
        opt = torch.optim.LBFGS(probe.parameters(), lr=1.0, max_iter=iters, line_search_fn="strong_wolfe")

        def closure(probe=probe, opt=opt, wd=wd):
            opt.zero_grad()
            loss = F.cross_entropy(probe(train_feats), labels) + wd * probe.weight.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            acc = accuracy(probe(val_feats), val_labels)
        if acc > best[0]:
            best = (acc, probe, wd)
    return best[1], {"val_accuracy": best[0], "weight_decay": best[2]}
