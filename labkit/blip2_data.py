"""BLIP-2 on ToyWorld: frozen image features, batches, both training stages, the text-only LM and evaluation.

- **Frozen image features** (BLIP-2, ICML 2023, §3.1 and §4.1): the toy CLIP vision tower's
  *second-to-last* layer patch tokens. BLIP-2 drops the ViT's last layer; here it matters even
  more, because the toy CLIP pools the CLS token, so its last-layer patch tokens never received
  a gradient in CLIP training (DESIGN.md, "BLIP-2").
- Every batch is made of **fresh scenes** (index-addressable ToyWorld): encoding 64 images with
  three small ViT blocks costs little next to a Q-Former step, and nothing is memorised.
- Stage 1 (§3.2) trains :class:`labkit.blip2.Blip2Stage1`; the lab's "pretrained LLM" is a tiny
  LM trained on ToyWorld text alone (captions and ``caption question? answer``); stage 2 (§3.3)
  trains :class:`labkit.blip2_lm.Blip2Stage2` on captioning and VQA. All three reuse
  :func:`labkit.train.fit`.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import toyworld as tw
from .blip2 import Blip2Stage1, itc_similarity
from .blip2_lm import (
    Blip2Stage2,
    TextBatch,
    check_lm_kind,
    count_params,
    lm_generate,
    lm_loss,
    load_module_state,
    new_lm,
    save_module,
)
from .device import autocast, fast_mode, get_device
from .models import ClipModel, load_clip
from .qformer import QFormerConfig
from .tokenizer import EOT, PAD, SOT, WordTokenizer, toyworld_vocabulary
from .train import TrainConfig, fit

ASSETS = Path(__file__).parent / "assets" / "blip2"
TRAIN_INDEX_SPACE = 10**12
CONTEXT = 64  # LM context: 16 soft prompts + up to 48 text tokens
TEXT_LEN = 32  # Q-Former text length (as the toy CLIP's)


# ---------------------------------------------------------------- frozen image features

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


# ---------------------------------------------------------------- text formats

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


def pick_question(scene: tw.Scene, rng: np.random.Generator) -> tuple[str, str]:
    qa = scene.questions()
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
        from .clip import PretrainBatches

        self.encoder, self.tok = encoder, tokenizer()
        self.sampler = PretrainBatches(clip, batch_size, caption_drop=0.0, seed=seed + 3, vary=("shape", "color"))

    def __call__(self, step: int, rank: int = 0, world: int = 1):
        scenes, captions = self.sampler.scenes(step, rank, world)
        ids = self.tok(captions).to(self.encoder.mean.device)
        return (self.encoder(render(scenes)), ids, ids != 0), len(scenes)


class Stage2Batches:
    """Stage-2 batches of fresh scenes: ``(features, TextBatch)``, each sample captioning or one VQA pair."""

    def __init__(self, encoder: FrozenPatchEncoder, batch_size: int = 64, vqa_fraction: float = 0.6, seed: int = 0):
        self.encoder, self.batch_size, self.vqa_fraction = encoder, batch_size, vqa_fraction
        self.world, self.tok = tw.ToyWorld("train", seed + 2, TRAIN_INDEX_SPACE), tokenizer()

    def __call__(self, step: int, rank: int = 0, world: int = 1):
        scenes, prefixes, suffixes = [], [], []
        for i in range(self.batch_size):
            index = (step * world + rank) * self.batch_size + i
            scene, rng = self.world.scene(index), self.world.rng(index, 7)
            prefix, suffix = (qa_text(self.tok, *pick_question(scene, rng)) if rng.random() < self.vqa_fraction
                              else caption_text(self.tok, scene.caption()))
            scenes.append(scene)
            prefixes.append(prefix)
            suffixes.append(suffix)
        feats = self.encoder(render(scenes))
        return (feats, TextBatch.from_lists(prefixes, suffixes).to(feats.device)), len(scenes)


# ---------------------------------------------------------------- exact evaluation (ground truth known)

_CANON = {w: canon for canon, words in tw._SYNONYMS.items() for w in words}


def parse_caption(caption: str) -> list[tuple[str | None, str | None, str | None]]:
    """``(shape, colour, position)`` per object phrase of a ToyWorld caption; synonyms mapped back, missing -> None."""
    body = caption.split(":", 1)[-1].replace(" and ", ",")
    objects = []
    for phrase in body.split(","):
        words = [_CANON.get(w, w) for w in phrase.split()]
        shape = next((w for w in words if w in tw.BASE_SHAPES + tw.NOVEL_SHAPES), None)
        color = next((w for w in words if w in tw.COLORS), None)
        where = words[words.index("the") + 1:] if "the" in words else []
        if shape or color:
            objects.append((shape, color, " ".join(where) or None))
    return objects


def caption_attribute_hits(scene: tw.Scene, caption: str) -> tuple[int, int]:
    """(objects whose shape, colour and position are all stated correctly, objects in the scene); each phrase used once."""
    phrases = parse_caption(caption)
    hits = 0
    for o in scene.objects:
        if (o.shape, o.color, o.position) in phrases:
            phrases.remove((o.shape, o.color, o.position))
            hits += 1
    return hits, len(scene.objects)


def question_type(question: str) -> str:
    for prefix, kind in (("what color", "color"), ("what shape", "shape"), ("where", "position"),
                         ("what size", "size"), ("how many", "count")):
        if question.startswith(prefix):
            return kind
    return "other"


def eval_scenes(n: int, seed: int = 0, objects=(1, 3)) -> list[tw.Scene]:
    world = tw.ToyWorld("test", seed, n, objects=objects)
    return [world.scene(i) for i in range(n)]


def _decode(tok: WordTokenizer, ids: torch.Tensor) -> list[str]:
    eot = tok.ids[EOT]
    out = []
    for row in ids.tolist():
        row = row[: row.index(eot)] if eot in row else row
        out.append(tok.decode(row))
    return out


@torch.no_grad()
def answer_and_caption(generate, scenes: list[tw.Scene], batch_size: int = 256) -> dict:
    """Run ``generate(scene_indices, prefix_ids, prefix_mask, max_new)`` for every question and a caption per scene.

    ``generate`` hides where the context comes from (soft prompts from images, or the true
    caption for the text-only LM). Returns predictions next to ground truth and exact metrics.
    """
    tok = tokenizer()
    jobs = [(i, qa_text(tok, q)[0], a, q) for i, s in enumerate(scenes) for q, a in s.questions()]
    jobs += [(i, caption_text(tok)[0], None, None) for i in range(len(scenes))]
    preds, n_qa = [], len(jobs) - len(scenes)
    for lo, hi, max_new in ((0, n_qa, 4), (n_qa, len(jobs), TEXT_LEN)):  # answers are 1-2 words, captions up to 30
        for start in range(lo, hi, batch_size):
            chunk = jobs[start: min(hi, start + batch_size)]
            text = TextBatch.from_lists([j[1] for j in chunk], [[]] * len(chunk))
            preds += _decode(tok, generate(torch.tensor([j[0] for j in chunk]), text.prefix_ids, text.prefix_mask, max_new).cpu())
    qa = [{"scene": j[0], "question": j[3], "answer": j[2], "pred": p, "type": question_type(j[3])}
          for j, p in zip(jobs, preds) if j[2] is not None]
    captions = [p for j, p in zip(jobs, preds) if j[2] is None]
    hits = np.array([caption_attribute_hits(s, c) for s, c in zip(scenes, captions)]).reshape(-1, 2)
    by_type = {}
    for kind in ("color", "shape", "position", "size", "count"):
        rows = [r["pred"] == r["answer"] for r in qa if r["type"] == kind]
        by_type[kind] = float(np.mean(rows)) if rows else float("nan")
    target = [r["pred"] == r["answer"] for r in qa if r["type"] in ("color", "shape")]
    return {"vqa_accuracy": float(np.mean(target)), "vqa_accuracy_all": float(np.mean([r["pred"] == r["answer"] for r in qa])),
            "vqa_by_type": by_type, "caption_attribute_accuracy": float(hits[:, 0].sum() / max(1, hits[:, 1].sum())),
            "qa": qa, "captions": captions}


def evaluate_text_lm(lm: nn.Module, n: int = 200, seed: int = 0) -> dict:
    """The text-only LM answering from the true caption: the ceiling it puts on stage 2 (DESIGN.md)."""
    tok, scenes = tokenizer(), eval_scenes(n, seed)
    device = next(lm.parameters()).device
    qa = [(s, q, a) for s in scenes for q, a in s.questions()]
    prefixes = [[tok.ids[SOT], *tok.encode(s.caption(np.random.default_rng(k))), *tok.encode(q)]
                for k, (s, q, _) in enumerate(qa)]
    preds = []
    lm.eval()
    for start in range(0, len(qa), 256):
        chunk = prefixes[start: start + 256]
        text = TextBatch.from_lists(chunk, [[]] * len(chunk)).to(device)
        with autocast(device):
            preds += _decode(tok, lm_generate(lm, None, text.prefix_ids, text.prefix_mask, 4, tok.ids[EOT]).cpu())
    right = [p == a for p, (_, _, a) in zip(preds, qa)]
    target = [r for r, (_, q, _) in zip(right, qa) if question_type(q) in ("color", "shape")]
    return {"lm_vqa_from_caption": float(np.mean(right)), "lm_vqa_from_caption_color_shape": float(np.mean(target))}


def binding_chance(n: int = 300, seed: int = 0) -> float:
    """Colour/shape QA accuracy of answering with the attribute of a *random* object of the scene.

    What an LM that reads the caption's words but not which colour belongs to which shape scores
    on the held-out scenes of :func:`evaluate_text_lm` (1 for one-object scenes, 1/2, 1/3 otherwise).
    """
    scenes = eval_scenes(n, seed)
    return float(np.mean([1 / len(s.objects) for s in scenes for q, _ in s.questions()
                          if question_type(q) in ("color", "shape")]))


@torch.no_grad()
def itc_retrieval_r1(model: Blip2Stage1, encoder: FrozenPatchEncoder, n: int = 1000, seed: int = 0) -> float:
    """Image->text R@1 with the stage-1 ITC similarity (max over queries) against canonical captions of 2-3-object scenes."""
    scenes, tok = eval_scenes(n, seed, objects=(2, 3)), tokenizer()
    model.eval()
    device = encoder.mean.device
    ids = tok([s.caption() for s in scenes]).to(device)
    with autocast(device):
        text = torch.cat([model.text_embeddings(c, c != 0) for c in ids.split(256)])
        image = torch.cat([model.image_embeddings(encoder(render(scenes[i: i + 256]))) for i in range(0, n, 256)])
    sim = itc_similarity(image.float(), text.float())
    return float((sim.argmax(1).cpu() == torch.arange(n)).float().mean())


# ---------------------------------------------------------------- building, training, saving, loading

def stage1_config() -> QFormerConfig:
    return QFormerConfig.tiny(vocab_size=tokenizer().vocab_size + 1, max_positions=TEXT_LEN, dropout=0.0)  # + [DEC]


def new_stage1() -> Blip2Stage1:
    return Blip2Stage1(stage1_config(), dec_token_id=tokenizer().vocab_size, embed_dim=128)


def new_text_lm(kind: str) -> nn.Module:
    tok = tokenizer()
    return new_lm(kind, tok.vocab_size, tok.ids[PAD], tok.ids[SOT], tok.ids[EOT], context=CONTEXT)


def _steps(steps: int) -> int:
    return min(steps, 8) if fast_mode() else steps


def _record(record: dict, wall: float) -> dict:
    hist = record["history"]
    return {"steps": record["steps"], "wall_seconds": round(wall, 1), "train_seconds": round(hist[-1]["train_seconds"], 1),
            "curve": [{"step": h["step"], "loss": round(h["loss"], 4)} for h in hist[:: max(1, len(hist) // 200)]]}


def train_text_lm(kind: str, steps: int = 3000, batch_size: int = 128, lr: float = 2e-3, seed: int = 0,
                  time_budget_s: float | None = None, out: str | Path | None = None,
                  progress: bool = True, meta: dict | None = None) -> tuple[nn.Module, dict]:
    """Pretrain the lab's tiny LM on ToyWorld text alone; returns the LM and a record (loss curve, QA-from-caption accuracy).

    QA-from-caption accuracy is also measured ten times during training (``qa_curve``, 100 held-out
    scenes): it sits at chance (the colour of *some* object in the caption) for thousands of steps,
    then binding the asked shape to its colour is learned in a jump.
    """
    torch.manual_seed(seed)
    lm, started = new_text_lm(kind), time.perf_counter()
    prefix_loss = False  # loss on the answer / caption only: on the caption prefix too, QA was never learned (see README)
    cfg = TrainConfig(steps=_steps(steps), lr=lr, seed=seed, weight_decay=0.01, time_budget_s=time_budget_s,
                      desc=f"text LM ({kind})", eval_every=max(1, _steps(steps) // 10))
    record = fit(lm, lambda m, text: lm_loss(m, None, text, prefix_loss=prefix_loss), TextLMBatches(kind, batch_size, seed=seed),
                 cfg, evaluate=lambda m: evaluate_text_lm(m, n=10 if fast_mode() else 100), progress=progress)
    info = {**_record(record, time.perf_counter() - started), **evaluate_text_lm(lm, n=50 if fast_mode() else 300),
            "qa_curve": [{k: e[k] for k in ("step", "lm_vqa_from_caption_color_shape")} for e in record["evals"]]}
    if out:
        save_module(out, lm.state_dict(), {"kind": kind, "lm_config": lm.config.to_dict(), "training": info, **(meta or {})})
    return lm, info


def load_text_lm(path: str | Path) -> nn.Module:
    state, config = load_module_state(path)
    lm = new_text_lm(config["kind"])
    lm.load_state_dict(state)
    return lm.eval()


def train_stage1(encoder: FrozenPatchEncoder, clip: ClipModel, steps: int = 2000, batch_size: int = 64, lr: float = 1e-3,
                 seed: int = 0, time_budget_s: float | None = None, out: str | Path | None = None,
                 progress: bool = True, meta: dict | None = None) -> tuple[Blip2Stage1, dict]:
    """Stage 1 (§3.2): ITC + ITM + ITG on fresh scenes; saves only the Q-Former and heads (the encoder is frozen)."""
    torch.manual_seed(seed)
    model, started = new_stage1(), time.perf_counter()

    def loss_fn(m, batch):
        out = m(*batch)
        return out.loss, {"itc": out.itc.item(), "itm": out.itm.item(), "itg": out.itg.item()}

    cfg = TrainConfig(steps=_steps(steps), lr=lr, seed=seed, weight_decay=0.05, time_budget_s=time_budget_s, desc="stage 1")
    record = fit(model, loss_fn, Stage1Batches(encoder, clip, batch_size, seed), cfg, device=encoder.mean.device,
                 progress=progress)
    info = _record(record, time.perf_counter() - started)
    info["curve_terms"] = [{k: round(h[k], 4) for k in ("step", "itc", "itm", "itg")}
                           for h in record["history"][:: max(1, len(record["history"]) // 200)]]
    info["itc_i2t_r1"] = itc_retrieval_r1(model, encoder, n=100 if fast_mode() else 1000)
    if out:
        save_module(out, model.state_dict(), {"qformer": model.config.to_dict(), "dec_token_id": model.dec_token_id,
                                              "embed_dim": model.vision_proj.out_features, "training": info, **(meta or {})})
    return model, info


def load_stage1(path: str | Path = ASSETS / "stage1") -> Blip2Stage1:
    state, config = load_module_state(path)
    model = Blip2Stage1(QFormerConfig(**config["qformer"]), config["dec_token_id"], config["embed_dim"])
    model.load_state_dict(state)
    return model.eval()


def train_stage2(encoder: FrozenPatchEncoder, lm: nn.Module, stage1: Blip2Stage1 | None = None, steps: int = 3000,
                 batch_size: int = 64, lr: float = 1e-3, seed: int = 0, time_budget_s: float | None = None,
                 out: str | Path | None = None, progress: bool = True, eval_n: int = 200,
                 meta: dict | None = None, text_conditioned: bool = False) -> tuple[Blip2Stage2, dict]:
    """Stage 2 (§3.3): Q-Former (from stage 1 when given) + projection into the frozen LM, captioning and VQA.

    ``text_conditioned``: the Q-Former also reads the prompt text (the question), as BLIP-2 does for VQA (§4.3).
    """
    torch.manual_seed(seed)
    qformer = copy.deepcopy(stage1.qformer) if stage1 is not None else None
    model = Blip2Stage2(stage1_config(), lm, qformer=qformer, text_conditioned=text_conditioned)
    started = time.perf_counter()
    cfg = TrainConfig(steps=_steps(steps), lr=lr, seed=seed, weight_decay=0.05, time_budget_s=time_budget_s,
                      desc=f"stage 2 ({model.lm_kind})")
    record = fit(model, lambda m, batch: m(*batch), Stage2Batches(encoder, batch_size, seed=seed), cfg,
                 device=encoder.mean.device, progress=progress)
    info = _record(record, time.perf_counter() - started)
    info.update(evaluate_stage2(model, encoder, n=min(eval_n, 30) if fast_mode() else eval_n, details=False))
    if out:
        save_module(out, model.trainable_state(), {"qformer": model.config.to_dict(), "lm_kind": model.lm_kind,
                                                   "from_stage1": stage1 is not None, "text_conditioned": text_conditioned,
                                                   "training": info, **(meta or {})})
    return model, info


def load_stage2(path: str | Path, lm: nn.Module) -> Blip2Stage2:
    state, config = load_module_state(path)
    model = Blip2Stage2(QFormerConfig(**config["qformer"]), lm, text_conditioned=config.get("text_conditioned", False))
    missing = set(model.trainable_state()) - set(state)
    if missing:
        raise ValueError(f"stage-2 checkpoint {path} lacks {sorted(missing)[:5]}")
    model.load_state_dict(state, strict=False)
    return model.eval()


def evaluate_stage2(model: Blip2Stage2, encoder: FrozenPatchEncoder, n: int = 200, seed: int = 0, details: bool = True) -> dict:
    """Caption attribute accuracy and VQA accuracy (colour + shape questions; all types alongside) on held-out scenes."""
    scenes = eval_scenes(n, seed)
    model.eval()
    device = encoder.mean.device
    feats = torch.cat([encoder(render(scenes[i: i + 256])) for i in range(0, n, 256)])
    eos = tokenizer().ids[EOT]
    with autocast(device):
        result = answer_and_caption(lambda idx, ids, mask, k: model.generate(feats[idx.to(device)], ids.to(device),
                                                                             mask.to(device), k, eos), scenes)
    return result if details else {k: v for k, v in result.items() if k not in ("qa", "captions")}


def param_counts(model: Blip2Stage2, encoder: FrozenPatchEncoder) -> dict:
    """Trainable (query path + projection) vs frozen (image encoder layers used + LM) parameters of the stage-2 pipeline."""
    trainable = count_params(model, trainable=True)
    frozen = count_params(encoder) + count_params(model.lm)
    return {"trainable_params": trainable, "frozen_params": frozen,
            "trainable_fraction": round(trainable / (trainable + frozen), 4)}


# ---------------------------------------------------------------- equivalence with transformers

def hf_equivalence_max_abs_diff(seed: int = 0) -> float:
    """Max abs difference between labkit's Q-Former and ``transformers``' ``Blip2QFormerModel`` with the same random weights.

    Two random configurations (cross-attention in every layer / every other layer), weights
    moved off their init, queries alone and queries + text (bi-directional), fp32.
    """
    worst = 0.0
    with torch.random.fork_rng():  # deterministic weights without disturbing the caller's random state
        torch.manual_seed(seed)
        for config in ((32, 2, 4, 1, 24, 4), (48, 3, 3, 2, 40, 5)):
            worst = max(worst, _hf_equivalence_case(*config, seed=seed))
    return worst


def _hf_equivalence_case(hidden, layers, heads, freq, width, n_query, seed) -> float:
    """One configuration: max abs difference of the query outputs and of the queries + text outputs."""
    from transformers import Blip2QFormerConfig, Blip2QFormerModel
    from transformers.models.blip_2.modeling_blip_2 import Blip2TextEmbeddings

    from .qformer import QFormer, load_hf_qformer

    cfg = Blip2QFormerConfig(vocab_size=40, max_position_embeddings=16, hidden_size=hidden, num_hidden_layers=layers,
                             num_attention_heads=heads, intermediate_size=2 * hidden, encoder_hidden_size=width,
                             cross_attention_frequency=freq, use_qformer_text_input=True)
    g = torch.Generator().manual_seed(seed)
    hf = Blip2QFormerModel._from_config(cfg, attn_implementation="eager").eval()
    emb = Blip2TextEmbeddings(cfg).eval()
    with torch.no_grad():
        for p in [*hf.parameters(), *emb.parameters()]:
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    queries = torch.randn(1, n_query, hidden, generator=g)
    ours = QFormer(QFormerConfig.from_hf(cfg, num_queries=n_query)).eval()
    load_hf_qformer(ours, {**hf.state_dict(), **{f"embeddings.{k}": v for k, v in emb.state_dict().items()}}, queries)
    feats, ids = torch.randn(3, 7, width, generator=g), torch.randint(1, 40, (3, 6), generator=g)
    mask = torch.arange(6)[None] < torch.tensor([6, 4, 2])[:, None]
    q = queries.expand(3, -1, -1)
    with torch.no_grad():
        ref_q = hf(query_embeds=q, encoder_hidden_states=feats).last_hidden_state
        ref_qt = hf(query_embeds=emb(ids, query_embeds=q), query_length=n_query, encoder_hidden_states=feats,
                    attention_mask=torch.cat([torch.ones(3, n_query), mask.float()], 1)).last_hidden_state
        out_q, out_qt = ours(feats), ours(feats, ids, mask, mode="itm")
    return max((out_q.query - ref_q).abs().max().item(),
               (torch.cat([out_qt.query, out_qt.text], 1) - ref_qt).abs().max().item())


# ---------------------------------------------------------------- a real BLIP-2, when cached

def cached_blip2(model_id: str = "Salesforce/blip2-opt-2.7b") -> bool:
    """Whether ``model_id``'s config is in the Hugging Face cache (never touches the network)."""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(model_id, "config.json"), str)


