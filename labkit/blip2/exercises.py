"""Self-checks for the BLIP-2 Q-Former exercises (Li et al., "BLIP-2", ICML 2023, §3.2, Figure 2).

References: :func:`labkit.blip2.itc_similarity`, :func:`labkit.blip2.qformer.attention_masks` (the ITG layout) and
:func:`labkit.blip2.sample_hard_negatives`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from labkit.blip2.qformer import attention_masks
from labkit.blip2.stage1 import itc_similarity, sample_hard_negatives
from labkit.exercises.checks import CheckResult, as_tensor, expect, expect_close, expect_shape, run_check


def check_itc_similarity(student_fn) -> CheckResult:
    """``itc_similarity(query_emb [B_img, Q, E], text_emb [B_txt, E])`` -> ``[B_img, B_txt]``."""
    def case(n_img, n_txt, n_query, dim):
        def run():
            query_emb = F.normalize(torch.randn(n_img, n_query, dim), dim=-1)
            text_emb = F.normalize(torch.randn(n_txt, dim), dim=-1)
            got = as_tensor(student_fn(query_emb, text_emb), "the similarity")
            expect_shape(got, (n_img, n_txt), "the similarity", "rows are images, columns are texts")
            expect_close(got, itc_similarity(query_emb, text_emb), "the similarity",
                         "compare every query of image i with text j, then keep one number per pair: the paper "
                         "lets the best-matching query speak for the image")
        return f"{n_img} images, {n_txt} texts, {n_query} queries, dim {dim}", run

    cases = [case(4, 4, 8, 16), case(3, 5, 2, 4), case(1, 1, 1, 8), case(2, 6, 32, 32)]
    return run_check("itc_similarity", cases,
                     "itc_similarity(query_emb [B_img, Q, E], text_emb [B_txt, E]) returns a tensor [B_img, B_txt]")


def check_itg_attention_mask(student_fn) -> CheckResult:
    """``itg_attention_mask(n_query, text_attention_mask [B, T])`` -> bool ``[B, 1, Q+T, Q+T]``, True = may attend."""
    def case(label, n_query, lengths, n_text):
        def run():
            text_mask = torch.arange(n_text)[None] < torch.tensor(lengths)[:, None]
            expected = attention_masks(n_query, text_mask, "itg")
            got = as_tensor(student_fn(n_query, text_mask.clone()), "the mask")
            expect_shape(got, expected.shape, "the mask",
                         "[batch, 1, Q+T, Q+T]: the size-1 axis broadcasts over heads; queries first, then text")
            expect(got.dtype == torch.bool, f"the mask has dtype {got.dtype}", "return a boolean mask, True = may attend")
            q = n_query
            blocks = [((slice(None, q), slice(q, None)), "queries attend to text",
                       "the queries must never see the text: everything the text needs passes through them"),
                      ((slice(None, q), slice(None, q)), "queries attending to queries is wrong",
                       "the queries see each other freely, as in every other layout"),
                      ((slice(q, None), slice(None, q)), "text attending to queries is wrong",
                       "every text token may read every query"),
                      ((slice(q, None), slice(q, None)), "text attending to text is wrong",
                       "a text token sees itself and the text before it (causal), and never a padded position")]
            for (rows, cols), what, hint in blocks:
                expect((got[..., rows, cols] == expected[..., rows, cols]).all(), what, hint)
        return label, run

    cases = [case("4 queries, 2 texts without padding", 4, [5, 5], 5),
             case("3 queries, padded texts", 3, [6, 2, 4], 6),
             case("1 query, 1 text token, batch 1", 1, [1], 1),
             case("32 queries, one fully padded text", 32, [0, 3], 3)]
    return run_check("itg_attention_mask", cases,
                     "itg_attention_mask(n_query, text_attention_mask [B, T]) returns a bool tensor [B, 1, Q+T, Q+T]")


_SKEWED_LOGITS = torch.tensor([[5.0, 2.0, 1.0, 0.0],  # each row: positive on the diagonal, negatives at 2, 1, 0
                               [2.0, 5.0, 0.0, 1.0],
                               [0.0, 1.0, 5.0, 2.0],
                               [1.0, 0.0, 2.0, 5.0]])


def _frequencies(sampler, logits: torch.Tensor, draws: int) -> torch.Tensor:
    """How often each column was drawn for each row, over ``draws`` calls."""
    counts = torch.zeros_like(logits)
    for _ in range(draws):
        picks = as_tensor(sampler(logits.clone()), "the negatives").long()
        counts[torch.arange(len(logits)), picks] += 1
    return counts / draws


def check_sample_hard_negatives(student_fn) -> CheckResult:
    """``sample_hard_negatives(logits [B, B])`` -> one column per row from softmax(row), never the diagonal (the positive)."""
    def shape_case(label, logits):
        def run():
            got = as_tensor(student_fn(logits.clone()), "the negatives")
            expect_shape(got, (len(logits),), "the negatives", "one negative (a column index) per row")
            expect(not got.is_floating_point() and got.dtype != torch.bool, f"the negatives have dtype {got.dtype}",
                   "column indices are integers")
            expect(((got >= 0) & (got < len(logits))).all(), "an index is outside the matrix", "pick a column of the row")
            expect((got != torch.arange(len(logits))).all(), "a row picked its own positive as a negative",
                   "the diagonal holds the matching pairs: rule it out before drawing")
        return label, run

    def never_positive():
        logits = torch.randn(6, 6) * 3
        picks = torch.stack([as_tensor(student_fn(logits.clone()), "the negatives") for _ in range(300)])
        expect((picks != torch.arange(6)).all(), "over 300 draws, some row picked its own positive",
               "the diagonal holds the matching pairs: rule it out before drawing")

    def distribution():
        draws = 1500
        got = _frequencies(student_fn, _SKEWED_LOGITS, draws)
        ref = _frequencies(sample_hard_negatives, _SKEWED_LOGITS, draws)
        gap = (got - ref).abs().max()
        expect(gap < 0.07, f"over {draws} draws the frequencies differ from the reference's by up to {gap:.2f}",
               "a hard negative is *sampled*, more similar texts more often, in proportion to softmax(similarity)")

    peaked = torch.zeros(3, 3).fill_diagonal_(200.0)
    cases = [shape_case("4x4 random similarities", torch.randn(4, 4)), shape_case("2x2: one candidate per row",
                                                                                   torch.randn(2, 2)),
             shape_case("the positive dominates (logit 200)", peaked),
             ("300 draws on a 6x6 matrix", never_positive), ("1500 draws on a skewed 4x4 matrix", distribution)]
    return run_check("sample_hard_negatives", cases,
                     "sample_hard_negatives(logits [B, B]) returns a LongTensor [B] of column indices; where the "
                     "positive dominates a row, the other probabilities underflow unless it is removed before the softmax")
