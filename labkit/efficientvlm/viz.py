"""Plots for EfficientVLM: the layer map, distillation curves, gate heatmaps, the learned modality split,
and the speed/accuracy curve. Pure functions of records and models; each returns its figure."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from labkit.efficientvlm.distill import layer_map
from labkit.efficientvlm.model import MODALITIES

MODALITY_COLORS = {"vision": "tab:blue", "text": "tab:orange", "fusion": "tab:green"}


def show_layer_map(depths: dict[str, tuple[int, int]]):
    """For each modality (teacher layers, student layers): which teacher output each student output learns from."""
    fig, axes = plt.subplots(1, len(depths), figsize=(4 * len(depths), 3.6), squeeze=False)
    for ax, (modality, (t, s)) in zip(axes[0], depths.items()):
        hidden, attention = layer_map(t, s)
        ax.scatter(np.zeros(t + 1), np.arange(t + 1), s=60, color="0.6", zorder=3)
        ax.scatter(np.ones(s + 1), np.arange(s + 1) * t / s, s=60, color=MODALITY_COLORS.get(modality, "k"), zorder=3)
        for i, j in enumerate(hidden):
            ax.plot([1, 0], [i * t / s, j], color="tab:purple", lw=1.5, label="hidden state" if i == 0 else None)
        for i, j in enumerate(attention):  # attention of student layer i+1 (output i+1) <- teacher layer j+1
            ax.plot([1, 0], [(i + 0.5) * t / s, j + 0.5], color="tab:red", ls="--", lw=1.2,
                    label="attention scores" if i == 0 else None)
        ax.set_xticks([0, 1], [f"teacher ({t} layers)", f"student ({s})"])
        ax.set_yticks(range(t + 1), ["emb"] + [f"L{k}" for k in range(1, t + 1)])
        ax.set_xlim(-0.4, 1.4)
        ax.set_title(f"{modality}: k = {t // s}")
    axes[0][0].legend(loc="upper left", fontsize=8)
    fig.suptitle("EfficientVLM layer map: student state i <- teacher i*k, attention i <- teacher i*k + k - 1")
    fig.tight_layout()
    return fig


def show_curves(curve: list[dict], keys: list[str], title: str = "training curves", smooth: int = 10):
    """Loss components over steps (a moving average of ``smooth`` steps)."""
    fig, ax = plt.subplots(figsize=(8, 3.6))
    steps = np.array([r["step"] for r in curve])
    for key in keys:
        values = np.array([r[key] for r in curve if key in r], dtype=float)
        if len(values) == 0:
            continue
        k = max(1, min(smooth, len(values)))
        ax.plot(steps[k - 1:len(values)], np.convolve(values, np.ones(k) / k, mode="valid"), label=key)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    return fig


def _site_matrix(gates: dict, modality: str, kind: str):
    rows = [gates[name] for name in sorted(gates, key=_site_order) if name.startswith(modality + ".") and name.endswith(kind)]
    return [np.asarray(r, dtype=float) for r in rows]


def _site_order(name: str):
    modality, layer, kind = name.split(".")
    return MODALITIES.index(modality), int(layer), kind


def show_gates(gates: dict, title: str = "gates (P(open) or deterministic value)"):
    """Heads as a layer x head heatmap per modality and site; FFN units kept per layer as bars."""
    panels = [(m, k) for m in MODALITIES for k in ("attn", "cross") if _site_matrix(gates, m, k)]
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(2.6 * len(panels) + 4.5, 3.2))
    for ax, (modality, kind) in zip(axes, panels):
        matrix = np.stack(_site_matrix(gates, modality, kind))
        ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_title(f"{modality} {'cross-' if kind == 'cross' else 'self-'}attn", fontsize=9)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(matrix.shape[1]))
        ax.set_yticks(range(matrix.shape[0]))
    ax = axes[-1]
    labels, kept, x = [], [], 0
    for modality in MODALITIES:
        for row in _site_matrix(gates, modality, "ffn"):
            kept.append(row.mean())
            labels.append(f"{modality[0]}{len([lab for lab in labels if lab[0] == modality[0]])}")
            ax.bar(x, row.mean(), color=MODALITY_COLORS[modality])
            x += 1
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_title("FFN units kept (mean gate)", fontsize=9)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def show_gate_evolution(snapshots: list[tuple[int, dict]]):
    """Mean P(open) of every site (rows) over pruning steps (columns): which parts go first."""
    names = sorted(snapshots[0][1], key=_site_order)
    matrix = np.array([[float(np.mean(np.asarray(s[name]))) for _, s in snapshots] for name in names])
    fig, ax = plt.subplots(figsize=(8, 0.22 * len(names) + 1.5))
    im = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xticks(range(len(snapshots)), [str(step) for step, _ in snapshots], fontsize=7, rotation=90)
    ax.set_xlabel("pruning step")
    ax.set_title("gate P(open) per site over pruning")
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    return fig


def show_modality_split(history: list[dict]):
    """Expected sparsity of each modality and overall against the warmed-up target: the learned split."""
    fig, ax = plt.subplots(figsize=(7, 3.4))
    steps = [r["step"] for r in history]
    for modality in MODALITIES:
        key = f"sparsity_{modality}"
        if key in history[0]:
            ax.plot(steps, [r[key] for r in history], color=MODALITY_COLORS[modality], label=modality)
    ax.plot(steps, [r["expected_sparsity"] for r in history], color="k", label="overall (expected)")
    ax.plot(steps, [r["target"] for r in history], color="k", ls=":", label="target (warmed up)")
    ax.set_xlabel("pruning step")
    ax.set_ylabel("expected sparsity")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("modal-adaptive pruning: one global target, a learned split")
    fig.tight_layout()
    return fig


def show_speed_accuracy(points: dict[str, tuple[float, float, float]], sweep: list[dict] | None = None):
    """Speedup over the teacher against retention (metric / teacher's) on ITM and retrieval.

    ``points``: ``{name: (speedup, itm_retention, retrieval_retention)}`` (e.g. the student and pruned
    models); ``sweep``: optional rows of ``labkit eval efficient``'s ``sweep`` (``target``, ``speedup``,
    ``retention_itm``, ``retention_retrieval``), drawn as a line per metric.
    """
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, marker in (("retention_itm", "o"), ("retention_retrieval", "s")):
        rows = sorted(sweep or [], key=lambda r: r["target"])
        if rows:
            ax.plot([r["speedup"] for r in rows], [r[key] for r in rows], marker=marker, label=f"sweep: {key[10:]}")
            for r in rows:
                ax.annotate(f"t={r['target']}", (r["speedup"], r[key]), fontsize=7, textcoords="offset points",
                            xytext=(4, 4))
    for name, (speedup, itm, retrieval) in points.items():
        ax.scatter(speedup, itm, marker="o", label=f"{name} (ITM)", zorder=3)
        ax.scatter(speedup, retrieval, marker="s", label=f"{name} (retrieval)", zorder=3)
    ax.scatter([1.0], [1.0], marker="D", color="0.3", label="teacher")
    ax.axhline(0.95, color="0.5", ls=":", lw=1)
    ax.axvline(2.0, color="0.5", ls=":", lw=1)
    ax.set_xlabel("inference speedup over the teacher")
    ax.set_ylabel("retention (metric / teacher's)")
    ax.legend(fontsize=7)
    ax.set_title("EfficientVLM on ToyWorld: speed vs accuracy")
    fig.tight_layout()
    return fig
