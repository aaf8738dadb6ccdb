"""The toy CLIP every method shares: ``model`` (``load_clip`` for the toy CLIP, open_clip tags and local
dirs; the conv stem), ``pretrain`` (contrastive pretraining on ToyWorld, with a hook for the vision tower),
``eval`` (zero-shot and retrieval), ``commands`` (``labkit train clip``, ``labkit eval clip``) and
``configs/`` (the toy CLIP's open_clip config)."""

from labkit.clip.eval import evaluate_clip, retrieval_eval, zero_shot_classifier, zero_shot_eval
from labkit.clip.model import ClipModel, load_clip
from labkit.clip.pretrain import new_toy_clip, train_toy_clip

__all__ = ["ClipModel", "evaluate_clip", "load_clip", "new_toy_clip", "retrieval_eval", "train_toy_clip",
           "zero_shot_classifier", "zero_shot_eval"]
