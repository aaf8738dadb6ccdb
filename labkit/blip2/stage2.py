"""BLIP-2 stage 2: bootstrapping a frozen language model from the Q-Former (BLIP-2, ICML 2023, §3.3, Figure 3).

The Q-Former's query outputs ``[B, Q, D]`` go through one ``Linear(D -> LM hidden)`` and are
prepended to the frozen LM's input embeddings as *soft visual prompts*. Only the Q-Former's
query path and that projection train; the image encoder and the LM stay frozen, and no loss is
ever taken on a prompt position.

- **Decoder-only** (OPT): ``[prompts; prefix; suffix]`` in one causal sequence, loss on the suffix
  (the caption, or the answer after a question prefix).
- **Encoder-decoder** (FlanT5 in the paper, a tiny T5 here): ``[prompts; prefix]`` in the encoder,
  the suffix in the decoder.

The LMs are ``transformers`` models built from tiny configs (never downloaded); the lab's
"pretrained LLM" is a tiny LM first trained on ToyWorld text alone (:mod:`labkit.blip2.train`), so
it can already answer a question from a caption before it ever sees an image.
"""

from __future__ import annotations

import torch
from torch import nn

from labkit.blip2.lm import TextBatch, lm_generate, lm_hidden, lm_kind_of, lm_loss
from labkit.blip2.qformer import QFormer, QFormerConfig
from labkit.blip2.stage1 import frozen_image_features


class Blip2Stage2(nn.Module):
    """Frozen image encoder -> Q-Former queries -> ``Linear`` -> frozen LM (§3.3, Figure 3).

    ``forward(images, text)`` returns the LM loss of ``text.suffix`` given the visual prompts and
    ``text.prefix``; ``images`` go through the frozen ``image_encoder`` or, without one, are taken
    to be its features ``[B, N, encoder_width]`` already.

    ``text_conditioned=False`` is §3.3: the queries alone make the prompts, and the Q-Former's
    text-only parts (word and position embeddings, text FFNs) are unused and frozen, as LAVIS
    removes them. ``text_conditioned=True`` is BLIP-2's VQA set-up (§4.3, Figure 7): the prompt text
    (the question; ``<sot>`` for a caption) also enters the Q-Former, where it meets the queries in
    self-attention (the ITM layout), so the queries can fetch what the question asks about; the
    text parts are then trained too.
    """

    def __init__(self, config: QFormerConfig, lm: nn.Module, image_encoder: nn.Module | None = None,
                 qformer: QFormer | None = None, text_conditioned: bool = False):
        super().__init__()
        self.lm_kind = lm_kind_of(lm)
        self.qformer = qformer if qformer is not None else QFormer(config)
        self.config = self.qformer.config
        self.text_conditioned = text_conditioned
        self.proj = nn.Linear(self.config.hidden, lm_hidden(lm))
        self.lm = lm.requires_grad_(False).eval()
        self.image_encoder = image_encoder
        if image_encoder is not None:
            image_encoder.requires_grad_(False).eval()
        if not text_conditioned:
            for module in (self.qformer.word_embeddings, self.qformer.position_embeddings,
                           *(layer.ffn_text for layer in self.qformer.layers)):
                module.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.lm.eval()  # frozen: no dropout
        if self.image_encoder is not None:
            self.image_encoder.eval()
        return self

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        return frozen_image_features(self.image_encoder, images)

    def prompts(self, images: torch.Tensor, prefix_ids: torch.Tensor | None = None,
                prefix_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Soft visual prompts ``[B, Q, LM hidden]``: projected query outputs (text-conditioned: given the prefix)."""
        feats = self.image_features(images)
        if not self.text_conditioned:
            return self.proj(self.qformer(feats).query)
        if prefix_ids is None:
            raise ValueError("a text-conditioned Q-Former needs the prompt text (prefix_ids)")
        return self.proj(self.qformer(feats, prefix_ids, prefix_mask, mode="itm").query)

    def forward(self, images: torch.Tensor, text: TextBatch) -> torch.Tensor:
        return lm_loss(self.lm, self.prompts(images, text.prefix_ids, text.prefix_mask), text)

    @torch.no_grad()
    def generate(self, images: torch.Tensor, prefix_ids: torch.Tensor, prefix_mask: torch.Tensor,
                 max_new_tokens: int, eos_id: int) -> torch.Tensor:
        return lm_generate(self.lm, self.prompts(images, prefix_ids, prefix_mask), prefix_ids, prefix_mask,
                           max_new_tokens, eos_id)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Only what stage 2 trains (query path + projection): what its checkpoint ships."""
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}
