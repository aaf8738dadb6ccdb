"""Small BERT-style (post-LayerNorm) transformer blocks shared by the Q-Former and EfficientVLM.

Why labkit has its own blocks (docs/design.md, Principles 4): the parts being taught need three
things a stock ``transformers`` layer no longer offers. transformers 5 dropped ``head_mask``
and ``prune_heads``, yet EfficientVLM multiplies every head's context by a hard-concrete L0
gate and then *physically* removes the pruned heads and FFN units; and the notebooks draw
attention maps under arbitrary (ITC/ITM/ITG) masks. Everything here is a few lines of plain
PyTorch, device-agnostic, with parameter names close to BERT's so weights map over easily.

Conventions
- A mask is boolean and broadcastable to ``[B, H, Lq, Lk]``; True means "may attend".
  It is turned into an additive mask (0 or the dtype's minimum, as BERT and transformers
  do), so a row with nothing to attend to gets a uniform average instead of NaN.
- ``F.scaled_dot_product_attention`` computes the context when no maps are requested; the
  explicit softmax path (same maths) runs when they are, and returns the probabilities
  before attention dropout.
- Gates multiply per head (``[H]``) or per FFN unit (``[I]``); ``prune_heads(keep)`` and
  ``prune_units(keep)`` shrink the weight matrices so the model is really smaller. They
  replace parameters, so build the optimizer after pruning.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def additive_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Boolean mask (True = may attend) -> additive float mask: 0 where allowed, dtype min elsewhere."""
    if mask is None:
        return None
    if mask.dtype != torch.bool:
        raise ValueError(f"attention masks are boolean (True = may attend), got dtype {mask.dtype}")
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)


def _shrink_linear(linear: nn.Linear, index: torch.Tensor, dim: int) -> None:
    """Keep only ``index`` along a Linear's output (dim 0) or input (dim 1) features, in place."""
    linear.weight = nn.Parameter(linear.weight.index_select(dim, index).clone(), linear.weight.requires_grad)
    if dim == 0 and linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.index_select(0, index).clone(), linear.bias.requires_grad)
    linear.out_features, linear.in_features = linear.weight.shape


def _keep_index(keep, size: int, what: str, device) -> torch.Tensor:
    """Validate ``keep`` (indices or a boolean mask over ``size`` items) and return sorted unique indices."""
    keep = torch.as_tensor(keep, device=device)
    if keep.dtype == torch.bool:
        if keep.shape != (size,):
            raise ValueError(f"boolean keep mask for {what} must have shape ({size},), got {tuple(keep.shape)}")
        keep = keep.nonzero().flatten()
    keep = keep.long().unique(sorted=True)
    if keep.numel() and (keep.min() < 0 or keep.max() >= size):
        raise ValueError(f"{what} to keep must lie in [0, {size}), got {keep.tolist()}")
    return keep


class MultiHeadAttention(nn.Module):
    """Multi-head attention (Vaswani et al. 2017) with BERT parameter names ``query/key/value`` and an ``out`` projection.

    Self-attention when ``kv`` is None; cross-attention otherwise, where keys and values come
    from features of width ``kv_dim`` (e.g. frozen image features in the Q-Former, BLIP-2 §3.1).
    ``forward(x, kv=None, mask=None, head_gate=None, need_weights=False) -> (out [B, Lq, dim], probs | None)``
    with ``mask`` boolean and broadcastable to ``[B, H, Lq, Lk]`` (True = may attend) and ``probs``
    of shape ``[B, H, Lq, Lk]``; ``need_scores=True`` returns the pre-softmax scores instead
    (masked positions set to 0), which EfficientVLM's attention distillation compares.
    ``head_gate`` ([H]) scales each head's context before the output projection: the hook for
    EfficientVLM's hard-concrete L0 gates.
    """

    def __init__(self, dim: int, heads: int, kv_dim: int | None = None, head_dim: int | None = None,
                 attn_dropout: float = 0.0, bias: bool = True):
        super().__init__()
        if head_dim is None:
            if heads <= 0 or dim % heads:
                raise ValueError(f"width {dim} is not divisible by {heads} attention heads")
            head_dim = dim // heads
        kv_dim = dim if kv_dim is None else kv_dim
        self.dim, self.kv_dim, self.heads, self.head_dim = dim, kv_dim, heads, head_dim
        self.scale = head_dim ** -0.5
        self.attn_dropout = attn_dropout
        inner = heads * head_dim
        self.query = nn.Linear(dim, inner, bias=bias)
        self.key = nn.Linear(kv_dim, inner, bias=bias)
        self.value = nn.Linear(kv_dim, inner, bias=bias)
        self.out = nn.Linear(inner, dim, bias=bias)

    def _split(self, t: torch.Tensor) -> torch.Tensor:  # [B, L, H*d] -> [B, H, L, d]
        return t.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

    def forward(self, x: torch.Tensor, kv: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                head_gate: torch.Tensor | None = None, need_weights: bool = False, need_scores: bool = False):
        kv = x if kv is None else kv
        if kv.shape[-1] != self.kv_dim:
            raise ValueError(f"key/value features have width {kv.shape[-1]}, expected {self.kv_dim}")
        q, k, v = self._split(self.query(x)), self._split(self.key(kv)), self._split(self.value(kv))
        bias = additive_mask(mask, q.dtype)
        if self.heads == 0:  # every head pruned: the block reduces to the output bias
            probs = q.new_zeros(x.shape[0], 0, x.shape[1], kv.shape[1]) if need_weights or need_scores else None
            return self.out(q.transpose(1, 2).flatten(2)), probs
        dropout = self.attn_dropout if self.training else 0.0
        probs = None
        if need_weights or need_scores:
            scores = (q @ k.transpose(-1, -2)) * self.scale
            probs = torch.softmax(scores if bias is None else scores + bias, dim=-1)
            context = F.dropout(probs, dropout, self.training) @ v
            if need_scores:  # EfficientVLM distils raw scores, with masked positions zeroed
                probs = scores if mask is None else scores.masked_fill(~mask, 0.0)
        else:
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout, scale=self.scale)
        if head_gate is not None:
            if head_gate.shape != (self.heads,):
                raise ValueError(f"head_gate must have shape ({self.heads},), got {tuple(head_gate.shape)}")
            context = context * head_gate.to(context.dtype)[:, None, None]
        return self.out(context.transpose(1, 2).flatten(2)), probs

    @torch.no_grad()
    def prune_heads(self, keep) -> None:
        """Keep only the heads in ``keep`` (indices or a boolean [H] mask); q/k/v rows and ``out`` columns shrink."""
        heads = _keep_index(keep, self.heads, "heads", self.query.weight.device)
        cols = (heads[:, None] * self.head_dim + torch.arange(self.head_dim, device=heads.device)).flatten()
        for linear in (self.query, self.key, self.value):
            _shrink_linear(linear, cols, 0)
        _shrink_linear(self.out, cols, 1)
        self.heads = heads.numel()


