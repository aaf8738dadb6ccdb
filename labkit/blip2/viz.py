"""Plots for the BLIP-2 notebook (BLIP-2, ICML 2023): pure functions that take arrays and return matplotlib figures."""

from __future__ import annotations

import textwrap

import matplotlib.pyplot as plt
import numpy as np
import torch

from labkit.core.viz import _as_hwc


def show_query_attention(image, maps, title: str = "", cols: int | None = None, size: float = 1.5, alpha: float = 0.65,
                         labels: list[str] | None = None):
    """Each query's cross-attention over the image: one panel per query, the map (``[Q, g, g]``) upsampled over the picture.

    ``labels`` titles the panels (default ``query 0``, ``query 1``, ...).

    All panels share one colour scale whose top is at least 4× the uniform weight ``1/g²``: a
    query attending uniformly (as at initialisation) stays dim, a focused one lights up. The first
    panel is the image itself.
    """
    maps = torch.as_tensor(maps).float().detach().cpu()
    image = _as_hwc(image)
    h, w = image.shape[:2]
    n = maps.shape[0] + 1
    if cols is None:
        rows = 2 if n <= 18 else int(np.ceil(n / 11))
        cols = int(np.ceil(n / rows))
    rows = int(np.ceil(n / cols))
    uniform = 1.0 / maps[0].numel()
    top = max(float(maps.max()), 4 * uniform)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * size, rows * size + (0.5 if title else 0)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    axes.flat[0].imshow(image, interpolation="nearest")
    axes.flat[0].set_title("image", fontsize=7)
    for q, m in enumerate(maps):
        ax = axes.flat[q + 1]
        ax.imshow(image, interpolation="nearest")
        ax.imshow(m.numpy(), cmap="inferno", alpha=alpha, extent=(0, w, h, 0), interpolation="bilinear", vmin=0, vmax=top)
        ax.set_title(labels[q] if labels else f"query {q}", fontsize=7)
    fig.suptitle(f"{title}\n(shared colour scale: top = {top / uniform:.1f}× the uniform weight 1/{maps[0].numel()})",
                 fontsize=9)
    fig.tight_layout()
    return fig


def show_mask_layouts(masks: dict, n_query: int, tokens: list[str] | None = None, size: float = 3.6):
    """The stage-1 self-attention layouts (§3.2, Figure 2) side by side: rows attend to columns, white = may attend."""
    fig, axes = plt.subplots(1, len(masks), figsize=(size * len(masks), size + 0.6), squeeze=False)
    for ax, (mode, mask) in zip(axes[0], masks.items()):
        mask = torch.as_tensor(mask).bool().cpu().numpy()
        length = mask.shape[-1]
        ax.imshow(mask, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.axhline(n_query - 0.5, color="tab:red", lw=1)
        ax.axvline(n_query - 0.5, color="tab:red", lw=1)
        labels = [f"Q{i}" for i in range(n_query)] + (tokens or [f"T{i}" for i in range(length - n_query)])
        ax.set_xticks(range(length), labels[:length], rotation=90, fontsize=6)
        ax.set_yticks(range(length), labels[:length], fontsize=6)
        ax.set_title(mode.upper(), fontsize=10)
        ax.set_xlabel("attended (keys)", fontsize=8)
    axes[0, 0].set_ylabel("attending (queries/text)", fontsize=8)
    fig.tight_layout()
    return fig


def show_loss_curves(curves: dict, title: str = "", logy: bool = True, ax=None):
    """Training losses: ``{name: [{"step": s, "loss": l}, ...]}`` (or lists of ``(step, loss)``), one line each."""
    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(6.5, 3.5))
    for name, points in curves.items():
        pts = [(p["step"], p["loss"]) if isinstance(p, dict) else tuple(p) for p in points]
        if pts:
            ax.plot(*zip(*pts), label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if logy:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig or ax.figure


def show_qa_curve(points: list[dict], chance: float | None = None, ax=None):
    """The text-only LM's colour/shape QA accuracy from the true caption over training, against ``chance``."""
    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(6.5, 3.5))
    if points:
        ax.plot([p["step"] for p in points], [p["lm_vqa_from_caption_color_shape"] for p in points], "o-",
                label="text-only LM, QA from the caption")
    if chance is not None:
        ax.axhline(chance, color="gray", ls="--", label=f"colour/shape of a random object ({chance:.2f})")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("step")
    ax.set_ylabel("accuracy (colour, shape)")
    ax.set_title("binding: which colour goes with which shape")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return fig or ax.figure


def show_generations(images, truths: list[str], preds: list[str], cols: int = 4, size: float = 2.2, wrap: int = 36):
    """Images with the ground truth (black) and the model's text (green when identical, red otherwise) under each."""
    images = list(images)
    rows = int(np.ceil(len(images) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * size * 1.25, rows * (size + 0.9)), squeeze=False,
                             gridspec_kw={"hspace": 0.6, "wspace": 0.25})
    for ax in axes.flat:
        ax.axis("off")
    for i, image in enumerate(images):
        ax = axes.flat[i]
        ax.imshow(_as_hwc(image), interpolation="nearest")
        truth = ax.text(0.5, -0.03, "\n".join(textwrap.wrap("truth: " + truths[i], wrap)), transform=ax.transAxes,
                        ha="center", va="top", fontsize=6.5)
        ax.annotate("\n".join(textwrap.wrap("model: " + preds[i], wrap)), xy=(0.5, 0), xycoords=truth, xytext=(0, -2),
                    textcoords="offset points", ha="center", va="top", fontsize=6.5,
                    color="tab:green" if truths[i] == preds[i] else "tab:red")
    fig.subplots_adjust(left=0.02, right=0.98, top=0.97, bottom=0.08)
    return fig
