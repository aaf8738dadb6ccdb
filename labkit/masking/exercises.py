"""Self-checks for the FLIP exercises (Li et al., "Scaling Language-Image Pre-training via Masking", CVPR 2023,
§3) and the Cluster Masking exercises (Wei, Pan & Owens, "Efficient Vision-Language Pre-training by Cluster
Masking", CVPR 2024, §3.1).

References: :func:`labkit.masking.masks.num_keep`, :func:`labkit.masking.masks.random_keep_indices`,
:func:`labkit.masking.masks.keep_to_mask`, :class:`labkit.masking.masks.PatchMasking` (open_clip's hook),
:func:`labkit.masking.masks.kept_token_fraction`, :func:`labkit.masking.bench.amdahl_ideal`,
:func:`labkit.masking.masks.similarity_matrix`, :func:`labkit.masking.masks.normalized_patches` and the
diagnostics of :func:`labkit.masking.masks.cluster_keep_indices` (anchors, scores, cluster members, the
exact-ratio mask).
"""

from __future__ import annotations

import numpy as np
import torch

from labkit.data import toyworld as tw
from labkit.exercises.checks import CheckResult, as_tensor, expect, expect_close, expect_shape, run_check
from labkit.masking import masks as masking
from labkit.masking.bench import amdahl_ideal


def check_num_keep(student_fn) -> CheckResult:
    """``num_keep(n_patches, ratio)``: how many patch tokens FLIP keeps per image."""
    def case(n, ratio):
        def run():
            got, expected = student_fn(n, ratio), masking.num_keep(n, ratio)
            expect(isinstance(got, int), f"returned a {type(got).__name__}, not an int",
                   "a token count is a plain Python int")
            if ratio == 0:
                hint = "at ratio 0 nothing is dropped"
            elif n * (1 - ratio) < 1:
                hint = "a ViT needs at least one patch token, however high the ratio"
            else:
                hint = "the ratio is the share of patches *dropped*; fractional counts are cut off, not rounded"
            expect(got == expected, f"returned {got}, expected {expected}", hint)
        return f"N={n}, ratio {ratio}", run

    cases = [(64, 0.5), (49, 0.75), (196, 0.5), (64, 0.0), (64, 0.3), (50, 0.9), (10, 0.99), (1, 0.5)]
    return run_check("num_keep", [case(n, r) for n, r in cases],
                     "num_keep(n_patches, ratio) takes an int and a float in [0, 1) and returns an int")


def check_random_keep_indices(student_fn) -> CheckResult:
    """``random_keep_indices(batch, n_patches, ratio)``: sorted keep indices ``[batch, K]``, drawn per image."""
    def shape_case(batch, n, ratio):
        def run():
            keep = as_tensor(student_fn(batch, n, ratio), "the result")
            k = masking.num_keep(n, ratio)
            expect_shape(keep, (batch, k), "the result", "one row per image and K = num_keep(N, ratio) columns")
            expect(not keep.is_floating_point() and keep.dtype != torch.bool, f"indices have dtype {keep.dtype}",
                   "indices are integers (torch.long)")
            expect(keep.min() >= 0 and keep.max() < n, "some indices are outside [0, N)",
                   "index the N patch tokens only, the CLS token is not part of them")
            expect((keep[:, 1:] > keep[:, :-1]).all(), "a row is not strictly increasing",
                   "a patch is kept at most once, and the kept patches stay in raster order")
        return f"batch {batch}, N={n}, ratio {ratio}", run

    def independent_case():
        keep = as_tensor(student_fn(32, 16, 0.5), "the result")
        expect((keep != keep[:1]).any(), "every image in the batch got the same mask",
               "FLIP draws the noise per image, not once for the whole batch")

    def uniform_case():
        batch, n, ratio = 2000, 16, 0.75
        got = (~masking.keep_to_mask(as_tensor(student_fn(batch, n, ratio), "the result"), n)).float().mean(0)
        ref = (~masking.keep_to_mask(masking.random_keep_indices(batch, n, ratio), n)).float().mean(0)
        worst = int((got - ref).abs().argmax())
        expect((got - ref).abs().max() < 0.06,
               f"over {batch} images patch {worst} was kept {got[worst]:.0%} of the time, the reference keeps "
               f"every patch about {ref.mean():.0%} of the time",
               "every patch must be equally likely to survive: rank independent uniform noise")

    cases = [shape_case(4, 64, 0.5), shape_case(1, 49, 0.75), shape_case(3, 16, 0.0), shape_case(2, 10, 0.99),
             shape_case(5, 64, 0.3), ("32 images, N=16, ratio 0.5", independent_case),
             ("2000 images, N=16, ratio 0.75", uniform_case)]
    return run_check("random_keep_indices", cases,
                     "random_keep_indices(batch, n_patches, ratio) returns a LongTensor [batch, K]")


