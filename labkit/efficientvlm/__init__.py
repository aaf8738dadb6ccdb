"""EfficientVLM (Wang et al., ACL Findings 2023): distil a VLM into half its depth, then prune it with
learned hard-concrete L0 gates to one global sparsity, split between modalities as it learns.

``model`` the ToyWorld VLM (X-VLM layout), ``train`` (the teacher's pretraining objectives), ``distill``
(layer map and distillation losses, §3.1), ``prune`` (L0 gates, the Lagrangian, finalize, §3.2), ``eval``
(accuracy, size, measured speedup), ``viz``, ``exercises`` + ``exercise_notebooks`` and ``commands``.
"""

from labkit.efficientvlm.distill import layer_map, train_student
from labkit.efficientvlm.model import ToyVLM, VLMConfig, load_efficient, load_vlm, save_vlm
from labkit.efficientvlm.prune import Gates, finalize, prune_student, recover_pruned
from labkit.efficientvlm.train import train_teacher

__all__ = ["Gates", "ToyVLM", "VLMConfig", "finalize", "layer_map", "load_efficient", "load_vlm", "prune_student",
           "recover_pruned", "save_vlm", "train_student", "train_teacher"]
