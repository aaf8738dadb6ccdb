"""Self-checks for the FLIP exercises (Li et al., "Scaling Language-Image Pre-training via Masking", CVPR 2023, §3).

References: :func:`labkit.masking.num_keep`, :func:`labkit.masking.random_keep_indices`,
:func:`labkit.masking.keep_to_mask`, :class:`labkit.masking.PatchMasking` (open_clip's hook),
:func:`labkit.masking.kept_token_fraction` and :func:`labkit.masking_bench.amdahl_ideal`.
"""

from __future__ import annotations

import torch

from .. import masking
from ..masking_bench import amdahl_ideal
from .core import CheckResult, as_tensor, expect, expect_close, expect_shape, run_check


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
