"""Pure plotting functions for FLIP (CVPR 2023) and Cluster Masking (CVPR 2024).

Every function takes arrays/tensors and returns a matplotlib ``Figure`` (or draws on a given
``Axes``); nothing trains or samples here, so notebooks' sliders and tests can call them freely.
Images are ``[H, W, 3]`` uint8 or float in [0, 1]; masks are per-patch booleans ``[N]`` in
row-major patch order (True = dropped).
"""

from __future__ import annotations

import numpy as np
import torch
from matplotlib import pyplot as plt
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from labkit.data import toyworld as tw

STRATEGY_COLORS = {"none": "#555555", "random": "#1f77b4", "cluster": "#d62728"}
CHANCE = {"zero_shot_shape_acc": 1 / len(tw.BASE_SHAPES), "zero_shot_color_acc": 1 / len(tw.COLORS)}


def _chance_line(ax, level: float) -> None:
    ax.axhline(level, color="0.5", linestyle=":", linewidth=1, label=f"chance ({level:.3g})")


def _np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def to_display(image) -> np.ndarray:
    """``[H, W, 3]`` float in [0, 1] from uint8 HWC, float HWC or a ``[3, H, W]`` tensor."""
    img = _np(image)
    if img.ndim == 3 and img.shape[0] == 3 and img.shape[-1] != 3:
        img = img.transpose(1, 2, 0)
    img = img.astype(np.float32)
    if img.max() > 1.0:
        img = img / 255.0
    return np.clip(img, 0, 1)


def _grid(image: np.ndarray, patch_size: int) -> tuple[int, int]:
    h, w = image.shape[:2]
    if h % patch_size or w % patch_size:
        raise ValueError(f"image size {h}x{w} is not divisible by the patch size {patch_size}")
    return h // patch_size, w // patch_size


def _patch_map(values, grid: tuple[int, int], patch_size: int) -> np.ndarray:
    """Per-patch values ``[N]`` -> a per-pixel map ``[H, W]``."""
    v = _np(values).reshape(grid)
    return np.kron(v, np.ones((patch_size, patch_size)))


def draw_patch_grid(ax, image, patch_size: int, color: str = "white", title: str | None = None):
    """The image with its patch grid (what the ViT's patchify sees)."""
    img = to_display(image)
    gh, gw = _grid(img, patch_size)
    ax.imshow(img)
    for i in range(1, gh):
        ax.axhline(i * patch_size - 0.5, color=color, lw=0.6)
    for j in range(1, gw):
        ax.axvline(j * patch_size - 0.5, color=color, lw=0.6)
    ax.set_title(title or f"{gh}x{gw} patches of {patch_size} px")
    ax.axis("off")
    return ax


def draw_mask(ax, image, masked, patch_size: int, title: str | None = None, topped_up=None,
              anchors=None, shade: float = 0.1):
    """The image with dropped patches washed out to light grey; top-up patches hatched; anchors as stars."""
    img = to_display(image)
    grid = _grid(img, patch_size)
    m = _patch_map(_np(masked).astype(np.float32), grid, patch_size)[..., None]
    light = np.full_like(img, 0.93)
    ax.imshow(img * (1 - m) + (shade * img + (1 - shade) * light) * m)
    if topped_up is not None:
        t = _np(topped_up).reshape(grid)
        for i, j in zip(*np.nonzero(t)):
            ax.add_patch(plt.Rectangle((j * patch_size - 0.5, i * patch_size - 0.5), patch_size, patch_size,
                                       fill=False, hatch="///", edgecolor="#ffbf00", lw=0))
    if anchors is not None:
        _draw_anchors(ax, anchors, grid, patch_size)
    kept = int((~_np(masked).astype(bool)).sum())
    ax.set_title(title or f"kept {kept}/{grid[0] * grid[1]} patches")
    ax.axis("off")
    return ax


def _draw_anchors(ax, anchors, grid, patch_size):
    a = _np(anchors).reshape(-1)
    ys, xs = np.divmod(a, grid[1])
    ax.scatter(xs * patch_size + patch_size / 2 - 0.5, ys * patch_size + patch_size / 2 - 0.5, marker="*",
               s=140, c="yellow", edgecolors="black", linewidths=0.8, zorder=5)


def draw_similarity_matrix(ax, sim, anchors=None, title: str = "patch-to-patch cosine similarity"):
    """The ``[N, N]`` similarity matrix as a heatmap; anchor rows marked."""
    s = _np(sim)
    im = ax.imshow(s, cmap="viridis", vmin=-1, vmax=1)
    if anchors is not None:
        for a in _np(anchors).reshape(-1):
            ax.axhline(a, color="red", lw=0.8)
    ax.set_xlabel("patch")
    ax.set_ylabel("patch")
    ax.set_title(title)
    plt.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return ax