@torch.no_grad()
def real_query_attention(model_id: str, image: np.ndarray) -> tuple[torch.Tensor, int]:
    """Cross-attention of a cached real BLIP-2's queries over ``image`` (HWC uint8): ``([Q, grid, grid], grid)``.

    Averaged over heads and over the Q-Former's cross-attention layers. Raises ``ValueError``
    when the weights are not cached (the lab never downloads at run time).
    """
    if not cached_blip2(model_id):
        raise ValueError(f"{model_id} is not in the Hugging Face cache; on a machine with internet run "
                         f"`huggingface-cli download {model_id}` and copy ~/.cache/huggingface here")
    from transformers import Blip2Model, Blip2Processor

    processor = Blip2Processor.from_pretrained(model_id, local_files_only=True)
    model = Blip2Model.from_pretrained(model_id, local_files_only=True, torch_dtype=torch.float32).eval()
    pixels = processor(images=image, return_tensors="pt")["pixel_values"]
    feats = model.vision_model(pixels).last_hidden_state
    out = model.qformer(query_embeds=model.query_tokens, encoder_hidden_states=feats, output_attentions=True)
    maps = torch.stack([a for a in out.cross_attentions if a is not None]).mean(dim=(0, 2))[0, :, 1:]  # drop CLS
    grid = int(round(maps.shape[-1] ** 0.5))
    return maps.view(-1, grid, grid), grid


