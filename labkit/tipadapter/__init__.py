"""Tip-Adapter (Zhang et al., ECCV 2022): training-free few-shot adaptation of CLIP with a cache of
support features, and Tip-Adapter-F, which fine-tunes that cache.

``cache`` the method (keys, values, fused logits, the alpha/beta search, fine-tuning), ``eval``
(``labkit eval tip``: every method at 1-16 shots on five tasks), ``viz``, ``exercises`` +
``exercise_notebooks`` and ``commands``.
"""

from labkit.tipadapter.cache import TipCache, build_cache, finetune_keys, search_alpha_beta, tip_logits
from labkit.tipadapter.eval import evaluate_tip

__all__ = ["TipCache", "build_cache", "evaluate_tip", "finetune_keys", "search_alpha_beta", "tip_logits"]