def draw_anchor_similarity(ax, image, score, anchors, patch_size: int, threshold: float | None = None,
                           title: str | None = None):
    """Each patch's max similarity to an anchor, over the image; the patches above ``threshold`` (the
    cluster members) outlined and hatched in cyan, one box per patch."""
    img = to_display(image)
    grid = _grid(img, patch_size)
    s = np.clip(_np(score).astype(np.float32), -1, 1)
    ax.imshow(img)
    im = ax.imshow(_patch_map(s, grid, patch_size), cmap="magma", vmin=-1, vmax=1, alpha=0.65)
    above = np.flatnonzero(s > threshold) if threshold is not None else []
    for j in above:
        r, c = divmod(int(j), grid[1])
        ax.add_patch(Rectangle((c * patch_size - 0.5, r * patch_size - 0.5), patch_size, patch_size, fill=False,
                               edgecolor="cyan", hatch="//", linewidth=0.8))
    _draw_anchors(ax, anchors, grid, patch_size)
    members = f" (> {threshold:g}, hatched cyan: {len(above)} of {s.size} patches)" if threshold is not None else ""
    ax.set_title(title or "similarity to the nearest anchor" + members, fontsize=9)
    ax.axis("off")
    plt.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return ax


def draw_clusters(ax, image, membership, member, anchors, patch_size: int, title: str | None = None):
    """Patches above the threshold coloured by their anchor; the rest left as they are."""
    img = to_display(image)
    grid = _grid(img, patch_size)
    memb = _np(membership).reshape(-1)
    on = _np(member).reshape(-1).astype(bool)
    n_anchors = len(_np(anchors).reshape(-1))
    palette = plt.get_cmap("tab10" if n_anchors <= 10 else "tab20")
    colors = np.array([palette(i % palette.N)[:3] for i in range(n_anchors)])
    overlay = np.zeros(grid + (3,), dtype=np.float32)
    overlay[on.reshape(grid)] = colors[memb[on]]
    a = _patch_map(on.astype(np.float32), grid, patch_size)[..., None] * 0.6
    color_map = np.kron(overlay, np.ones((patch_size, patch_size, 1)))
    ax.imshow(img * (1 - a) + color_map * a)
    _draw_anchors(ax, anchors, grid, patch_size)
    ax.set_title(title or f"clusters: {int(on.sum())} patches above the threshold")
    ax.axis("off")
    return ax


def cluster_steps_figure(image, diag: dict, patch_size: int, threshold: float, sim=None,
                         suptitle: str | None = None) -> Figure:
    """One image through cluster masking: anchors & similarity, clusters, the final exact-ratio mask.

    ``diag`` is the diagnostics dict of :func:`labkit.masking.cluster_keep_indices` for one image
    (index ``[b]`` already taken). With ``sim`` (``[N, N]``) a similarity-matrix panel is added.
    """
    panels = 4 if sim is not None else 3
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 4.2))
    i = 0
    if sim is not None:
        draw_similarity_matrix(axes[0], sim, diag["anchors"])
        i = 1
    draw_anchor_similarity(axes[i], image, diag["score"], diag["anchors"], patch_size, threshold)
    draw_clusters(axes[i + 1], image, diag["membership"], diag["member"], diag["anchors"], patch_size)
    n_top, n_trim = int(_np(diag["topped_up"]).sum()), int(_np(diag["trimmed"]).sum())
    draw_mask(axes[i + 2], image, diag["masked"], patch_size, topped_up=diag["topped_up"],
              anchors=diag["anchors"],
              title=f"final mask: {n_top} topped up (hatched), {n_trim} trimmed, "
                    f"t={float(_np(diag['threshold_per_image'])):.2f}")
    axes[i + 2].title.set_fontsize(9)
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return fig


def masks_grid_figure(images, masks: dict, patch_size: int, titles=None) -> Figure:
    """Rows = images, columns = ``{"random 0.5": masked [B, N], ...}``: the same images under each mask."""
    names = list(masks)
    n = len(images)
    fig, axes = plt.subplots(n, len(names) + 1, figsize=(2.6 * (len(names) + 1), 2.6 * n), squeeze=False)
    for r, img in enumerate(images):
        axes[r, 0].imshow(to_display(img))
        axes[r, 0].set_title(titles[r] if titles else "image", fontsize=9)
        axes[r, 0].axis("off")
        for c, name in enumerate(names):
            draw_mask(axes[r, c + 1], img, masks[name][r], patch_size, title=name)
            axes[r, c + 1].title.set_fontsize(9)
    fig.tight_layout()
    return fig


