"""BLIP-2 on ToyWorld, evaluation and inspection: exact metrics (every scene's ground truth is known:
caption attribute accuracy, VQA accuracy by question type, ITC retrieval R@1), the text-only LM's
ceiling, and what the queries look at (cross-attention maps, per question for a text-conditioned stage 2).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from labkit.blip2.data import (
    TEXT_LEN,
    FrozenPatchEncoder,
    caption_text,
    qa_text,
    question_prefixes,
    question_type,
    render,
    tokenizer,
)
from labkit.blip2.lm import TextBatch, count_params, lm_generate
from labkit.blip2.stage1 import Blip2Stage1, itc_similarity
from labkit.blip2.stage2 import Blip2Stage2
from labkit.core.device import autocast
from labkit.data import toyworld as tw
from labkit.data.tokenizer import EOT, SOT, WordTokenizer

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


def eval_scenes(n: int, seed: int = 0, objects=(1, 3), split: str = "test") -> list[tw.Scene]:
    """``n`` held-out scenes: ``split="val"`` during training and for choosing a recipe, ``"test"`` for the report."""
    world = tw.ToyWorld(split, seed, n, objects=objects)
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


def evaluate_text_lm(lm: nn.Module, n: int = 200, seed: int = 0, split: str = "test") -> dict:
    """The text-only LM answering from the true caption: the ceiling it puts on stage 2 (docs/design.md)."""
    tok, scenes = tokenizer(), eval_scenes(n, seed, split=split)
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
def itc_retrieval_r1(model: Blip2Stage1, encoder: FrozenPatchEncoder, n: int = 1000, seed: int = 0,
                     split: str = "test") -> float:
    """Image->text R@1 with the stage-1 ITC similarity (max over queries) against canonical captions of 2-3-object scenes."""
    scenes, tok = eval_scenes(n, seed, objects=(2, 3), split=split), tokenizer()
    model.eval()
    device = encoder.mean.device
    ids = tok([s.caption() for s in scenes]).to(device)
    with autocast(device):
        text = torch.cat([model.text_embeddings(c, c != 0) for c in ids.split(256)])
        image = torch.cat([model.image_embeddings(encoder(render(scenes[i: i + 256]))) for i in range(0, n, 256)])
    sim = itc_similarity(image.float(), text.float())
    return float((sim.argmax(1).cpu() == torch.arange(n)).float().mean())


def evaluate_stage2(model: Blip2Stage2, encoder: FrozenPatchEncoder, n: int = 200, seed: int = 0, details: bool = True,
                    split: str = "test") -> dict:
    """Caption attribute accuracy and VQA accuracy (colour + shape questions; all types alongside) on held-out scenes."""
    scenes = eval_scenes(n, seed, split=split)
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