# ---------------------------------------------------------------- looking inside

@torch.no_grad()
def query_cross_attention(qformer, feats: torch.Tensor, layer: int | None = None, text_ids: torch.Tensor | None = None,
                          text_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Each query's cross-attention over the image patches, ``[B, Q, g, g]``: mean over heads and cross-attention layers
    (or one ``layer``). The patch grid is square (8×8 for the toy CLIP). With ``text_ids`` the queries also read
    that text (ITM layout), as a text-conditioned stage 2 reads the question."""
    out = qformer(feats, return_attention=True) if text_ids is None else \
        qformer(feats, text_ids, text_mask, mode="itm", return_attention=True)
    all_maps = out.cross_attentions
    if layer is not None and (not 0 <= layer < len(all_maps) or all_maps[layer] is None):
        raise ValueError(f"Q-Former layer {layer} has no cross-attention (layers 0, "
                         f"{qformer.config.cross_attention_frequency}, ... of {len(all_maps)} have)")
    maps = [all_maps[layer]] if layer is not None else [m for m in all_maps if m is not None]
    maps = torch.stack(maps).mean(dim=(0, 2))  # [B, Q, N]
    grid = int(round(maps.shape[-1] ** 0.5))
    if grid * grid != maps.shape[-1]:
        raise ValueError(f"{maps.shape[-1]} image tokens do not form a square grid (drop the CLS token first)")
    return maps.unflatten(-1, (grid, grid))


def question_attention(model: Blip2Stage2, feats: torch.Tensor, questions: list[str]) -> torch.Tensor:
    """Where a text-conditioned stage 2 looks for each question: the queries' mean cross-attention, ``[len(questions), g, g]``,
    on one image's features ``[1, N, W]``; the question enters exactly as in training (the LM prefix)."""
    if not model.text_conditioned:
        raise ValueError("question_attention needs a text-conditioned stage 2 (--text-conditioned); "
                         "this one does not read the question")
    ids, mask = question_prefixes(questions, feats.device)
    maps = query_cross_attention(model.qformer, feats.expand(len(questions), -1, -1), text_ids=ids, text_mask=mask)
    return maps.mean(dim=1)


@torch.no_grad()
def pipeline_shapes(model: Blip2Stage2, encoder: FrozenPatchEncoder, images: torch.Tensor) -> list[tuple[str, tuple]]:
    """The stage-2 pipeline step by step (§3.1-3.3): the shape of what each stage hands to the next."""
    feats = encoder(images)
    queries = model.qformer(feats).query
    prompts = model.proj(queries)
    return [("images (uint8)", tuple(images.shape)), ("frozen CLIP patch tokens, 2nd-to-last layer", tuple(feats.shape)),
            ("learned queries", tuple(model.qformer.query_tokens.shape)), ("Q-Former query outputs", tuple(queries.shape)),
            ("soft prompts = Linear(query outputs)", tuple(prompts.shape)),
            (f"frozen {model.lm_kind.upper()} input embeddings (width)", (model.lm.get_input_embeddings().embedding_dim,))]


def checkpoint_record(path: str | Path) -> dict:
    """The training record stored in a checkpoint's ``config.json`` (loss curve, wall time, metrics)."""
    return load_module_state(path)[1].get("training", {})


def load_or_train(encoder: FrozenPatchEncoder, clip: ClipModel, lm_kind: str = "opt", assets: str | Path = ASSETS,
                  steps: int = 200, progress: bool = True) -> dict:
    """Stage 1, the text-only LM and stage 2 from ``assets`` when present, else trained briefly (``steps`` each).

    Returns ``{"stage1", "lm", "stage2", "records"}``; ``records`` holds each part's training record.
    """
    assets = Path(assets)
    out: dict = {"records": {}}
    parts = (("stage1", lambda: train_stage1(encoder, clip, steps, batch_size=32, progress=progress), load_stage1),
             (f"lm_{lm_kind}", lambda: train_text_lm(lm_kind, steps, progress=progress), load_text_lm))
    for name, train, load in parts:
        path = assets / name
        if (path / "config.json").is_file():
            out[name], out["records"][name] = load(path), checkpoint_record(path)
        else:
            out[name], out["records"][name] = train()
    out["stage1"].to(encoder.mean.device)
    out["lm"] = out.pop(f"lm_{lm_kind}")
    path = assets / f"stage2_{lm_kind}"
    if (path / "config.json").is_file():
        out["stage2"], out["records"]["stage2"] = load_stage2(path, out["lm"]), checkpoint_record(path)
    else:
        out["stage2"], out["records"]["stage2"] = train_stage2(encoder, out["lm"], out["stage1"], steps, progress=progress,
                                                                eval_n=20)
    out["stage2"].to(encoder.mean.device)
    return out
