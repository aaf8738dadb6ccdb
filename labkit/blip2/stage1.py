"""BLIP-2 stage 1: vision-language representation learning from a frozen image encoder (BLIP-2, ICML 2023, §3.2).

Three objectives share one Q-Former and differ only in the self-attention mask
(:func:`labkit.blip2.qformer.attention_masks`), summed as in the paper and LAVIS:

- **ITC** (image-text contrastive): each of the Q query outputs is compared with the text
  [CLS] output; the image-text similarity is the *maximum* over queries; a learnable
  temperature (init 0.07) scales a symmetric cross-entropy with label smoothing 0.1, as in
  LAVIS. Uni-modal mask. The temperature is kept in [0.001, 0.5] by clamping the parameter in
  place under ``no_grad`` before each use, as ALBEF and BLIP do, so its gradient is never cut off;
  LAVIS's released BLIP-2 stage-1 code does not clamp it at all.
- **ITM** (image-text matching): a binary classifier (``itm_head``, hidden -> 2) on every query
  output, logits averaged over queries, trained on the positives plus one hard negative text
  per image and one hard negative image per text, drawn from softmax(similarity) with the
  positive masked out (ALBEF/BLIP hard-negative mining). Bi-directional mask.
- **ITG** (image-grounded text generation): the first text token becomes [DEC] and a causal
  LM loss is taken on the text, which sees all queries but the queries never see the text,
  so everything the text needs must pass through the queries. Multimodal causal mask; BERT's LM
  head, tied to the word embeddings by default; label smoothing 0.1 as in LAVIS.

The image encoder, when given, is frozen: it runs in eval mode under ``no_grad`` whatever
mode the module is in, so gradients reach only the Q-Former and the heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from labkit.blip2.qformer import QFormer, QFormerConfig


def frozen_image_features(image_encoder: nn.Module | None, images: torch.Tensor) -> torch.Tensor:
    """Features of the frozen image encoder, computed without gradients (``None``: ``images`` are features)."""
    if image_encoder is None:
        return images
    with torch.no_grad():
        return image_encoder(images)


def itc_similarity(query_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """Image-text similarity ``[B_img, B_txt]``: max over queries of ``query_emb[i, q] · text_emb[j]`` (§3.2, ITC).

    Both inputs are expected L2-normalised (``[B_img, Q, E]`` and ``[B_txt, E]``), making this a cosine.
    """
    return torch.einsum("iqe,je->ijq", query_emb, text_emb).amax(dim=-1)


def itc_loss(sim: torch.Tensor, temperature: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Symmetric InfoNCE on a square similarity matrix whose diagonal holds the matching pairs."""
    logits = sim / temperature
    target = torch.arange(sim.shape[0], device=sim.device)
    return (F.cross_entropy(logits, target, label_smoothing=label_smoothing)
            + F.cross_entropy(logits.t(), target, label_smoothing=label_smoothing)) / 2


