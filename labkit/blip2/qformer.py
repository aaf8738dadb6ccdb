"""BLIP-2's Querying Transformer (Q-Former) on labkit's own blocks (BLIP-2, Li et al., ICML 2023, §3.1).

The Q-Former bridges a frozen image encoder and a frozen language model. It is a BERT-base
layout (docs/design.md, "BLIP-2") with a twist: a fixed set of learned **queries** (32×768 in the
paper) interact with each other and with the text through *shared* self-attention, read the
frozen image features through cross-attention inserted every ``cross_attention_frequency``
layers (every other layer in BLIP-2), and go through their own FFN, while text positions use
the BERT FFN. Which positions may see which is decided by the attention mask alone, and
:func:`attention_masks` builds the three stage-1 layouts of the paper's Figure 2.

``QFormer`` reproduces ``transformers``' ``Blip2QFormerModel`` (+ its text embeddings and
``query_tokens``) to float precision: :func:`load_hf_qformer` maps the weights, and
``tests/test_qformer.py`` checks the outputs agree within 1e-5. The stage-1 losses live in
:mod:`labkit.blip2`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import nn

from labkit.core.blocks import AttentionBlock, FeedForwardBlock

Mode = Literal["queries", "text", "itc", "itm", "itg"]
MODES = ("queries", "text", "itc", "itm", "itg")
MASK_LAYOUTS = ("itc", "itm", "itg")


@dataclass
class QFormerConfig:
    """Q-Former sizes. Defaults are BLIP-2's (BERT-base, 32 queries, EVA ViT-g features of width 1408)."""

    hidden: int = 768
    layers: int = 12
    heads: int = 12
    intermediate: int = 3072
    num_queries: int = 32
    encoder_width: int = 1408
    cross_attention_frequency: int = 2
    vocab_size: int = 30523  # BERT's 30,522 word pieces + the [DEC] token BLIP-2 adds for ITG
    max_positions: int = 512
    layer_norm_eps: float = 1e-12
    dropout: float = 0.1
    ln_vision: bool = False  # LAVIS's trainable LayerNorm on the frozen image features (``Blip2Base.ln_vision``)

    def __post_init__(self):
        for name in ("hidden", "layers", "heads", "intermediate", "num_queries", "encoder_width",
                     "cross_attention_frequency", "vocab_size", "max_positions"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"QFormerConfig.{name} must be a positive integer, got {getattr(self, name)}")
        if self.hidden % self.heads:
            raise ValueError(f"QFormerConfig.hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"QFormerConfig.dropout must lie in [0, 1), got {self.dropout}")

    @classmethod
    def bert_base(cls, **overrides) -> QFormerConfig:
        """BLIP-2's Q-Former: 768 wide, 12 layers, 12 heads, FFN 3072, 32 queries, cross-attention every 2nd layer."""
        return cls(**overrides)

    @classmethod
    def tiny(cls, **overrides) -> QFormerConfig:
        """A ToyWorld-sized Q-Former (1.48M parameters) for the toy CLIP's 128-wide patch tokens."""
        base = dict(hidden=128, layers=4, heads=4, intermediate=512, num_queries=16, encoder_width=128,
                    cross_attention_frequency=2, vocab_size=128, max_positions=64)
        return cls(**{**base, **overrides})

    @classmethod
    def from_hf(cls, hf_config, num_queries: int = 32) -> QFormerConfig:
        """From a ``transformers`` ``Blip2QFormerConfig`` (the query count lives in ``Blip2Config.num_query_tokens``)."""
        return cls(hidden=hf_config.hidden_size, layers=hf_config.num_hidden_layers, heads=hf_config.num_attention_heads,
                   intermediate=hf_config.intermediate_size, num_queries=num_queries,
                   encoder_width=hf_config.encoder_hidden_size, cross_attention_frequency=hf_config.cross_attention_frequency,
                   vocab_size=hf_config.vocab_size, max_positions=hf_config.max_position_embeddings,
                   layer_norm_eps=hf_config.layer_norm_eps, dropout=hf_config.hidden_dropout_prob)

    def to_dict(self) -> dict:
        return asdict(self)


def attention_masks(n_query: int, text_attention_mask: torch.Tensor, mode: str) -> torch.Tensor:
    """The three BLIP-2 stage-1 self-attention layouts (§3.2, Figure 2), boolean ``[B, 1, Q+T, Q+T]``, True = may attend.

    Rows are the attending positions and columns the attended ones, queries first, then text;
    padded text (``text_attention_mask`` False/0) is never attended to.

    - ``"itc"`` (uni-modal): queries see only queries, text sees only text, so the two act
      like separate passes (the paper's "queries and text cannot see each other").
    - ``"itm"`` (bi-directional): every position sees every non-padded position.
    - ``"itg"`` (multimodal causal): queries see only queries; a text token sees all queries
      and the text up to and including itself.
    """
    if mode not in MASK_LAYOUTS:
        raise ValueError(f"unknown attention-mask layout {mode!r}; expected one of {MASK_LAYOUTS}")
    if text_attention_mask.ndim != 2:
        raise ValueError(f"text_attention_mask must be [batch, text_length], got shape {tuple(text_attention_mask.shape)}")
    batch, n_text = text_attention_mask.shape
    device = text_attention_mask.device
    length = n_query + n_text
    keys = torch.cat([torch.ones(batch, n_query, dtype=torch.bool, device=device), text_attention_mask.bool()], dim=1)
    keys = keys[:, None, None, :]  # [B, 1, 1, L]
    if mode == "itm":
        return keys.expand(batch, 1, length, length)
    is_query = torch.arange(length, device=device) < n_query
    if mode == "itc":
        layout = is_query[:, None] == is_query[None, :]
    else:
        causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
        layout = is_query[None, :] | (~is_query[:, None] & causal)
    return keys & layout


@dataclass
class QFormerOutput:
    """Query outputs ``[B, Q, D]``, text outputs ``[B, T, D]`` (None without text) and, on request, per-layer maps.

    ``self_attentions[l]`` is ``[B, H, Q+T, Q+T]``; ``cross_attentions[l]`` is ``[B, H, Q, N]`` for
    layers with cross-attention and None for the others (index = layer number).
    """

    query: torch.Tensor | None
    text: torch.Tensor | None
    self_attentions: list[torch.Tensor] | None = None
    cross_attentions: list[torch.Tensor | None] | None = None


class QFormerLayer(nn.Module):
    """Shared self-attention -> (queries only) cross-attention to the image -> separate query / text FFNs."""

    def __init__(self, config: QFormerConfig, has_cross_attention: bool):
        super().__init__()
        c = config
        block = dict(dropout=c.dropout, attn_dropout=c.dropout, eps=c.layer_norm_eps)
        self.self_attn = AttentionBlock(c.hidden, c.heads, **block)
        self.cross_attn = AttentionBlock(c.hidden, c.heads, kv_dim=c.encoder_width, **block) if has_cross_attention else None
        self.ffn_query = FeedForwardBlock(c.hidden, c.intermediate, c.dropout, c.layer_norm_eps)
        self.ffn_text = FeedForwardBlock(c.hidden, c.intermediate, c.dropout, c.layer_norm_eps)

    def forward(self, hidden, n_query, image_feats, mask, need_weights=False):
        hidden, self_map = self.self_attn(hidden, mask=mask, need_weights=need_weights)
        queries, text = hidden[:, :n_query], hidden[:, n_query:]
        cross_map = None
        if self.cross_attn is not None and n_query:
            queries, cross_map = self.cross_attn(queries, kv=image_feats, need_weights=need_weights)
        hidden = torch.cat([self.ffn_query(queries), self.ffn_text(text)], dim=1)
        return hidden, self_map, cross_map


class QFormer(nn.Module):
    """The Q-Former (BLIP-2 §3.1): learned queries + BERT text embeddings + ``layers`` × :class:`QFormerLayer`.

    ``forward(image_feats, text_ids=None, text_attention_mask=None, mode="queries", return_attention=False)``

    - ``image_feats``: frozen image features ``[B, N, encoder_width]`` (BLIP-2 uses the ViT's
      second-to-last layer); None only in ``"text"`` mode.
    - ``mode``: ``"queries"`` (queries alone: what stage 2 feeds the LLM), ``"text"`` (text alone,
      e.g. text embeddings for retrieval), or a stage-1 layout ``"itc"``/``"itm"``/``"itg"``
      (queries and text in one pass under :func:`attention_masks`).
    - One LayerNorm normalises the concatenated ``[queries; text]`` embeddings, as in LAVIS and
      ``transformers``; text gets word + learned position embeddings (no token types).
    - ``config.ln_vision``: a trainable LayerNorm on the frozen image features before cross-attention, as LAVIS's
      ``Blip2Base.ln_vision`` (in ``transformers`` it is the vision model's ``post_layernorm``, outside the
      Q-Former, so :func:`labkit.blip2.hf.load_hf_qformer` leaves it off). The ToyWorld stages leave it off too:
      measured in ``docs/blip2.md``.
    """

    def __init__(self, config: QFormerConfig):
        super().__init__()
        c = self.config = config
        self.query_tokens = nn.Parameter(torch.zeros(1, c.num_queries, c.hidden))
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden)
        self.position_embeddings = nn.Embedding(c.max_positions, c.hidden)
        self.embed_norm = nn.LayerNorm(c.hidden, eps=c.layer_norm_eps)
        self.embed_dropout = nn.Dropout(c.dropout)
        self.ln_vision = nn.LayerNorm(c.encoder_width) if c.ln_vision else nn.Identity()
        self.layers = nn.ModuleList(QFormerLayer(c, i % c.cross_attention_frequency == 0) for i in range(c.layers))
        self.apply(_init_bert_weights)
        nn.init.normal_(self.query_tokens, std=0.02)  # BLIP-2 initialises the queries like BERT weights

    def embed_text(self, text_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(text_ids.shape[1], device=text_ids.device)
        return self.word_embeddings(text_ids) + self.position_embeddings(positions)

    def _check_inputs(self, image_feats, text_ids, text_attention_mask, mode):
        c = self.config
        if mode not in MODES:
            raise ValueError(f"unknown Q-Former mode {mode!r}; expected one of {MODES}")
        if mode == "text":
            if image_feats is not None:
                raise ValueError("mode 'text' encodes text alone: pass image_feats=None")
        elif image_feats is None or image_feats.ndim != 3 or image_feats.shape[-1] != c.encoder_width:
            shape = None if image_feats is None else tuple(image_feats.shape)
            raise ValueError(f"image features must have shape [batch, tokens, {c.encoder_width}] "
                             f"(QFormerConfig.encoder_width), got {shape}")
        if mode == "queries":
            if text_ids is not None:
                raise ValueError("mode 'queries' runs the queries alone; use 'itc', 'itm' or 'itg' to add text")
            return
        if text_ids is None or text_ids.ndim != 2:
            raise ValueError(f"mode {mode!r} needs text_ids of shape [batch, length]")
        if text_ids.shape[1] > c.max_positions:
            raise ValueError(f"text has {text_ids.shape[1]} tokens, more than max_positions={c.max_positions}")
        if image_feats is not None and image_feats.shape[0] != text_ids.shape[0]:
            raise ValueError(f"batch sizes differ: {image_feats.shape[0]} images, {text_ids.shape[0]} texts")
        if text_attention_mask is not None and text_attention_mask.shape != text_ids.shape:
            raise ValueError(f"text_attention_mask shape {tuple(text_attention_mask.shape)} "
                             f"does not match text_ids {tuple(text_ids.shape)}")

    def forward(self, image_feats: torch.Tensor | None, text_ids: torch.Tensor | None = None,
                text_attention_mask: torch.Tensor | None = None, mode: Mode = "queries",
                return_attention: bool = False) -> QFormerOutput:
        self._check_inputs(image_feats, text_ids, text_attention_mask, mode)
        parts, mask = [], None
        n_query = 0 if mode == "text" else self.config.num_queries
        if n_query:
            parts.append(self.query_tokens.expand(image_feats.shape[0], -1, -1))
            image_feats = self.ln_vision(image_feats.to(self.query_tokens.dtype))
        if text_ids is not None:
            parts.append(self.embed_text(text_ids))
            if text_attention_mask is None:
                text_attention_mask = torch.ones_like(text_ids, dtype=torch.bool)
            mask = attention_masks(n_query, text_attention_mask, "itm" if mode == "text" else mode)
        hidden = self.embed_dropout(self.embed_norm(torch.cat(parts, dim=1)))
        self_maps, cross_maps = [], []
        for layer in self.layers:
            hidden, self_map, cross_map = layer(hidden, n_query, image_feats, mask, need_weights=return_attention)
            self_maps.append(self_map)
            cross_maps.append(cross_map)
        return QFormerOutput(
            query=hidden[:, :n_query] if n_query else None,
            text=hidden[:, n_query:] if text_ids is not None else None,
            self_attentions=self_maps if return_attention else None,
            cross_attentions=cross_maps if return_attention else None,
        )


def _init_bert_weights(module: nn.Module) -> None:
    """BERT's initialisation (normal 0.02, zero biases, unit LayerNorms), as BLIP-2's Q-Former uses."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
