"""FLIP (Li et al., CVPR 2023) and Cluster Masking (Wei, Pan & Owens, CVPR 2024): cheaper CLIP pretraining
by dropping image patches.

``masks`` the method (keep indices, the open_clip hook), ``bench`` (``labkit bench masking``: step speedup),
``study`` (``labkit eval masking``: accuracy for the same wall-clock budget), ``openclip_train`` (scale-out
through open_clip's own trainer), ``viz``, ``exercises`` + ``exercise_notebooks`` (the classroom exercises)
and ``commands``.
"""

from labkit.masking.bench import bench_masking
from labkit.masking.masks import (
    PatchMasking,
    cluster_keep_indices,
    install,
    keep_to_mask,
    masking_hook,
    num_keep,
    random_keep_indices,
    set_ratio,
)
from labkit.masking.study import eval_masking

__all__ = ["PatchMasking", "bench_masking", "cluster_keep_indices", "eval_masking", "install", "keep_to_mask",
           "masking_hook", "num_keep", "random_keep_indices", "set_ratio"]
