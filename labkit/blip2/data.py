"""BLIP-2 on ToyWorld, data: the frozen image features and the batches of both training stages and of the text-only LM.

- **Frozen image features** (BLIP-2, ICML 2023, §3.1 and §4.1): the toy CLIP vision tower's
  *second-to-last* layer patch tokens. BLIP-2 drops the ViT's last layer; here it matters even
  more, because the toy CLIP pools the CLS token, so its last-layer patch tokens never received
  a gradient in CLIP training (docs/design.md, "BLIP-2").
- Every batch is made of **fresh scenes** (index-addressable ToyWorld): encoding 64 images with
  three small ViT blocks costs little next to a Q-Former step, and nothing is memorised.

Training lives in :mod:`labkit.blip2.train`, evaluation and inspection in :mod:`labkit.blip2.eval`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from labkit.blip2.lm import TextBatch, check_lm_kind
from labkit.clip.model import ClipModel, load_clip
from labkit.clip.pretrain import PretrainBatches
from labkit.core.device import get_device
from labkit.data import toyworld as tw
from labkit.data.tokenizer import EOT, SOT, WordTokenizer, toyworld_vocabulary

TRAIN_INDEX_SPACE = 10**12
TEXT_LEN = 32  # Q-Former text length (as the toy CLIP's)


class FrozenPatchEncoder(nn.Module):
    """An open_clip ``VisionTransformer`` cut after block ``len(blocks) - drop_last``: patch tokens ``[B, grid², width]``.

    ``drop_last=1`` gives the second-to-last layer's output, as BLIP-2 uses (§3.1). Takes uint8
    images (scaled, resized and normalised here) or already-normalised float images. Always
    frozen and in eval mode (the conv stem's BatchNorm keeps its statistics).
    """

    def __init__(self, clip: ClipModel, drop_last: int = 1, include_cls: bool = False):
        super().__init__()
        visual = clip.model.visual
        blocks = list(visual.transformer.resblocks)
        if not 0 <= drop_last < len(blocks):
            raise ValueError(f"drop_last must lie in [0, {len(blocks)}), got {drop_last}")
        self.conv1, self.ln_pre = visual.conv1, visual.ln_pre
        self.class_embedding, self.positional_embedding = visual.class_embedding, visual.positional_embedding
        self.blocks = nn.ModuleList(blocks[: len(blocks) - drop_last])
        self.batch_first = getattr(visual.transformer, "batch_first", True)
        self.include_cls, self.image_size = include_cls, clip.image_size
        self.width = visual.positional_embedding.shape[-1]
        self.register_buffer("mean", clip.mean.detach().clone().cpu(), persistent=False)
        self.register_buffer("std", clip.std.detach().clone().cpu(), persistent=False)
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True):
        return super().train(False)

    @property
    def grid(self) -> int:
        return int(round((self.positional_embedding.shape[0] - 1) ** 0.5))

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got shape {tuple(images.shape)}")
        x = images.to(self.mean.device)
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
            if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
                x = F.interpolate(x, size=(self.image_size,) * 2, mode="bilinear", antialias=True, align_corners=False)
            x = (x - self.mean) / self.std
        x = self.conv1(x).flatten(2).transpose(1, 2)  # [B, grid², width]
        cls = self.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
        x = self.ln_pre(torch.cat([cls, x], 1) + self.positional_embedding.to(x.dtype))
        if not self.batch_first:
            x = x.transpose(0, 1)
        for block in self.blocks:
            x = block(x)
        if not self.batch_first:
            x = x.transpose(0, 1)
        return x if self.include_cls else x[:, 1:]


def load_encoder(clip: str | ClipModel = "toy", device=None) -> FrozenPatchEncoder:
    """The frozen image encoder of every BLIP-2 stage here: second-to-last-layer patch tokens of a CLIP."""
    clip = load_clip(clip, device) if isinstance(clip, str) else clip
    return FrozenPatchEncoder(clip).to(clip.device)


def render(scenes: list[tw.Scene]) -> torch.Tensor:
    """uint8 ``[B, 3, 64, 64]`` images of the scenes."""
    return torch.from_numpy(np.stack([s.render() for s in scenes])).permute(0, 3, 1, 2)


def tokenizer() -> WordTokenizer:
    return WordTokenizer(toyworld_vocabulary(), TEXT_LEN)


def qa_text(tok: WordTokenizer, question: str, answer: str | None = None) -> tuple[list[int], list[int]]:
    """VQA as (prefix, suffix) ids: ``question?`` then ``answer <eot>`` (the soft prompts stand in for ``<sot> caption``)."""
    suffix = [] if answer is None else [*tok.encode(answer), tok.ids[EOT]]
    return tok.encode(question), suffix


def caption_text(tok: WordTokenizer, caption: str | None = None) -> tuple[list[int], list[int]]:
    """Captioning as (prefix, suffix) ids: ``<sot>`` then ``caption <eot>``."""
    suffix = [] if caption is None else [*tok.encode(caption), tok.ids[EOT]]
    return [tok.ids[SOT]], suffix


def question_prefixes(questions: list[str], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(prefix_ids, prefix_mask)`` of questions as a stage-2 prefix: what a text-conditioned Q-Former reads."""
    tok = tokenizer()
    text = TextBatch.from_lists([qa_text(tok, q)[0] for q in questions], [[]] * len(questions))
    return text.prefix_ids.to(device), text.prefix_mask.to(device)


def question_type(question: str) -> str:
    """``color``, ``shape``, ``position``, ``size`` or ``count`` for a ToyWorld question (``other`` if none)."""
    for prefix, kind in (("what color", "color"), ("what shape", "shape"), ("where", "position"),
                         ("what size", "size"), ("how many", "count")):
        if question.startswith(prefix):
            return kind
    return "other"


def pick_question(scene: tw.Scene, rng: np.random.Generator, shape_share: float = 0.0) -> tuple[str, str]:
    """One of the scene's questions, uniformly; with probability ``shape_share`` a "what shape is the <colour>
    object?" question instead, when the scene has one (the only question that must find an object by its colour)."""
    qa = scene.questions()
    if shape_share and rng.random() < shape_share:
        shape = [pair for pair in qa if question_type(pair[0]) == "shape"]
        if shape:
            return shape[rng.integers(len(shape))]
    return qa[rng.integers(len(qa))]


class TextLMBatches:
    """Text-only pretraining data for the lab's LM: ``<sot> caption <eot>`` and ``<sot> caption question? answer <eot>``.

    Captions use ToyWorld's templates, synonyms and random object order, so answering means
    reading the caption, not memorising a layout. For T5 the caption (+ question) is the encoder
    prefix and the suffix is the canonical caption or the answer.
    """

    def __init__(self, kind: str, batch_size: int = 128, qa_fraction: float = 0.75, seed: int = 0):
        self.kind, self.batch_size, self.qa_fraction = check_lm_kind(kind), batch_size, qa_fraction
        self.world, self.tok = tw.ToyWorld("train", seed + 1, TRAIN_INDEX_SPACE), tokenizer()

    def __call__(self, step: int, rank: int = 0, world: int = 1):
        tok, prefixes, suffixes = self.tok, [], []
        for i in range(self.batch_size):
            index = (step * world + rank) * self.batch_size + i
            scene, rng = self.world.scene(index), self.world.rng(index, 7)
            caption = tok.encode(self.world.caption(index, scene))
            if rng.random() < self.qa_fraction:
                question, answer = qa_text(tok, *pick_question(scene, rng))
                prefix, suffix = [tok.ids[SOT], *caption, *question], answer
            elif self.kind == "t5":
                prefix, suffix = [tok.ids[SOT], *caption], caption_text(tok, scene.caption())[1]
            else:
                prefix, suffix = [tok.ids[SOT]], [*caption, tok.ids[EOT]]
            prefixes.append(prefix)
            suffixes.append(suffix)
        return TextBatch.from_lists(prefixes, suffixes).to(get_device()), self.batch_size


class Stage1Batches:
    """Stage-1 batches of fresh scenes: ``(features [B, N, W], text ids, text mask)``; half in hard-negative groups.

    Reuses the toy CLIP's pretraining sampler (:class:`labkit.clip.PretrainBatches`): groups of 4
    scenes that differ only in their shapes, alternating with groups that differ only in their
    colours, make ITC and ITM need the shape words and the colour words (with shape groups alone
    colour words were never needed; measured: ITC R@1 0.29 -> 0.915 with 2,000 steps).
    """

    def __init__(self, encoder: FrozenPatchEncoder, clip: ClipModel, batch_size: int = 64, seed: int = 0):
        self.encoder, self.tok = encoder, tokenizer()
        self.sampler = PretrainBatches(clip, batch_size, caption_drop=0.0, seed=seed + 3, vary=("shape", "color"))

    def __call__(self, step: int, rank: int = 0, world: int = 1):
        scenes, captions = self.sampler.scenes(step, rank, world)
        ids = self.tok(captions).to(self.encoder.mean.device)
        return (self.encoder(render(scenes)), ids, ids != 0), len(scenes)


class Stage2Batches:
    """Stage-2 batches of fresh scenes: ``(features, TextBatch)``, each sample captioning or one VQA pair.

    ``shape_share``: the share of VQA pairs that are colour-keyed shape questions (:func:`pick_question`);
    0 draws uniformly from a scene's questions, about one in five of which is a shape question.
    """

    def __init__(self, encoder: FrozenPatchEncoder, batch_size: int = 64, vqa_fraction: float = 0.6, seed: int = 0,
                 shape_share: float = 0.0):
        if not 0 <= shape_share <= 1:
            raise ValueError(f"shape_share must lie in [0, 1], got {shape_share}")
        self.encoder, self.batch_size, self.vqa_fraction, self.shape_share = encoder, batch_size, vqa_fraction, shape_share
        self.world, self.tok = tw.ToyWorld("train", seed + 2, TRAIN_INDEX_SPACE), tokenizer()

    def __call__(self, step: int, rank: int = 0, world: int = 1):
        scenes, prefixes, suffixes = [], [], []
        for i in range(self.batch_size):
            index = (step * world + rank) * self.batch_size + i
            scene, rng = self.world.scene(index), self.world.rng(index, 7)
            prefix, suffix = (qa_text(self.tok, *pick_question(scene, rng, self.shape_share)) if rng.random() < self.vqa_fraction
                              else caption_text(self.tok, scene.caption()))
            scenes.append(scene)
            prefixes.append(prefix)
            suffixes.append(suffix)
        feats = self.encoder(render(scenes))
        return (feats, TextBatch.from_lists(prefixes, suffixes).to(feats.device)), len(scenes)
