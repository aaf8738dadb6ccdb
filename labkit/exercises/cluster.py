"""Self-checks for the Cluster Masking exercises (Wei, Pan & Owens, "Efficient Vision-Language Pre-training by
Cluster Masking", CVPR 2024, §3.1).

References: :func:`labkit.masking.similarity_matrix`, :func:`labkit.masking.normalized_patches` and the
diagnostics of :func:`labkit.masking.cluster_keep_indices` (anchors, scores, cluster members, the exact-ratio mask).
"""

from __future__ import annotations

import numpy as np
import torch

from .. import masking
from .. import toyworld as tw
from .core import CheckResult, as_tensor, expect, expect_close, expect_shape, run_check


def _toy_images(n: int, seed: int = 0) -> torch.Tensor:
    """``n`` ToyWorld scenes as float ``[n, 3, 64, 64]``."""
    world = tw.ToyWorld("test", seed=seed, size=n)
    return torch.from_numpy(np.stack([world.scene(i).render() for i in range(n)])).permute(0, 3, 1, 2).float()


def _flat_patches_image() -> torch.Tensor:
    """A 16x16 image of 4x4 patches: noise, one flat grey patch and one flat red patch."""
    image = torch.rand(1, 3, 16, 16)
    image[..., :4, :4] = 0.5  # flat grey: no structure at all
    image[:, 0, 4:8, :4], image[:, 1:, 4:8, :4] = 0.9, 0.1  # flat red: one colour, still a pattern over channels
    return image


def check_patch_similarity(student_fn) -> CheckResult:
    """``patch_similarity(images, patch_size)``: ``[B, N, N]`` cosine similarity of per-patch normalised pixels."""
    def case(label, images, patch):
        def run():
            got = as_tensor(student_fn(images, patch), "the similarity matrix")
            expected = masking.similarity_matrix(images, patch)
            expect_shape(got, expected.shape, "the similarity matrix",
                         "one row and one column per patch, patches in raster order (row by row)")
            expect(not torch.isnan(got).any(), "the similarity matrix contains NaN",
                   "a flat grey patch has zero spread: give it a zero vector instead of dividing by zero")
            expect_close(got, expected, "the similarity matrix",
                         "normalise each patch's whole C·p·p pixel vector (centre it, scale it), make it unit length, "
                         "and keep the patches in raster order", atol=1e-4)
        return label, run

    toy = _toy_images(3)
    cases = [case("3 ToyWorld scenes, 8 px patches", toy, 8), case("1 scene, 16 px patches", toy[:1], 16),
             case("noise with a flat grey and a flat red patch", _flat_patches_image(), 4),
             case("a non-square 8x16 image", torch.rand(2, 3, 8, 16), 4)]
    return run_check("patch_similarity", cases,
                     "patch_similarity(images [B, C, H, W], patch_size) returns a tensor [B, N, N]")


def _cluster_reference(images, patch, ratio, anchor_ratio, threshold, fill="random", seed=0):
    gen = torch.Generator().manual_seed(seed)
    _, diag = masking.cluster_keep_indices(images, patch, ratio, anchor_ratio=anchor_ratio, threshold=threshold,
                                           fill=fill, generator=gen, return_diagnostics=True)
    return diag


def check_cluster_members(student_fn) -> CheckResult:
    """``cluster_members(patches, anchors, threshold)``: bool ``[B, N]``, True where a patch joins an anchor's cluster."""
    def case(label, images, patch, anchor_ratio, threshold):
        def run():
            diag = _cluster_reference(images, patch, 0.5, anchor_ratio, threshold)
            patches = masking.normalized_patches(images, patch)
            got = as_tensor(student_fn(patches, diag["anchors"], threshold), "the membership mask")
            expect_shape(got, diag["member"].shape, "the membership mask", "one True/False per patch of every image")
            expect(got.dtype == torch.bool, f"the membership mask has dtype {got.dtype}", "return a boolean mask")
            near = (diag["score"] - threshold).abs() < 1e-4  # rounding may go either way on the threshold itself
            wrong = (got != diag["member"]) & ~near
            anchors_in = got.gather(1, diag["anchors"]).all()
            expect(anchors_in, "an anchor is not a member of its own cluster",
                   "an anchor always belongs to its cluster, even when it has no pixel structure")
            expect(not wrong.any(), f"membership is wrong for {int(wrong.sum())} of {wrong.numel()} patches",
                   "a patch joins when its similarity to *any* of its own image's anchors is above the threshold")
        return label, run

    toy = _toy_images(4)
    grey = torch.full((2, 3, 32, 32), 0.5)
    cases = [case("4 ToyWorld scenes, 3 anchors each", toy, 8, 0.05, masking.DEFAULT_THRESHOLD),
             case("1 scene, one anchor", toy[:1], 8, 0.01, masking.DEFAULT_THRESHOLD),
             case("threshold above 1: anchors only", toy[:2], 8, 0.05, 1.5),
             case("threshold below -1: every patch", toy[:2], 8, 0.05, -1.5),
             case("all-grey images", grey, 8, 0.1, masking.DEFAULT_THRESHOLD)]
    return run_check("cluster_members", cases,
                     "cluster_members(patches [B, N, D], anchors [B, A], threshold) returns a bool tensor [B, N]")


def check_exact_ratio_mask(student_fn) -> CheckResult:
    """``exact_ratio_mask(score, ratio)``: per image, mask exactly ``N - num_keep(N, ratio)`` patches, highest scores first."""
    def case(label, images, patch, ratio):
        def run():
            diag = _cluster_reference(images, patch, ratio, 0.05, masking.DEFAULT_THRESHOLD, fill="similarity")
            score, n = diag["score"], diag["score"].shape[1]
            got = as_tensor(student_fn(score.clone(), ratio), "the mask")
            expect_shape(got, score.shape, "the mask", "one True (masked) / False (kept) per patch of every image")
            expect(got.dtype == torch.bool, f"the mask has dtype {got.dtype}", "return a boolean mask, True = masked")
            counts, expected = got.sum(1), n - masking.num_keep(n, ratio)
            expect((counts == expected).all(), f"images have {counts.tolist()} masked patches, every one should have "
                   f"{expected}", "the count is per image: N minus the kept count of FLIP's num_keep")
            if expected == 0:
                return
            inf = torch.full_like(score, float("inf"))
            lowest_masked = torch.where(got, score, inf).min(1).values
            highest_kept = torch.where(got, -inf, score).max(1).values
            expect((lowest_masked >= highest_kept - 1e-3).all(), "a kept patch scores higher than a masked one",
                   "each image gets its own threshold: mask the patches most similar to an anchor")
            expect_close(lowest_masked, diag["threshold_per_image"], "the per-image threshold (lowest masked score)",
                         "each image gets its own threshold: mask the patches most similar to an anchor", atol=1e-3)
        return label, run

    toy = _toy_images(4, seed=1)
    cases = [case("4 scenes, ratio 0.5", toy, 8, 0.5), case("4 scenes, ratio 0.75", toy, 8, 0.75),
             case("1 scene, ratio 0.3", toy[:1], 8, 0.3), case("2 scenes, ratio 0", toy[:2], 8, 0.0),
             case("2 scenes, 16 px patches, ratio 0.9", toy[:2], 16, 0.9)]
    return run_check("exact_ratio_mask", cases, "exact_ratio_mask(score [B, N], ratio) returns a bool tensor [B, N]")
