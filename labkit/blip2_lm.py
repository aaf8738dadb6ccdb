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
"pretrained LLM" is a tiny LM first trained on ToyWorld text alone (:mod:`labkit.blip2_train`), so
it can already answer a question from a caption before it ever sees an image.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from .blip2 import frozen_image_features
from .qformer import QFormer, QFormerConfig

__all__ = ["LM_KINDS", "TextBatch", "new_lm", "lm_hidden", "Blip2Stage2", "lm_loss", "lm_generate", "pack_left",
           "decoder_labels", "save_module", "load_module_state", "count_params"]

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


def count_params(module: nn.Module, trainable: bool | None = None) -> int:
    return sum(p.numel() for p in module.parameters() if trainable is None or p.requires_grad == trainable)


# ---------------------------------------------------------------- checkpoints: safetensors + JSON

WEIGHTS, CONFIG = "model.safetensors", "config.json"


def save_module(path: str | Path, state: dict[str, torch.Tensor], config: dict) -> Path:
    """Write ``model.safetensors`` (fp16 to keep shipped files small) and ``config.json``; shared tensors saved once."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    seen, tensors = {}, {}
    for name, t in state.items():
        key = (t.data_ptr(), t.shape)
        if key in seen:
            config.setdefault("tied", {})[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().cpu().to(torch.float16 if t.is_floating_point() else t.dtype).contiguous()
    save_file(tensors, str(path / WEIGHTS))
    (path / CONFIG).write_text(json.dumps(config, indent=1, default=str))
    return path


def load_module_state(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Inverse of :func:`save_module`: fp32 tensors (tied names restored) and the config dict."""
    path = Path(path)
    if not (path / WEIGHTS).is_file() or not (path / CONFIG).is_file():
        raise ValueError(f"{path} is not a labkit BLIP-2 checkpoint: it needs {WEIGHTS} and {CONFIG}; "
                         f"train one with `labkit train qformer`")
    config = json.loads((path / CONFIG).read_text())
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path / WEIGHTS)).items()}
    for name, source in config.get("tied", {}).items():
        state[name] = state[source]
    return state, config