def check_gather_kept_tokens(student_fn) -> CheckResult:
    """``gather_kept_tokens(tokens, keep)``: ``[B, 1+N, D]`` -> ``[B, 1+K, D]``, the CLS token first."""
    def case(batch, n, dim, ratio):
        def run():
            tokens = torch.randn(batch, 1 + n, dim)
            hook = masking.PatchMasking("random", ratio, patch_size=1).train()
            expected = hook(tokens)
            keep = masking.random_keep_indices(batch, n, 0.0) if hook.last_keep is None else hook.last_keep
            got = as_tensor(student_fn(tokens, keep), "the result")
            k = keep.shape[1]
            shape_hint = ("the CLS token is never dropped: it comes first, then the K kept patches"
                          if tuple(got.shape) == (batch, k, dim) else "one output token per kept patch, plus CLS")
            expect_shape(got, (batch, 1 + k, dim), "the result", shape_hint)
            expect_close(got[:, 0], tokens[:, 0], "position 0 of the output", "position 0 must be the CLS token")
            expect_close(got, expected, "the kept patch tokens",
                         "keep indices count the patches from 0, *after* the CLS token, and every image has its own row")
        return f"batch {batch}, N={n}, D={dim}, ratio {ratio}", run

    cases = [case(4, 16, 8, 0.5), case(1, 49, 3, 0.75), case(3, 4, 2, 0.9), case(2, 8, 5, 0.0), case(6, 64, 4, 0.25)]
    return run_check("gather_kept_tokens", cases,
                     "gather_kept_tokens(tokens [B, 1+N, D], keep [B, K]) returns a tensor [B, 1+K, D]")


def check_ideal_speedup(student_fn) -> CheckResult:
    """``ideal_speedup(fixed_share, ratio, n_patches)``: Amdahl's bound for the tokens that really remain."""
    def case(fixed, ratio, n):
        def run():
            got = student_fn(fixed, ratio, n)
            expect(isinstance(got, (int, float)) and not isinstance(got, bool), f"returned a {type(got).__name__}",
                   "a speedup is a plain Python number")
            kept = masking.kept_token_fraction(n, ratio)
            expected = amdahl_ideal(fixed, kept)
            if abs(got - expected) <= 1e-9 * expected:
                return
            known_slips = [(1 / expected, "a speedup is the old step time over the new one"),
                           (amdahl_ideal(fixed, 1 - ratio),
                            "count the tokens that really remain: K is rounded down, and one token is never dropped"),
                           (amdahl_ideal(fixed, masking.num_keep(n, ratio) / n),
                            "the blocks see one more token than the kept patches"),
                           (1 / kept, "only the part of the step after the mask shrinks; the fixed share stays whole")]
            hint = next((h for value, h in known_slips if abs(got - value) <= 1e-9 * value),
                        "Amdahl: the fixed share stays whole, the rest shrinks with the share of tokens that remain")
            expect(False, f"returned {got:.6g}, expected {expected:.6g}", hint)
        return f"fixed share {fixed}, ratio {ratio}, N={n}", run

    cases = [(0.0, 0.0, 49), (0.0, 0.75, 49), (0.0, 0.5, 64), (0.0127, 0.75, 49), (0.094, 0.5, 64),
             (0.094, 0.75, 64), (0.3, 0.9, 196), (1.0, 0.75, 49)]
    return run_check("ideal_speedup", [case(*c) for c in cases],
                     "ideal_speedup(fixed_share, ratio, n_patches) takes two floats and an int and returns a float")


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
