"""A ToyWorld vision-language model in the X-VLM / ALBEF mould, the teacher and student of EfficientVLM.

Three encoders, as in X-VLM (Zeng et al., 2022) and ALBEF (Li et al., 2021):
    vision   conv stem + ViT blocks            -> image tokens, [CLS] -> image embedding (ITC)
    text     transformer over caption tokens   -> text tokens, [EOT] -> text embedding (ITC)
    fusion   text tokens attend to themselves and, by cross-attention, to the image tokens
             -> [CLS] -> ITM head (match / no match); every position -> MLM head
X-VLM initialises its vision and text towers from pretrained CLIP and BERT weights; here
:meth:`ToyVLM.from_toy_clip` initialises them from the lab's toy CLIP (its 4 vision layers and the
first ``text_layers`` of its text layers, as ALBEF keeps the first BERT layers as text encoder),
so the blocks are CLIP's pre-LN blocks, and the fusion layers (new, random) use the same layout.

Every block is a :mod:`labkit.core.blocks` block, so each attention head and FFN unit can take a gate
(``gates["vision.0.attn"]``, ``gates["fusion.1.cross"]``, ``gates["text.0.ffn"]`` ...) and be
physically removed: that is what EfficientVLM's pruning (:mod:`labkit.efficientvlm.prune`) needs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from labkit.clip.model import ConvStem
from labkit.core.assets import asset_dir
from labkit.core.blocks import AttentionBlock, FeedForwardBlock
from labkit.core.checkpoint import ModelError, load_checkpoint, save_checkpoint

MODALITIES = ("vision", "text", "fusion")



PAD_ID = 0


@dataclass
class VLMConfig:
    """Sizes of a :class:`ToyVLM`. ``sizes`` records heads/units per gate site once a model is pruned."""

    width: int = 128
    heads: int = 4
    intermediate: int = 512
    vision_layers: int = 4
    text_layers: int = 2
    fusion_layers: int = 4
    embed_dim: int = 128
    image_size: int = 64
    patch_size: int = 8
    stem_channels: tuple[int, ...] = (24, 48, 96)
    vocab_size: int = 69  # the toy CLIP's 68 word ids + [MASK]
    context_length: int = 32
    eot_id: int = 67
    sizes: dict = field(default_factory=dict)

    def layers(self, modality: str) -> int:
        if modality not in MODALITIES:
            raise ValueError(f"unknown modality {modality!r}; accepted: {', '.join(MODALITIES)}")
        return getattr(self, f"{modality}_layers")

    @property
    def mask_id(self) -> int:
        return self.vocab_size - 1



def trim_padding(ids: torch.Tensor) -> torch.Tensor:
    """Drop the padding columns every caption in the batch shares (attention cost grows with length)."""
    length = int((ids != PAD_ID).sum(1).max())
    return ids[:, :length]


class EncoderLayer(nn.Module):
    """A pre-LN transformer layer: self-attention, optional cross-attention to image tokens, FFN."""

    def __init__(self, cfg: VLMConfig, cross: bool = False):
        super().__init__()
        w = cfg.width
        self.attn = AttentionBlock(w, cfg.heads, eps=1e-5, pre_norm=True)
        self.cross = AttentionBlock(w, cfg.heads, kv_dim=w, eps=1e-5, pre_norm=True) if cross else None
        self.ffn = FeedForwardBlock(w, cfg.intermediate, eps=1e-5, pre_norm=True)

    def sites(self) -> dict[str, nn.Module]:
        """The gate sites of this layer: ``attn``/``cross`` (MultiHeadAttention) and ``ffn``."""
        sites = {"attn": self.attn.attn, "ffn": self.ffn}
        if self.cross is not None:
            sites["cross"] = self.cross.attn
        return sites

    def forward(self, x, mask=None, image=None, gates=None, prefix="", need_scores=False):
        gates = gates or {}
        x, scores = self.attn(x, mask=mask, head_gate=gates.get(prefix + "attn"), need_scores=need_scores)
        if self.cross is not None:
            x, _ = self.cross(x, kv=image, head_gate=gates.get(prefix + "cross"))
        return self.ffn(x, unit_gate=gates.get(prefix + "ffn")), scores


@dataclass
class VLMOutput:
    """What one encoder returns: final states, and per layer hidden states / attention scores when asked."""

    states: torch.Tensor
    hidden: list[torch.Tensor] = field(default_factory=list)  # embedding output + one per layer
    scores: list[torch.Tensor] = field(default_factory=list)  # pre-softmax self-attention, one per layer


class ToyVLM(nn.Module):
    """Vision, text and fusion encoders with ITC, ITM and MLM heads (see the module docstring)."""

    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.cfg = cfg
        w, grid = cfg.width, cfg.image_size // cfg.patch_size
        self.stem = ConvStem(w, tuple(cfg.stem_channels))
        if self.stem.stride != cfg.patch_size:
            raise ModelError(f"conv stem stride {self.stem.stride} must equal patch_size {cfg.patch_size}")
        self.class_embedding = nn.Parameter(torch.randn(w) * w ** -0.5)
        self.vision_pos = nn.Parameter(torch.randn(grid * grid + 1, w) * w ** -0.5)
        self.ln_pre, self.ln_post = nn.LayerNorm(w), nn.LayerNorm(w)
        self.token_embedding = nn.Embedding(cfg.vocab_size, w)
        self.text_pos = nn.Parameter(torch.randn(cfg.context_length, w) * 0.01)
        self.ln_final, self.ln_fusion = nn.LayerNorm(w), nn.LayerNorm(w)
        self.encoders = nn.ModuleDict({m: nn.ModuleList(EncoderLayer(cfg, cross=m == "fusion")
                                                        for _ in range(cfg.layers(m))) for m in MODALITIES})
        self.vision_proj = nn.Linear(w, cfg.embed_dim, bias=False)
        self.text_proj = nn.Linear(w, cfg.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.itm_head = nn.Linear(w, 2)
        self.mlm_head = nn.Linear(w, cfg.vocab_size)
        self.register_buffer("causal", torch.ones(cfg.context_length, cfg.context_length, dtype=torch.bool).tril(),
                             persistent=False)
        if cfg.sizes:
            self.resize(cfg.sizes)

    # ------------------------------------------------------------ gate sites and sizes
    def sites(self) -> dict[str, nn.Module]:
        """Every gate site by name, ``"{modality}.{layer}.{attn|cross|ffn}"``."""
        return {f"{m}.{i}.{kind}": module for m in MODALITIES for i, layer in enumerate(self.encoders[m])
                for kind, module in layer.sites().items()}

    def sizes(self) -> dict[str, int]:
        """Heads (attention sites) or units (FFN sites) currently present at every site."""
        return {name: (site.heads if name.endswith(("attn", "cross")) else site.units)
                for name, site in self.sites().items()}

    def resize(self, sizes: dict[str, int]) -> None:
        """Shrink sites to the given sizes (keeping the first ones): used to rebuild a pruned model before loading."""
        sites = self.sites()
        for name, n in sizes.items():
            if name not in sites:
                raise ModelError(f"unknown gate site {name!r} in the saved sizes")
            site = sites[name]
            (site.prune_heads if name.endswith(("attn", "cross")) else site.prune_units)(torch.arange(int(n)))

    # ------------------------------------------------------------ encoders
    def _run(self, modality, x, mask=None, image=None, gates=None, need=False) -> VLMOutput:
        out = VLMOutput(x, [x] if need else [])
        for i, layer in enumerate(self.encoders[modality]):
            x, scores = layer(x, mask, image, gates, f"{modality}.{i}.", need_scores=need)
            if need:
                out.hidden.append(x)
                out.scores.append(scores)
        out.states = x
        return out

    def encode_image(self, images: torch.Tensor, gates=None, need=False) -> VLMOutput:
        """Normalised float images ``[B, 3, H, W]`` -> image tokens ``[B, 1 + grid², width]`` ([CLS] first)."""
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[-1] != self.cfg.image_size:
            raise ValueError(f"images must be [B, 3, {self.cfg.image_size}, {self.cfg.image_size}], got {tuple(images.shape)}")
        x = self.stem(images).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = self.ln_pre(torch.cat([cls, x], dim=1) + self.vision_pos.to(x.dtype))
        out = self._run("vision", x, gates=gates, need=need)
        out.states = self.ln_post(out.states)
        return out

    def encode_text(self, ids: torch.Tensor, gates=None, need=False) -> VLMOutput:
        """Token ids ``[B, L]`` -> text tokens (causal self-attention, as in CLIP's text tower)."""
        if ids.ndim != 2 or ids.shape[1] > self.cfg.context_length:
            raise ValueError(f"token ids must be [B, L] with L <= {self.cfg.context_length}, got {tuple(ids.shape)}")
        length = ids.shape[1]
        x = self.token_embedding(ids) + self.text_pos[:length]
        out = self._run("text", x, mask=self.causal[:length, :length], gates=gates, need=need)
        out.states = self.ln_final(out.states)
        return out

    def fuse(self, text: torch.Tensor, ids: torch.Tensor, image: torch.Tensor, gates=None, need=False) -> VLMOutput:
        """Fusion encoder: text tokens attend to non-padding text (bidirectional) and to all image tokens."""
        mask = (ids != PAD_ID)[:, None, None, :]
        out = self._run("fusion", text, mask=mask, image=image, gates=gates, need=need)
        out.states = self.ln_fusion(out.states)
        return out

    # ------------------------------------------------------------ heads
    def image_embedding(self, image: VLMOutput) -> torch.Tensor:
        return F.normalize(self.vision_proj(image.states[:, 0]), dim=-1)

    def text_embedding(self, text: VLMOutput, ids: torch.Tensor) -> torch.Tensor:
        eot = (ids == self.cfg.eot_id).int().argmax(dim=1)
        return F.normalize(self.text_proj(text.states[torch.arange(ids.shape[0], device=ids.device), eot]), dim=-1)

    def itm_logits(self, fused: VLMOutput) -> torch.Tensor:
        return self.itm_head(fused.states[:, 0])

    @torch.no_grad()
    def match_scores(self, images: torch.Tensor, ids: torch.Tensor, gates=None) -> torch.Tensor:
        """Inference: P(match) for each (image, caption) pair, through all three encoders."""
        image = self.encode_image(images, gates)
        text = self.encode_text(ids, gates)
        return self.itm_logits(self.fuse(text.states, ids, image.states, gates)).softmax(-1)[:, 1]

    # ------------------------------------------------------------ initialisation from the toy CLIP
    @classmethod
    def from_toy_clip(cls, clip_model: nn.Module, cfg: VLMConfig | None = None) -> ToyVLM:
        """Vision and text towers from an open_clip toy CLIP (``load_clip('toy').model``); fusion and heads new."""
        cfg = cfg or VLMConfig()
        model = cls(cfg)
        visual = clip_model.visual
        if len(visual.transformer.resblocks) != cfg.vision_layers or len(clip_model.transformer.resblocks) < cfg.text_layers:
            raise ModelError("the CLIP's depth does not fit this VLMConfig")
        with torch.no_grad():
            model.stem.load_state_dict(visual.conv1.state_dict())
            model.class_embedding.copy_(visual.class_embedding)
            model.vision_pos.copy_(visual.positional_embedding)
            model.ln_pre.load_state_dict(visual.ln_pre.state_dict())
            model.ln_post.load_state_dict(visual.ln_post.state_dict())
            model.vision_proj.weight.copy_(visual.proj.T)
            clip_vocab = clip_model.token_embedding.weight.shape[0]
            model.token_embedding.weight[:clip_vocab].copy_(clip_model.token_embedding.weight)
            model.text_pos.copy_(clip_model.positional_embedding[:cfg.context_length])
            model.ln_final.load_state_dict(clip_model.ln_final.state_dict())
            model.text_proj.weight.copy_(clip_model.text_projection.T)
            model.logit_scale.copy_(clip_model.logit_scale)
            pairs = [*zip(model.encoders["vision"], visual.transformer.resblocks),
                     *zip(model.encoders["text"], clip_model.transformer.resblocks)]
            for layer, block in pairs:
                _copy_open_clip_block(layer, block)
        return model


def _copy_open_clip_block(layer: EncoderLayer, block: nn.Module) -> None:
    """open_clip ``ResidualAttentionBlock`` (ln_1, fused in_proj, out_proj, ln_2, c_fc, c_proj) -> EncoderLayer."""
    attn = layer.attn.attn
    for linear, w, b in zip((attn.query, attn.key, attn.value), block.attn.in_proj_weight.chunk(3),
                            block.attn.in_proj_bias.chunk(3)):
        linear.weight.copy_(w)
        linear.bias.copy_(b)
    attn.out.load_state_dict(block.attn.out_proj.state_dict())
    layer.attn.norm.load_state_dict(block.ln_1.state_dict())
    layer.ffn.norm.load_state_dict(block.ln_2.state_dict())
    layer.ffn.dense_in.load_state_dict(block.mlp.c_fc.state_dict())
    layer.ffn.dense_out.load_state_dict(block.mlp.c_proj.state_dict())


def save_vlm(model: ToyVLM, path, metadata: dict) -> Path:
    """Write a (possibly pruned) :class:`ToyVLM` as a checkpoint: the config holds every gate site's size."""
    return save_checkpoint(path, model.state_dict(), {**asdict(model.cfg), "sizes": model.sizes()}, metadata)


def load_vlm(path, device=None) -> ToyVLM:
    """Rebuild a (possibly pruned) :class:`ToyVLM` from :func:`save_vlm`'s folder (its metadata in ``.meta``)."""
    state, config, meta = load_checkpoint(path, what="ToyVLM checkpoint",
                                          how_to_make="make one with `labkit train teacher` / `labkit train student`")
    config["stem_channels"] = tuple(config["stem_channels"])
    model = ToyVLM(VLMConfig(**config))
    model.load_state_dict(state)
    model.meta = meta  # how it was trained: command, steps, wall time, validation metrics, curve
    return model.to(device or "cpu").eval()


def load_efficient(which: str, device=None) -> ToyVLM:
    """A shipped EfficientVLM checkpoint: ``teacher``, ``student`` or ``pruned``."""
    if which not in ("teacher", "student", "pruned"):
        raise ValueError(f"unknown EfficientVLM checkpoint {which!r}; accepted: teacher, student, pruned")
    return load_vlm(asset_dir(f"efficientvlm/{which}"), device)
