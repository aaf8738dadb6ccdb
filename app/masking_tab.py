"""The masking tab: random (FLIP) versus cluster masks (Cluster Masking, CVPR 2024) on one image, live.

A student picks a real photo (or a ToyWorld scene, or uploads one), a mask ratio, an anchor ratio and a
similarity threshold, and sees the random mask next to the cluster mask at the same ratio, the cluster
algorithm step by step (the figures of notebook 02), the kept-token count and the ideal encoder speedup for
that ratio. All method logic is :mod:`labkit.masking.masks`; figures are :mod:`labkit.masking.viz`.
"""

from __future__ import annotations

import math

import gradio as gr
import torch
from matplotlib.figure import Figure

from labkit.data import toyworld as tw
from labkit.masking import masks, viz
from labkit.masking.photos import PHOTO_NAMES, photo

from .common import CONCURRENCY, problem
from .uploads import load_image, to_tensor

TOY_SCENES = tuple(f"ToyWorld scene {i}" for i in range(4))
CHOICES = (*PHOTO_NAMES, *TOY_SCENES, "My image (upload)")
PHOTO_SIZE = 224  # photos and uploads, as photo() draws them
PATCH = {"photo": 16, "toy": 8}  # 224 px photos: ViT-B-16's 14x14 grid; 64 px scenes: the toy CLIP's 8x8
WHERE = "masking tab"


def load_choice(choice: str, upload) -> tuple[torch.Tensor, int, str]:
    """``(float image [3, H, W], patch size, title)`` of the chosen image; ValueError for a bad choice or file."""
    if choice in PHOTO_NAMES:
        return photo(choice, PHOTO_SIZE), PATCH["photo"], choice
    if choice in TOY_SCENES:
        scene = tw.ToyWorld("test", seed=0, size=len(TOY_SCENES)).scene(TOY_SCENES.index(choice))
        return torch.from_numpy(scene.render().copy()).permute(2, 0, 1).float() / 255, PATCH["toy"], scene.caption()
    if choice == CHOICES[-1]:
        if not upload:
            raise ValueError("upload an image first (or pick a photo)")
        return to_tensor(load_image(upload), PHOTO_SIZE).float() / 255, PATCH["photo"], "your image"
    raise ValueError(f"unknown image {choice!r}; pick one of {', '.join(CHOICES)}")


def check_threshold(threshold: float) -> float:
    threshold = float(threshold)
    if not -1.0 <= threshold <= 1.0 or math.isnan(threshold):
        raise ValueError(f"the similarity threshold is a cosine similarity in [-1, 1], got {threshold}")
    return threshold


def compare(image: torch.Tensor, patch: int, ratio: float, anchor_ratio: float, threshold: float, seed: int = 0) -> dict:
    """Random and cluster keep indices of one image at ``ratio``, the cluster diagnostics and the token counts."""
    ratio, anchor_ratio = masks.check_ratio(ratio), masks.check_anchor_ratio(anchor_ratio)
    threshold = check_threshold(threshold)
    n = (image.shape[-1] // patch) * (image.shape[-2] // patch)
    gen = torch.Generator().manual_seed(int(seed))
    random_keep = masks.random_keep_indices(1, n, ratio, generator=gen)
    cluster_keep, diag = masks.cluster_keep_indices(image[None], patch, ratio, anchor_ratio=anchor_ratio,
                                                    threshold=threshold, generator=gen, return_diagnostics=True)
    k = masks.num_keep(n, ratio)
    return {"n_patches": n, "kept": k, "kept_token_fraction": masks.kept_token_fraction(n, ratio),
            "anchors": masks.num_anchors(n, anchor_ratio),
            "random": masks.keep_to_mask(random_keep, n)[0], "cluster": masks.keep_to_mask(cluster_keep, n)[0],
            "diag": {key: v[0] for key, v in diag.items()}}


def side_by_side_figure(image: torch.Tensor, patch: int, result: dict, title: str) -> Figure:
    fig = Figure(figsize=(10.5, 3.7), layout="tight")
    axes = fig.subplots(1, 3)
    axes[0].imshow(viz.to_display(image))
    axes[0].set_title(title if len(title) < 40 else title[:37] + "...", fontsize=9)
    axes[0].axis("off")
    for ax, kind in zip(axes[1:], ("random", "cluster"), strict=True):
        viz.draw_mask(ax, image, result[kind], patch, title=f"{kind}: kept {result['kept']}/{result['n_patches']}")
    return fig


def summary(result: dict, ratio: float) -> str:
    n, k, frac = result["n_patches"], result["kept"], result["kept_token_fraction"]
    return (f"Mask ratio {ratio:.2f}: **{k} of {n} patches kept** ({result['anchors']} anchors), {k + 1} of {n + 1} "
            f"tokens with CLS. Ideal speedup of the image encoder: **{1 / frac:.2f}x** (its cost is linear in the "
            "tokens for the MLPs; attention's quadratic part gains more) — the same for both strategies, which differ "
            "in *which* patches survive: random keeps a bit of everything, cluster drops whole similar regions.")


def on_masks(choice, upload, ratio, anchor_ratio, threshold, seed):
    """Update: side-by-side masks, cluster steps and the token summary; on bad input a message and nothing stale."""
    try:
        image, patch, title = load_choice(choice, upload)
        result = compare(image, patch, ratio, anchor_ratio, threshold, seed)
    except Exception as e:  # noqa: BLE001 - every failure becomes a message, never a traceback
        return None, None, problem(e, WHERE)
    steps = viz.cluster_steps_figure(image, result["diag"], patch, float(threshold))
    return side_by_side_figure(image, patch, result, title), steps, summary(result, float(ratio))


INTRO = """## Masking: random (FLIP) versus cluster masks
FLIP drops a random share of the image patches before the ViT; Cluster Masking picks a few random **anchor** patches
and drops every patch whose (per-patch normalised) pixels are similar to an anchor, so whole regions go at once.
Both keep exactly the same number of patches; pick an image, a ratio, an anchor ratio and a threshold.
"""


def build_tab() -> None:
    gr.Markdown(INTRO)
    with gr.Row():
        with gr.Column(scale=1, min_width=260):
            choice = gr.Dropdown(list(CHOICES), value="chelsea", label="Image", elem_id="mask-image")
            upload = gr.File(label="My image (choose 'My image (upload)')", file_types=["image"],
                             elem_id="mask-upload", height=110)
            ratio = gr.Slider(0.0, 0.95, value=0.5, step=0.05, label="mask ratio (share of patches dropped)",
                              elem_id="mask-ratio")
            anchor = gr.Slider(0.01, 0.3, value=masks.DEFAULT_ANCHOR_RATIO, step=0.01, label="anchor ratio",
                               elem_id="mask-anchor")
            threshold = gr.Slider(-0.2, 1.0, value=masks.DEFAULT_THRESHOLD, step=0.02,
                                  label="similarity threshold", elem_id="mask-threshold")
            seed = gr.Number(0, precision=0, label="seed", elem_id="mask-seed")
            btn = gr.Button("Mask", variant="primary", elem_id="mask-btn")
        with gr.Column(scale=3):
            info = gr.Markdown(elem_id="mask-info")
            pair = gr.Plot(show_label=False, elem_id="mask-pair")
            steps = gr.Plot(show_label=False, elem_id="mask-steps")
    inputs = [choice, upload, ratio, anchor, threshold, seed]
    btn.click(on_masks, inputs, [pair, steps, info], api_name="masks", concurrency_limit=CONCURRENCY)
    for slider in (ratio, anchor, threshold):
        slider.release(on_masks, inputs, [pair, steps, info], api_name=False, trigger_mode="always_last",
                       concurrency_limit=CONCURRENCY)