@torch.no_grad()
def sample_hard_negatives(logits: torch.Tensor, exclude: torch.Tensor | None = None,
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """One negative column per row, drawn from ``softmax(logits[row])`` with the diagonal (the positive) removed.

    ``exclude`` (boolean, same shape) removes more candidates, e.g. pairs whose captions are
    identical. Returns ``LongTensor [rows]``; a row with no candidate left raises ``ValueError``.
    """
    rows, cols = logits.shape
    if rows != cols or rows < 2:
        raise ValueError(f"hard negatives need a square similarity matrix of at least 2×2, got {tuple(logits.shape)}")
    banned = torch.eye(rows, dtype=torch.bool, device=logits.device)
    if exclude is not None:
        banned = banned | exclude.to(device=logits.device, dtype=torch.bool)
    if banned.all(dim=1).any():
        raise ValueError("a row has no candidate negative left (every other item is excluded)")
    probs = torch.softmax(logits.float().masked_fill(banned, float("-inf")), dim=1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


class _LMHead(nn.Module):
    """BERT's LM prediction head: dense -> GELU -> LayerNorm -> decoder (optionally tied to the word embeddings)."""

    def __init__(self, config: QFormerConfig, tied_embedding: nn.Embedding | None):
        super().__init__()
        self.dense = nn.Linear(config.hidden, config.hidden)
        self.norm = nn.LayerNorm(config.hidden, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(config.hidden, config.vocab_size)
        if tied_embedding is not None:
            self.decoder.weight = tied_embedding.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(F.gelu(self.dense(hidden))))


@dataclass
class Stage1Output:
    """``loss = itc + itm + itg`` (§3.2) and the pieces, plus the ITC similarity matrix [B_img, B_txt]."""

    loss: torch.Tensor
    itc: torch.Tensor
    itm: torch.Tensor
    itg: torch.Tensor
    sim_i2t: torch.Tensor


class Blip2Stage1(nn.Module):
    """Q-Former + projection and task heads for BLIP-2 stage 1 (§3.2), optionally with its frozen image encoder.

    ``forward(images, text_ids, text_attention_mask=None)``: ``images`` go through the frozen
    ``image_encoder`` (any module returning ``[B, N, encoder_width]`` features) or, without one,
    are taken to be those features already (e.g. cached patch tokens). ``text_ids`` start with a
    [CLS]-like token (ToyWorld's ``<sot>``); ITG replaces it by ``dec_token_id``.
    """

    def __init__(self, config: QFormerConfig, dec_token_id: int, embed_dim: int = 256,
                 image_encoder: nn.Module | None = None, tie_lm_head: bool = True, label_smoothing: float = 0.1):
        super().__init__()
        if not 0 <= dec_token_id < config.vocab_size:
            raise ValueError(f"dec_token_id {dec_token_id} outside the vocabulary [0, {config.vocab_size})")
        self.config, self.dec_token_id, self.label_smoothing = config, dec_token_id, label_smoothing
        self.qformer = QFormer(config)
        self.vision_proj = nn.Linear(config.hidden, embed_dim)
        self.text_proj = nn.Linear(config.hidden, embed_dim)
        self.itm_head = nn.Linear(config.hidden, 2)
        self.lm_head = _LMHead(config, self.qformer.word_embeddings if tie_lm_head else None)
        self.temp = nn.Parameter(torch.tensor(0.07))
        self.image_encoder = image_encoder
        if image_encoder is not None:
            image_encoder.requires_grad_(False).eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.image_encoder is not None:
            self.image_encoder.eval()  # frozen: no dropout, no BatchNorm statistics updates
        return self

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        return frozen_image_features(self.image_encoder, images)

    def _project(self, out) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """L2-normalised ITC embeddings: every query output ``[B, Q, E]`` and the text [CLS] output ``[B, E]``."""
        query = None if out.query is None else F.normalize(self.vision_proj(out.query), dim=-1)
        text = None if out.text is None else F.normalize(self.text_proj(out.text[:, 0]), dim=-1)
        return query, text

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, Q, E]`` query embeddings for retrieval (the queries alone: no text involved)."""
        return self._project(self.qformer(self.image_features(images)))[0]

    def text_embeddings(self, text_ids: torch.Tensor, text_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, E]`` text embeddings for retrieval (the text alone)."""
        return self._project(self.qformer(None, text_ids, text_attention_mask, mode="text"))[1]

    def itm_logits(self, images: torch.Tensor, text_ids: torch.Tensor,
                   text_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, 2]`` (no match, match) logits for the pairs (images[i], text[i]): ``itm_head`` averaged over queries."""
        return self._itm_logits(self.image_features(images), text_ids, text_attention_mask)

    def _itm_logits(self, feats, text_ids, text_attention_mask):
        return self.itm_head(self.qformer(feats, text_ids, text_attention_mask, mode="itm").query).mean(dim=1)

    def forward(self, images: torch.Tensor, text_ids: torch.Tensor,
                text_attention_mask: torch.Tensor | None = None) -> Stage1Output:
        feats = self.image_features(images)
        mask = torch.ones_like(text_ids, dtype=torch.bool) if text_attention_mask is None else text_attention_mask.bool()
        batch = text_ids.shape[0]
        if batch < 2:
            raise ValueError(f"stage 1 needs at least 2 image-text pairs per batch for ITC/ITM negatives, got {batch}")
        if text_ids.shape[1] < 2:
            raise ValueError(f"ITG needs texts of at least 2 tokens ([DEC] + one to predict), got {text_ids.shape[1]}")
        with torch.no_grad():  # in place, as ALBEF/BLIP: an out-of-place clamp would zero the gradient outside the range
            self.temp.clamp_(0.001, 0.5)
        temp = self.temp

        # ITC: one pass under the uni-modal mask = separate query and text passes.
        query_emb, text_emb = self._project(self.qformer(feats, text_ids, mask, mode="itc"))
        sim = itc_similarity(query_emb, text_emb)
        itc = itc_loss(sim, temp, self.label_smoothing)

        # ITM: positives, (image, hard negative text) and (hard negative image, text); identical captions are no negatives.
        same_text = (text_ids[:, None] == text_ids[None]).all(-1) & (mask[:, None] == mask[None]).all(-1)
        scaled = sim.detach() / temp.detach()
        neg_text = sample_hard_negatives(scaled, exclude=same_text)
        neg_image = sample_hard_negatives(scaled.t(), exclude=same_text)
        itm_logits = self._itm_logits(torch.cat([feats, feats, feats[neg_image]]),
                                      torch.cat([text_ids, text_ids[neg_text], text_ids]),
                                      torch.cat([mask, mask[neg_text], mask]))
        itm_labels = torch.cat([torch.ones(batch, dtype=torch.long, device=feats.device),
                                torch.zeros(2 * batch, dtype=torch.long, device=feats.device)])
        itm = F.cross_entropy(itm_logits, itm_labels)

        # ITG: [DEC] first, causal LM on the text, predicting token t+1 from tokens <= t and all queries.
        dec_ids = torch.cat([torch.full_like(text_ids[:, :1], self.dec_token_id), text_ids[:, 1:]], dim=1)
        itg_out = self.qformer(feats, dec_ids, mask, mode="itg")
        logits = self.lm_head(itg_out.text[:, :-1])
        labels = dec_ids[:, 1:].masked_fill(~mask[:, 1:], -100)
        itg = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, label_smoothing=self.label_smoothing)

        return Stage1Output(loss=itc + itm + itg, itc=itc, itm=itm, itg=itg, sim_i2t=sim.detach())
