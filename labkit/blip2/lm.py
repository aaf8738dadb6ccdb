"""The frozen language models of BLIP-2 stage 2 (BLIP-2, ICML 2023, §3.3), tiny and ``transformers``-built.

- **Decoder-only** (OPT): ``[prompts; prefix; suffix]`` in one causal sequence, loss on the suffix
  (the caption, or the answer after a question prefix).
- **Encoder-decoder** (FlanT5 in the paper, a tiny T5 here): ``[prompts; prefix]`` in the encoder,
  the suffix in the decoder.

:func:`new_lm` builds either from a tiny config (never downloaded); :func:`lm_loss` and
:func:`lm_generate` take optional soft prompts, so the same LM trains on text alone (the lab's
"pretrained LLM", :func:`labkit.blip2.train.train_text_lm`) and then serves stage 2 frozen.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

LM_KINDS = ("opt", "t5")


def check_lm_kind(kind: str) -> str:
    if kind not in LM_KINDS:
        raise ValueError(f"unknown language-model kind {kind!r}; accepted: {', '.join(LM_KINDS)}")
    return kind


def new_lm(kind: str, vocab_size: int, pad_id: int, bos_id: int, eos_id: int, context: int = 64, **overrides) -> nn.Module:
    """A tiny, randomly initialised ``transformers`` LM: ``OPTForCausalLM`` or ``T5ForConditionalGeneration``.

    ``context`` bounds the whole input (soft prompts + text): OPT's learned positions, and the
    limit :func:`lm_loss` enforces for T5 (whose relative positions have none of their own).
    """
    check_lm_kind(kind)
    if kind == "opt":
        from transformers import OPTConfig, OPTForCausalLM

        cfg = dict(vocab_size=vocab_size, hidden_size=128, num_hidden_layers=3, ffn_dim=512, num_attention_heads=4,
                   max_position_embeddings=context, word_embed_proj_dim=128, dropout=0.0, attention_dropout=0.0,
                   activation_dropout=0.0, pad_token_id=pad_id, bos_token_id=bos_id, eos_token_id=eos_id)
        return OPTForCausalLM(OPTConfig(**{**cfg, **overrides}))
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = dict(vocab_size=vocab_size, d_model=128, d_kv=32, d_ff=512, num_layers=2, num_decoder_layers=2, num_heads=4,
               relative_attention_num_buckets=16, relative_attention_max_distance=context, dropout_rate=0.0,
               feed_forward_proj="gelu", pad_token_id=pad_id, eos_token_id=eos_id, decoder_start_token_id=bos_id,
               tie_word_embeddings=True, n_positions=context)  # tied: logits scaled by d_model**-0.5, a sane init
    return T5ForConditionalGeneration(T5Config(**{**cfg, **overrides}))


def lm_kind_of(lm: nn.Module) -> str:
    return "t5" if lm.config.model_type == "t5" else "opt"


def lm_hidden(lm: nn.Module) -> int:
    """Width of the LM's input embeddings: what the soft prompts must match."""
    return lm.get_input_embeddings().embedding_dim


def lm_context(lm: nn.Module) -> int:
    return lm.config.max_position_embeddings if lm_kind_of(lm) == "opt" else lm.config.n_positions


@dataclass
class TextBatch:
    """Right-padded ``prefix`` (prompt text, never a loss target) and ``suffix`` (the target) token ids and masks."""

    prefix_ids: torch.Tensor
    prefix_mask: torch.Tensor
    suffix_ids: torch.Tensor
    suffix_mask: torch.Tensor

    def to(self, device) -> TextBatch:
        return TextBatch(*(t.to(device) for t in (self.prefix_ids, self.prefix_mask, self.suffix_ids, self.suffix_mask)))

    @classmethod
    def from_lists(cls, prefixes: list[list[int]], suffixes: list[list[int]]) -> TextBatch:
        def pad(rows):
            width = max(1, max(len(r) for r in rows))
            ids = torch.zeros(len(rows), width, dtype=torch.long)
            for i, r in enumerate(rows):
                ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            return ids, torch.arange(width)[None] < torch.tensor([len(r) for r in rows])[:, None]

        return cls(*pad(prefixes), *pad(suffixes))


def pack_left(ids: torch.Tensor, mask: torch.Tensor, *extra: torch.Tensor):
    """Move each row's valid tokens to the front (stable), so ``[prefix | pad | suffix | pad]`` becomes one right-padded row.

    Vectorised: a stable argsort of ``~mask`` per row; ``extra`` tensors are permuted the same way.
    """
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
    return tuple(t.gather(1, order) for t in (ids, mask, *extra))