def throughput_figure(bench: dict) -> Figure:
    """Speedup over no masking per model and ratio: random vs cluster bars (whiskers: the middle half of the
    per-round speedups), naive and Amdahl ideals (for ``1 - r`` of the tokens, and for the ``(K + 1) / (N + 1)``
    that really remain)."""
    models = bench["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(5.2 * len(models), 4), squeeze=False)
    for ax, m in zip(axes[0], models):
        rows = [r for r in m["rows"] if r["ratio"] > 0]
        ratios = sorted({r["ratio"] for r in rows})
        x = np.arange(len(ratios))
        width = 0.35
        for k, strategy in enumerate(("random", "cluster")):
            picked = [next((r for r in rows if r["strategy"] == strategy and r["ratio"] == q), None) for q in ratios]
            vals = [r["speedup"] if r else np.nan for r in picked]
            # whiskers: the middle half of the per-round speedups (the machine's noise within the run)
            spread = np.array([[max(0.0, r["speedup"] - r["speedup_quartiles"][0]),
                                max(0.0, r["speedup_quartiles"][1] - r["speedup"])] if r else [0.0, 0.0]
                               for r in picked]).T
            bars = ax.bar(x + (k - 0.5) * width, vals, width, yerr=spread, capsize=3, label=strategy,
                          color=STRATEGY_COLORS[strategy])
            ax.bar_label(bars, fmt="%.2fx", fontsize=8)
        for j, q in enumerate(ratios):
            row = next(r for r in rows if r["ratio"] == q)
            ax.hlines(row["ideal"], j - 0.45, j + 0.45, colors="black", linestyles=":",
                      label="ideal 1/(1-r)" if j == 0 else None)
            ax.hlines(row["amdahl_ideal"], j - 0.45, j + 0.45, colors="green", linestyles="--",
                      label=f"Amdahl ideal (f={m['f_stem']:.2f})" if j == 0 else None)
            ax.hlines(row["amdahl_ideal_kept_tokens"], j - 0.45, j + 0.45, colors="purple", linestyles="-.",
                      label="Amdahl, tokens that remain" if j == 0 else None)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xticks(x, [f"ratio {q}" for q in ratios])
        ax.set_ylabel("training-step speedup over no masking")
        ax.set_ylim(0, 1.35 * max(r["ideal"] for r in rows))
        ax.set_title(f"{m['model']}: batch {m['batch']}, {m['image_size']} px", fontsize=10)
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle(f"vision tower fwd+bwd+{bench['optimizer']} on {bench['device']} ({bench['dtype']})")
    fig.tight_layout()
    return fig


def _run_style(run: dict) -> dict:
    """One look per study run: colour by strategy, dashed at ratio >= 0.7, hollow square markers after unmasked
    tuning."""
    tuned = run.get("unmasked_tuning", 0.0) > 0
    return {"color": STRATEGY_COLORS.get(run["masking"]), "linestyle": "--" if run["ratio"] >= 0.7 else "-",
            "marker": "s" if tuned else "o", "markerfacecolor": "white" if tuned else None,
            "label": run["run"].replace(":", " ").replace("+tuning", " + unmasked tuning")}


def accuracy_vs_time_figure(result: dict, metrics=("zero_shot_shape_acc", "retrieval_i2t_r1")) -> Figure:
    """Validation accuracy against training seconds for each study run (same wall-clock budget), with chance
    (1 / classes for zero-shot, 1 / the curve's ``curve_n`` scenes for retrieval R@1)."""
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.6 * len(metrics), 4.2), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        _chance_line(ax, CHANCE.get(metric, 1 / max(1, result["curve_n"])))
        for run in result["runs"]:
            xs = [0.0] + [p["train_seconds"] for p in run["curve"]]
            ys = [np.nan] + [p.get(metric, np.nan) for p in run["curve"]]
            ax.plot(xs, ys, **_run_style(run))
        ax.set_xlabel("training seconds")
        ax.set_ylabel(f"{metric} (validation)")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, handlelength=4, loc="center left", bbox_to_anchor=(1.0, 0.5))
    threads = result.get("threads")
    fig.suptitle(f"toy CLIP, same budget ({result['budget_s_per_variant']:g} s each"
                 + (f", {threads} CPU thread{'s' if threads != 1 else ''})" if threads else ")"))
    fig.tight_layout()
    return fig


def size_accuracy_figure(result: dict) -> Figure:
    """Zero-shot shape accuracy (test) by object size for each study run: what masking does to small objects."""
    runs = result["runs"]
    fig, ax = plt.subplots(figsize=(10, 3.8))
    _chance_line(ax, CHANCE["zero_shot_shape_acc"])
    x = np.arange(2)
    width = 0.8 / max(1, len(runs))
    for k, run in enumerate(runs):
        style = _run_style(run)
        vals = [run["shape_acc_small"], run["shape_acc_large"]]
        bars = ax.bar(x + (k - (len(runs) - 1) / 2) * width, vals, width, color=style["color"],
                      hatch="//" if run["ratio"] >= 0.7 else None, edgecolor="white",
                      alpha=0.55 if run.get("unmasked_tuning", 0.0) > 0 else 1.0, label=style["label"])
        ax.bar_label(bars, fmt="%.2f", fontsize=6.5)
    ax.set_xticks(x, ["small (12 px)", "large (18 px)"])
    ax.set_ylabel("zero-shot shape accuracy (test)")
    ax.set_ylim(0, 1.1)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return fig
