"""Self-checks for the Tip-Adapter exercises (Zhang et al., "Tip-Adapter", ECCV 2022, §3.1-3.2, eq. 3-6).

References: :func:`labkit.clip.zero_shot_classifier`, :func:`labkit.tipadapter.affinity`,
:func:`labkit.tipadapter.cache_logits` and :func:`labkit.tipadapter.tip_logits`.
"""

from __future__ import annotations

import zlib

import torch
import torch.nn.functional as F

from labkit.clip.eval import zero_shot_classifier
from labkit.exercises.checks import CheckResult, as_tensor, expect, expect_close, expect_shape, run_check
from labkit.tipadapter import cache as tipadapter


class HashTextEncoder:
    """A stand-in for a CLIP text tower: ``encode_text(texts)`` gives each string a fixed random unit vector."""

    def __init__(self, dim: int = 16):
        self.dim = dim

    def encode_text(self, texts, normalize: bool = True) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        feats = torch.stack([torch.randn(self.dim, generator=torch.Generator().manual_seed(zlib.crc32(t.encode())))
                             for t in texts])
        return F.normalize(feats, dim=-1) if normalize else feats


def _cache(n_query: int, n_classes: int, shots: int, dim: int = 32):
    """Unit query features ``[B, D]``, unit keys ``[C*K, D]`` and one-hot values ``[C*K, C]``."""
    features = F.normalize(torch.randn(n_query, dim), dim=-1)
    keys = F.normalize(torch.randn(n_classes * shots, dim), dim=-1)
    values = F.one_hot(torch.arange(n_classes).repeat_interleave(shots), n_classes).float()
    return features, keys, values


def check_cache_logits(student_fn) -> CheckResult:
    """``cache_logits(features, keys, values, beta)`` -> ``[B, C]``: exp(-beta(1 - f·keysᵀ)) · values."""
    def case(label, n_query, n_classes, shots, beta):
        def run():
            features, keys, values = _cache(n_query, n_classes, shots)
            got = as_tensor(student_fn(features, keys, values, beta), "the cache logits")
            expected = tipadapter.cache_logits(tipadapter.affinity(features, keys), values, beta)
            expect_shape(got, expected.shape, "the cache logits",
                         "one score per query and class: the affinities to the N·K keys are turned into class votes "
                         "through the one-hot values")
            expect_close(got, expected, "the cache logits",
                         "the affinity is a cosine (features and keys are unit vectors); beta sharpens the *distance* "
                         "1 - cosine inside the exponential, so an identical key contributes exactly 1")
        return label, run

    cases = [case("5 queries, 3 classes, 4 shots, beta 1", 5, 3, 4, 1.0),
             case("1 query, 10 classes, 1 shot, beta 5.5", 1, 10, 1, 5.5),
             case("beta 0: every key votes 1", 4, 3, 2, 0.0),
             case("8 queries, 2 classes, 16 shots, beta 0.5", 8, 2, 16, 0.5)]
    return run_check("cache_logits", cases,
                     "cache_logits(features [B, D], keys [M, D], values [M, C], beta) returns a tensor [B, C]")


def check_tip_logits(student_fn) -> CheckResult:
    """``tip_logits(features, classifier, keys, values, alpha, beta)`` -> ``[B, C]``: 100·f·W_cᵀ + alpha·cache logits."""
    def case(label, n_query, n_classes, shots, alpha, beta, hint):
        def run():
            features, keys, values = _cache(n_query, n_classes, shots)
            classifier = F.normalize(torch.randn(n_classes, features.shape[1]), dim=-1)
            got = as_tensor(student_fn(features, classifier, keys, values, alpha, beta), "the fused logits")
            expected = tipadapter.tip_logits(features, classifier, keys, values, alpha, beta)
            expect_shape(got, expected.shape, "the fused logits", "one logit per query and class")
            expect_close(got, expected, "the fused logits", hint, atol=1e-4)
        return label, run

    zero_shot = ("with alpha = 0 the cache term vanishes and only zero-shot CLIP is left: cosine similarities times "
                 "CLIP's logit scale of 100")
    roles = ("alpha weighs the whole cache term, beta only sharpens the affinities inside the exponential; "
             "the zero-shot term keeps its own scale")
    cases = [case("alpha 0: zero-shot CLIP only", 3, 4, 2, 0.0, 1.0, zero_shot),
             case("alpha 1, beta 1", 5, 3, 4, 1.0, 1.0, roles),
             case("alpha 3, beta 0.5", 5, 3, 4, 3.0, 0.5, roles),
             case("alpha 0.5, beta 7, 1 query, 1 shot", 1, 6, 1, 0.5, 7.0, roles)]
    return run_check("tip_logits", cases,
                     "tip_logits(features, classifier, keys, values, alpha, beta) returns a tensor [B, C]")


def check_zero_shot_classifier(student_fn) -> CheckResult:
    """``zero_shot_classifier(clip, classnames, templates)`` -> ``W_c`` ``[C, D]``: one unit row per class."""
    def case(label, classnames, templates):
        def run():
            encoder = HashTextEncoder()
            got = as_tensor(student_fn(encoder, classnames, templates), "the classifier")
            expected = zero_shot_classifier(encoder, classnames, templates)
            expect_shape(got, expected.shape, "the classifier", "one row per class name, as wide as a text feature")
            norms = got.float().norm(dim=-1)
            expect(torch.allclose(norms, torch.ones_like(norms), atol=1e-4),
                   f"row norms are {[round(float(n), 3) for n in norms]}",
                   "each class row must be unit length, like the image features it is compared with")
            expect_close(got, expected, "the classifier",
                         "fill every template with the class name, encode, and average the prompts of *that* class "
                         "only (all its templates)", atol=1e-4)
        return label, run

    cases = [case("3 classes, 4 templates", ("circle", "square", "star"),
                  ("a {}", "a picture of a {}", "there is a {}", "a small {}")),
             case("a single class", ("hexagon",), ("a {}", "a photo of a {}")),
             case("5 classes, 1 template", ("red", "green", "blue", "white", "black"), ("a {} shape",)),
             case("2 classes, 3 templates", ("one object", "two objects"), ("{}", "a picture of {}", "{}: a shape"))]
    return run_check("zero_shot_classifier", cases,
                     "zero_shot_classifier(clip, classnames, templates) calls clip.encode_text(list of strings) "
                     "and returns a tensor [C, D]")
