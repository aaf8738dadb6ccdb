"""Plots for Tip-Adapter: pure functions from tensors/dicts to matplotlib figures (no state, testable).

Figures are built with ``matplotlib.figure.Figure`` rather than pyplot, so nothing accumulates in
pyplot's global registry (the app draws from many threads) and no backend is needed.

Used by notebook 05, its ipywidgets sliders and the Gradio app.
"""

from __future__ import annotations

import numpy as np
import torch
from matplotlib.figure import Figure

METHOD_STYLE = {"tip_adapter": ("Tip-Adapter", "-o"), "tip_adapter_f": ("Tip-Adapter-F", "-s"),
                "linear_probe": ("linear probe", "--^")}


def _np(x) -> np.ndarray:
    return x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=float)


def cache_figure(keys, values, classnames, max_dims: int = 64) -> Figure:
    """The cache drawn: keys ``[M, D]`` (first ``max_dims`` dims, centred), one-hot values ``[M, C]`` and the
    key-key affinity matrix ``keys keys^T`` (blocks along the diagonal = classes the cache separates)."""
    k, v = _np(keys), _np(values)
    aff = k @ k.T
    k = k - k.mean(axis=0, keepdims=True)  # CLIP features share a large common direction; show what differs
    fig = Figure(figsize=(12, 3.6), layout="tight")
    axes = fig.subplots(1, 3, gridspec_kw={"width_ratios": [2.2, 1, 2]})
    axes[0].imshow(k[:, :max_dims], aspect="auto", cmap="RdBu_r", vmin=-np.abs(k).max(), vmax=np.abs(k).max())
    axes[0].set(title=f"keys − mean key: {k.shape[0]} supports × {k.shape[1]} dims", xlabel="feature dim",
                ylabel="support image")
    axes[1].imshow(v, aspect="auto", cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
    axes[1].set(title="values (one-hot)", xticks=range(len(classnames)))
    axes[1].set_xticklabels(classnames, rotation=60, fontsize=7)
    im = axes[2].imshow(aff, cmap="viridis")
    axes[2].set(title="affinity keys·keysᵀ", xlabel="support image", ylabel="support image")
    fig.colorbar(im, ax=axes[2], fraction=0.046)
    return fig


def support_grid_figure(images, labels, classnames, per_class: int = 4) -> Figure:
    """The support set: one row per class, ``per_class`` images (uint8 ``[N, 3, H, W]``)."""
    labels = _np(labels).astype(int)
    fig = Figure(figsize=(1.2 * per_class + 1, 1.2 * len(classnames)), layout="tight")
    axes = fig.subplots(len(classnames), per_class, squeeze=False)
    for c, row in enumerate(axes):
        idx = np.flatnonzero(labels == c)[:per_class]
        for j, ax in enumerate(row):
            ax.set_xticks([])
            ax.set_yticks([])
            if j < len(idx):
                ax.imshow(images[idx[j]].permute(1, 2, 0).cpu().numpy())
            else:
                ax.axis("off")
        row[0].set_ylabel(classnames[c], rotation=0, ha="right", va="center")
    return fig


def probabilities_figure(classnames, zero_shot, cache, fused, title: str = "") -> Figure:
    """Zero-shot, cache and fused class probabilities of one query, side by side."""
    fig = Figure(figsize=(11, 2.8), layout="tight")
    axes = fig.subplots(1, 3, sharey=True)
    x = np.arange(len(classnames))
    for ax, probs, name, color in zip(axes, (zero_shot, cache, fused), ("zero-shot CLIP", "cache vote", "fused"),
                                      ("tab:blue", "tab:orange", "tab:green"), strict=False):
        p = _np(probs)
        ax.bar(x, p, color=color)
        ax.bar(int(p.argmax()), p.max(), color=color, edgecolor="black", linewidth=2)
        ax.set(title=name, ylim=(0, 1), xticks=x)
        ax.set_xticklabels(classnames, rotation=45, ha="right", fontsize=8)
    axes[0].set_ylabel("probability")
    if title:
        fig.suptitle(title)
    return fig


def accuracy_vs_shots_figure(results: dict, title: str = "accuracy versus shots") -> Figure:
    """One panel per task: zero-shot (flat line), chance (dashed, when ``chance`` is given) and each few-shot
    method's accuracy per shot count.

    ``results`` maps a task name to ``labkit eval tip``'s per-task dict.
    """
    n = len(results)
    fig = Figure(figsize=(3.6 * n, 3.2), layout="tight")
    axes = fig.subplots(1, n, squeeze=False)
    for ax, (task, r) in zip(axes[0], results.items(), strict=False):
        for method, (label, style) in METHOD_STYLE.items():
            if method in r:
                shots = sorted(r[method], key=int)
                ax.plot([int(s) for s in shots], [r[method][s] for s in shots], style, label=label)
        ax.axhline(r["zero_shot"], color="grey", linestyle=":", label="zero-shot")
        if "chance" in r:
            ax.axhline(r["chance"], color="black", linestyle="--", linewidth=0.8, label="chance")
        ax.set(title=task, xscale="log", xlabel="shots per class", ylim=(0, 1.02))
        ax.set_xticks([1, 2, 4, 8, 16], labels=["1", "2", "4", "8", "16"])
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy")
    axes[0][0].legend(fontsize=8, loc="lower right")
    fig.suptitle(title)
    return fig


def alpha_beta_grid_figure(search: dict, title: str = "validation accuracy") -> Figure:
    """Heatmap of a :func:`labkit.tipadapter.search_alpha_beta` grid, the chosen cell marked."""
    grid = _np(search["grid"])
    fig = Figure(figsize=(7, 3.4), layout="tight")
    ax = fig.subplots()
    im = ax.imshow(grid, aspect="auto", origin="lower", cmap="magma")
    ax.set_xticks(range(0, len(search["alphas"]), 3), labels=[f"{a:g}" for a in search["alphas"][::3]], rotation=45)
    ax.set_yticks(range(len(search["betas"])), labels=[f"{b:g}" for b in search["betas"]])
    i, j = search["betas"].index(search["beta"]), search["alphas"].index(search["alpha"])
    ax.plot(j, i, "c*", markersize=14)
    ax.set(xlabel="alpha (cache weight)", ylabel="beta (sharpness)", title=title)
    fig.colorbar(im, ax=ax)
    return fig


def alpha_curves_figure(searches: dict, title: str = "validation accuracy versus alpha (best beta)") -> Figure:
    """The domain-gap lesson: per task, accuracy (max over beta) versus alpha, the chosen alpha marked."""
    fig = Figure(figsize=(7, 3.6), layout="tight")
    ax = fig.subplots()
    for task, s in searches.items():
        curve = _np(s["grid"]).max(axis=0)
        line, = ax.plot(s["alphas"], curve, "-", label=f"{task} (best alpha {s['alpha']:.3g})")
        ax.plot(s["alpha"], curve[s["alphas"].index(s["alpha"])], "*", color=line.get_color(), markersize=14)
    ax.set_xscale("symlog", linthresh=0.01)  # linear near 0, so alpha = 0 (zero-shot) is on the axis
    ax.set(xlabel="alpha (cache weight)", ylabel="validation accuracy", title=title, ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig
