"""BLIP-2 (Li et al., ICML 2023): a Q-Former bridges a frozen image encoder and a frozen language model.

``qformer`` the Q-Former, ``stage1`` (ITC + ITM + ITG, §3.2), ``stage2`` (soft prompts into the LM, §3.3),
``lm`` (the tiny ``transformers`` LMs: OPT-style and T5-style), ``data`` (ToyWorld batches and frozen
features), ``train`` (training, saving, loading), ``eval`` (exact captioning and VQA metrics, attention
maps), ``hf`` (equivalence with ``transformers`` and the real BLIP-2), ``viz``, ``exercises`` +
``exercise_notebooks`` and ``commands``.
"""

from labkit.blip2.qformer import QFormer, QFormerConfig
from labkit.blip2.stage1 import Blip2Stage1
from labkit.blip2.stage2 import Blip2Stage2
from labkit.blip2.train import load_or_train, load_stage1, load_stage2, load_text_lm, train_stage1, train_stage2

__all__ = ["Blip2Stage1", "Blip2Stage2", "QFormer", "QFormerConfig", "load_or_train", "load_stage1", "load_stage2",
           "load_text_lm", "train_stage1", "train_stage2"]