class AttentionBlock(nn.Module):
    """BERT post-LN attention block: ``LayerNorm(x + dropout(MHA(x, kv)))`` (BertAttention = self + output).

    ``pre_norm=True`` gives the GPT-2/CLIP layout ``x + dropout(MHA(LayerNorm(x), kv))`` instead
    (keys and values of cross-attention are used as given).
    """

    def __init__(self, dim: int, heads: int, kv_dim: int | None = None, dropout: float = 0.0,
                 attn_dropout: float = 0.0, eps: float = 1e-12, pre_norm: bool = False):
        super().__init__()
        self.attn = MultiHeadAttention(dim, heads, kv_dim=kv_dim, attn_dropout=attn_dropout)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.pre_norm = pre_norm

    def forward(self, x: torch.Tensor, kv: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                head_gate: torch.Tensor | None = None, need_weights: bool = False, need_scores: bool = False):
        """Returns ``(hidden [B, Lq, dim], probs or scores [B, H, Lq, Lk] | None)``."""
        if self.pre_norm:
            h = self.norm(x)
            out, probs = self.attn(h, kv=h if kv is None else kv, mask=mask, head_gate=head_gate,
                                   need_weights=need_weights, need_scores=need_scores)
            return x + self.dropout(out), probs
        out, probs = self.attn(x, kv=kv, mask=mask, head_gate=head_gate, need_weights=need_weights,
                               need_scores=need_scores)
        return self.norm(x + self.dropout(out)), probs

    def prune_heads(self, keep) -> None:
        self.attn.prune_heads(keep)


class FeedForwardBlock(nn.Module):
    """BERT post-LN FFN: ``LayerNorm(x + dropout(dense_out(gate * GELU(dense_in(x)))))`` (BertIntermediate + BertOutput).

    ``unit_gate`` ([intermediate]) scales each hidden unit (EfficientVLM's FFN L0 gates);
    ``prune_units(keep)`` removes units by shrinking ``dense_in`` rows and ``dense_out`` columns.
    ``pre_norm=True``: ``x + dropout(dense_out(GELU(dense_in(LayerNorm(x)))))`` (CLIP's MLP).
    """

    def __init__(self, dim: int, intermediate: int, dropout: float = 0.0, eps: float = 1e-12, pre_norm: bool = False):
        super().__init__()
        self.dense_in = nn.Linear(dim, intermediate)
        self.dense_out = nn.Linear(intermediate, dim)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.pre_norm = pre_norm

    @property
    def units(self) -> int:
        return self.dense_in.out_features

    def forward(self, x: torch.Tensor, unit_gate: torch.Tensor | None = None) -> torch.Tensor:
        h = F.gelu(self.dense_in(self.norm(x) if self.pre_norm else x))
        if unit_gate is not None:
            if unit_gate.shape != (self.units,):
                raise ValueError(f"unit_gate must have shape ({self.units},), got {tuple(unit_gate.shape)}")
            h = h * unit_gate.to(h.dtype)
        out = x + self.dropout(self.dense_out(h))
        return out if self.pre_norm else self.norm(out)

    @torch.no_grad()
    def prune_units(self, keep) -> None:
        """Keep only the intermediate units in ``keep`` (indices or a boolean mask)."""
        units = _keep_index(keep, self.units, "FFN units", self.dense_in.weight.device)
        _shrink_linear(self.dense_in, units, 0)
        _shrink_linear(self.dense_out, units, 1)