def decoder_labels(n_prompt: int, text_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Labels ``[B, n_prompt + L]`` for a decoder-only LM: -100 (ignored) on every prompt position and non-target token."""
    ignore = torch.full((text_ids.shape[0], n_prompt), -100, dtype=torch.long, device=text_ids.device)
    return torch.cat([ignore, text_ids.masked_fill(~loss_mask, -100)], dim=1)


def _check_length(lm: nn.Module, n_prompt: int, length: int, where: str) -> None:
    context = lm_context(lm)
    if n_prompt + length > context:
        raise ValueError(f"{where}: {n_prompt} prompt + {length} text tokens = {n_prompt + length}, "
                         f"longer than the LM context of {context}")


def _prepend(prompts: torch.Tensor | None, embeds: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[prompts; embeds]`` and the matching long attention mask (prompt positions always attended)."""
    if prompts is None:
        return embeds, mask.long()
    ones = mask.new_ones(mask.shape[0], prompts.shape[1])
    return torch.cat([prompts.to(embeds.dtype), embeds], 1), torch.cat([ones, mask], 1).long()


def lm_loss(lm: nn.Module, prompts: torch.Tensor | None, text: TextBatch, prefix_loss: bool = False) -> torch.Tensor:
    """Cross-entropy of the suffix given ``[prompts; prefix]`` (§3.3); prompt positions never count.

    ``prompts`` ``[B, P, LM hidden]`` or None (text alone, e.g. pretraining the LM). ``prefix_loss``
    (decoder-only) also trains on the prefix: plain language modelling for the text-only stage.
    """
    embed = lm.get_input_embeddings()
    n_prompt = 0 if prompts is None else prompts.shape[1]
    if prompts is not None and prompts.shape[-1] != embed.embedding_dim:
        raise ValueError(f"soft prompts have width {prompts.shape[-1]}, the LM expects {embed.embedding_dim}")
    if lm_kind_of(lm) == "opt":
        loss_mask = torch.cat([text.prefix_mask & prefix_loss, text.suffix_mask], dim=1)
        ids, mask, loss_mask = pack_left(torch.cat([text.prefix_ids, text.suffix_ids], 1),
                                         torch.cat([text.prefix_mask, text.suffix_mask], 1), loss_mask)
        length = int(mask.sum(1).max())
        ids, mask, loss_mask = ids[:, :length], mask[:, :length], loss_mask[:, :length]
        _check_length(lm, n_prompt, length, "decoder-only input")
        embeds, attention = _prepend(prompts, embed(ids), mask)
        logits = lm(inputs_embeds=embeds, attention_mask=attention).logits
        labels = decoder_labels(n_prompt, ids, loss_mask)
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
    _check_length(lm, n_prompt, text.prefix_ids.shape[1], "encoder input")
    _check_length(lm, 0, text.suffix_ids.shape[1] + 1, "decoder input")
    embeds, attention = _prepend(prompts, embed(text.prefix_ids), text.prefix_mask)
    return lm(inputs_embeds=embeds, attention_mask=attention, labels=text.suffix_ids.masked_fill(~text.suffix_mask, -100)).loss


@torch.no_grad()
def lm_generate(lm: nn.Module, prompts: torch.Tensor | None, prefix_ids: torch.Tensor, prefix_mask: torch.Tensor,
                max_new_tokens: int, eos_id: int) -> torch.Tensor:
    """Greedy decoding after ``[prompts; prefix]``, batched; returns ``[B, max_new_tokens]`` ids, padded with 0 after ``eos_id``.

    No KV cache: sequences here are a few dozen tokens, and a full re-run keeps one code path
    for right-padded rows of different lengths (each row reads its logits at its own last token).
    """
    embed = lm.get_input_embeddings()
    batch, device = prefix_ids.shape[0], prefix_ids.device
    n_prompt = 0 if prompts is None else prompts.shape[1]
    out = torch.zeros(batch, max_new_tokens, dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    rows = torch.arange(batch, device=device)
    if lm_kind_of(lm) == "opt":
        _check_length(lm, n_prompt, prefix_ids.shape[1] + max_new_tokens, "decoder-only generation")
        ids = torch.cat([prefix_ids, prefix_ids.new_zeros(batch, max_new_tokens)], 1)
        mask = torch.cat([prefix_mask.bool(), prefix_mask.new_zeros(batch, max_new_tokens, dtype=torch.bool)], 1)
        lengths = mask.sum(1)
        for step in range(max_new_tokens):
            width = int(lengths.max())
            embeds, attention = _prepend(prompts, embed(ids[:, :width]), mask[:, :width])
            logits = lm(inputs_embeds=embeds, attention_mask=attention).logits
            token = logits[rows, n_prompt + lengths - 1].argmax(-1).masked_fill(done, 0)
            out[:, step] = token
            ids[rows, lengths] = token
            mask[rows, lengths] = ~done
            lengths = lengths + (~done).long()
            done = done | (token == eos_id)
            if done.all():
                break
        return out
    _check_length(lm, n_prompt, prefix_ids.shape[1], "encoder input")
    _check_length(lm, 0, max_new_tokens + 1, "decoder input")
    embeds, enc_mask = _prepend(prompts, embed(prefix_ids), prefix_mask)
    encoded = lm.get_encoder()(inputs_embeds=embeds, attention_mask=enc_mask)
    dec = torch.full((batch, 1), lm.config.decoder_start_token_id, dtype=torch.long, device=device)
    for step in range(max_new_tokens):
        logits = lm(encoder_outputs=encoded, attention_mask=enc_mask, decoder_input_ids=dec).logits
        token = logits[:, -1].argmax(-1).masked_fill(done, 0)
        out[:, step] = token
        dec = torch.cat([dec, token[:, None]], 1)
        done = done | (token == eos_id)
        if done.all():
            break
    return out


def count_params(module: nn.Module, trainable: bool | None = None) -> int:
    return sum(p.numel() for p in module.parameters() if trainable is None or p.requires_grad == trainable)
