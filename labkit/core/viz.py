"""Plotting helpers shared by the notebooks and the app: pure functions that return matplotlib figures."""

from __future__ import annotations

import textwrap

import matplotlib.pyplot as plt
import numpy as np
import torch


def _as_hwc(image) -> np.ndarray:
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        image = image.permute(1, 2, 0).numpy() if image.ndim == 3 and image.shape[0] in (1, 3) else image.numpy()
    return np.asarray(image)


def show_images(images, titles=None, cols: int = 6, size: float = 2.0, wrap: int = 28):
    """A grid of images (uint8 HWC arrays or CHW tensors) with optional wrapped titles."""
    images = list(images)
    rows = max(1, int(np.ceil(len(images) / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * size, rows * size * (1.35 if titles else 1.0)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, image in enumerate(images):
        ax = axes.flat[i]
        ax.imshow(_as_hwc(image), interpolation="nearest")
        if titles is not None:
            ax.set_title("\n".join(textwrap.wrap(str(titles[i]), wrap)), fontsize=7)
    fig.tight_layout()
    return fig


def show_confusion(pred, labels, classnames, title: str = "", ax=None):
    """Row-normalised confusion matrix (true class on rows)."""
    n = len(classnames)
    pred, labels = np.asarray(pred), np.asarray(labels)
    counts = np.zeros((n, n))
    np.add.at(counts, (labels, pred), 1)
    matrix = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(0.5 * n + 2, 0.5 * n + 1.5))
    ax.imshow(matrix, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), classnames, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), classnames, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    accuracy = float((pred == labels).mean()) if len(labels) else 0.0
    ax.set_title(f"{title} (accuracy {accuracy:.2f})")
    for i in range(n):
        for j in range(n):
            if matrix[i, j] >= 0.05:
                ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if matrix[i, j] > 0.5 else "black")
    return fig or ax.figure


def show_retrieval(images, captions, similarity, queries=(0, 1, 2, 3), k: int = 3):
    """For a few images, the top-``k`` captions by similarity; the true caption is marked with a check."""
    similarity = torch.as_tensor(similarity)
    fig, axes = plt.subplots(len(queries), 2, figsize=(9, 1.9 * len(queries)),
                             gridspec_kw={"width_ratios": [1, 4]}, squeeze=False)
    for row, q in enumerate(queries):
        axes[row, 0].imshow(_as_hwc(images[q]), interpolation="nearest")
        axes[row, 0].axis("off")
        top = similarity[q].topk(k)
        lines = [f"{'✓' if int(j) == q else '✗'} {float(s):.2f}  {captions[int(j)]}" for s, j in zip(top.values, top.indices)]
        axes[row, 1].text(0, 0.5, "\n".join(textwrap.shorten(t, 95) for t in lines), va="center", fontsize=8,
                          family="monospace")
        axes[row, 1].axis("off")
    fig.tight_layout()
    return fig


def show_curve(records, x: str, ys, title: str = "", ax=None, xlabel: str | None = None):
    """Line plot of metrics ``ys`` against ``x`` from a list of dicts (e.g. training evals)."""
    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(6, 3.5))
    for y in ys:
        ax.plot([r[x] for r in records], [r[y] for r in records], marker="o", label=y)
    ax.set_xlabel(xlabel or x)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig or ax.figure
