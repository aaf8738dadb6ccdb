"""The checkpoints shipped inside the package: one registry, so every loader finds them the same way.

Each entry is a folder under ``labkit/assets/`` in the lab's checkpoint format
(:mod:`labkit.core.checkpoint`); its ``metadata.json`` records the command that trained it. Retraining
with that command (``labkit train ...``) writes the same folder again.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from labkit.core.checkpoint import ModelError

SHIPPED = {
    "toy_clip": "the toy CLIP every method shares (labkit train clip)",
    "blip2/stage1": "BLIP-2 stage 1: Q-Former trained with ITC + ITM + ITG (labkit train qformer --stage 1)",
    "blip2/lm_opt": "the frozen decoder-only LM, pretrained on ToyWorld text (labkit train qformer --stage lm --lm opt)",
    "blip2/lm_t5": "the frozen encoder-decoder LM, pretrained on ToyWorld text (labkit train qformer --stage lm --lm t5)",
    "blip2/stage2_opt": "BLIP-2 stage 2 into the OPT-style LM (labkit train qformer --stage 2 --lm opt)",
    "blip2/stage2_t5": "BLIP-2 stage 2 into the T5-style LM (labkit train qformer --stage 2 --lm t5)",
    "efficientvlm/teacher": "the EfficientVLM teacher, from the toy CLIP towers (labkit train teacher)",
    "efficientvlm/student": "the distilled half-depth student (labkit train student)",
    "efficientvlm/pruned": "the student after modal-adaptive L0 pruning (labkit train pruned)",
}


def asset_root() -> Path:
    """``labkit/assets`` inside the installed package."""
    return Path(str(resources.files("labkit") / "assets"))


def asset_dir(name: str) -> Path:
    """The folder of the shipped checkpoint ``name`` (a key of :data:`SHIPPED`), or :class:`ModelError`."""
    if name not in SHIPPED:
        raise ModelError(f"no shipped checkpoint {name!r}; shipped: {', '.join(SHIPPED)}")
    return asset_root() / name
