"""Measuring EfficientVLM on ToyWorld: accuracy (ITM, zero-shot retrieval), size and real inference speed."""

from __future__ import annotations

import time

import numpy as np
import torch

from labkit.clip.model import ClipModel
from labkit.core.device import synchronize
from labkit.data import toyworld as tw
from labkit.efficientvlm.model import ToyVLM, trim_padding
from labkit.efficientvlm.prune import Gates, prune_student


def eval_scenes(clip: ClipModel, n: int = 1000, split: str = "test", seed: int = 0):
    """``n`` held-out scenes with 2-3 objects: images, canonical captions, and a hard negative caption each
    (the same scene with different shapes: colours, sizes and positions all match)."""
    world = tw.ToyWorld(split, seed, n, objects=(2, 3), canonical_captions=True)
    scenes = [world.scene(i) for i in range(n)]
    negatives = [world.hard_negative_group(i, 2)[1] for i in range(n)]
    images = clip.prepare(torch.from_numpy(np.stack([s.render() for s in scenes])).permute(0, 3, 1, 2))
    return images, clip.tokenize([s.caption() for s in scenes]), clip.tokenize([s.caption() for s in negatives])


@torch.no_grad()
def evaluate_vlm(model: ToyVLM, data, batch_size: int = 250, rerank_k: int = 16) -> dict:
    """ITM accuracy on positives + hard negatives, and zero-shot retrieval R@1 (mean of i2t and t2i) two ways.

    ``retrieval_r1`` ranks by the ITC embeddings alone; ``retrieval_rerank_r1`` follows the paper's protocol
    (X-VLM / EfficientVLM ``evaluation`` in ``Eff_Retrieval.py``): the ``rerank_k`` best ITC candidates of each
    query are re-scored by the fusion encoder's ITM head and the best ITM score wins (``rerank_k=0`` skips it).
    """
    if rerank_k < 0:
        raise ValueError(f"rerank_k must be >= 0 (0 skips re-ranking), got {rerank_k}")
    images, captions, negatives = data
    model.eval()
    device = next(model.parameters()).device
    captions, negatives = trim_padding(captions).to(device), trim_padding(negatives).to(device)
    image_states, text_states, image_emb, text_emb, correct = [], [], [], [], 0
    for i in range(0, len(images), batch_size):
        image = model.encode_image(images[i:i + batch_size].to(device))
        pos, neg = captions[i:i + batch_size], negatives[i:i + batch_size]
        text_pos, text_neg = model.encode_text(pos), model.encode_text(neg)
        image_states.append(image.states)
        text_states.append(text_pos.states)
        image_emb.append(model.image_embedding(image))
        text_emb.append(model.text_embedding(text_pos, pos))
        for text, ids, label in ((text_pos, pos, 1), (text_neg, neg, 0)):
            pred = model.itm_logits(model.fuse(text.states, ids, image.states)).argmax(-1)
            correct += int((pred == label).sum())
    sim = torch.cat(image_emb) @ torch.cat(text_emb).T
    image_states, text_states = torch.cat(image_states), torch.cat(text_states)
    target = torch.arange(len(sim), device=sim.device)
    i2t = float((sim.argmax(1) == target).float().mean())
    t2i = float((sim.argmax(0) == target).float().mean())
    metrics = {"itm_accuracy": correct / (2 * len(images)), "retrieval_i2t_r1": i2t, "retrieval_t2i_r1": t2i,
               "retrieval_r1": (i2t + t2i) / 2}
    if rerank_k:
        rerank_i2t = _reranked_hits(model, sim, image_states, text_states, captions, rerank_k, batch_size)
        rerank_t2i = _reranked_hits(model, sim.T, image_states, text_states, captions, rerank_k, batch_size,
                                    text_queries=True)
        metrics.update(retrieval_rerank_i2t_r1=rerank_i2t, retrieval_rerank_t2i_r1=rerank_t2i,
                       retrieval_rerank_r1=(rerank_i2t + rerank_t2i) / 2)
    return metrics


def _reranked_hits(model: ToyVLM, sim: torch.Tensor, image_states: torch.Tensor, text_states: torch.Tensor,
                   ids: torch.Tensor, k: int, batch_size: int, text_queries: bool = False) -> float:
    """R@1 when each query's top-``k`` ITC candidates (rows of ``sim``) are re-ranked by the ITM positive logit."""
    k = min(k, sim.shape[1])
    candidates = sim.topk(k, dim=1).indices  # [N, k]
    queries = torch.arange(len(sim), device=sim.device)[:, None].expand(-1, k)
    image_idx, text_idx = (candidates, queries) if text_queries else (queries, candidates)
    image_idx, text_idx = image_idx.reshape(-1), text_idx.reshape(-1)
    scores = torch.cat([
        model.itm_logits(model.fuse(text_states[t], ids[t], image_states[v]))[:, 1]
        for t, v in zip(text_idx.split(batch_size * 4), image_idx.split(batch_size * 4))]).view(-1, k)
    best = candidates.gather(1, scores.argmax(1, keepdim=True)).squeeze(1)
    return float((best == queries[:, 0]).float().mean())


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def inference_speedup(baseline: ToyVLM, candidates: dict[str, ToyVLM], images: torch.Tensor, ids: torch.Tensor,
                      repeats: int = 15, warmup: int = 3) -> dict:
    """Median time of ``match_scores`` (all three encoders) per model, measured interleaved in one process.

    Returns ``{"baseline_ms": ..., name: {"ms": ..., "speedup": baseline / name}}``.
    """
    ids = trim_padding(ids)
    models = {"baseline": baseline, **candidates}
    times = {name: [] for name in models}
    for r in range(warmup + repeats):
        for name, model in models.items():
            model.eval()
            device = next(model.parameters()).device
            synchronize(device)
            t0 = time.perf_counter()
            model.match_scores(images.to(device), ids.to(device))
            synchronize(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    base = float(np.median(times["baseline"]))
    return {"baseline_ms": 1000 * base,
            **{name: {"ms": 1000 * float(np.median(times[name])), "speedup": base / float(np.median(times[name]))}
               for name in candidates}}


def eval_efficient(clip: ClipModel, teacher: ToyVLM, student: ToyVLM, pruned: ToyVLM, sweep_targets=(0.3, 0.5, 0.7, 0.8),
                   sweep_steps: int = 800, sweep_recover_steps: int = 150, n: int = 1000, bench_batch: int = 128,
                   repeats: int = 15, seed: int = 0, rerank_k: int = 16, progress: bool = True) -> dict:
    """Sizes, speedup over the teacher, retention and per-modality sparsity; plus a sweep of pruning targets.

    Accuracy is measured on ``n`` held-out test scenes; speed as the median time of ``match_scores``
    on ``bench_batch`` pairs, all models interleaved in this process. Each sweep point prunes the
    student afresh for ``sweep_steps`` steps, then recovers for ``sweep_recover_steps`` (the shipped
    model's recipe at a smaller budget). ``retention_retrieval`` is the ITC zero-shot R@1 relative to
    the teacher; ``retention_retrieval_rerank`` the same under the paper's ITM re-ranking of the top ``rerank_k``.
    """
    if rerank_k < 1:
        raise ValueError(f"rerank_k must be >= 1: eval_efficient reports re-ranked retrieval, got {rerank_k}")
    data = eval_scenes(clip, n)
    metrics = {name: evaluate_vlm(m, data, rerank_k=rerank_k)
               for name, m in (("teacher", teacher), ("student", student), ("pruned", pruned))}
    sweep_models = {}
    for target in sweep_targets:
        sweep_models[f"target_{target}"], _ = prune_student(student, teacher, clip, target, sweep_steps, seed=seed,
                                                             recover_steps=sweep_recover_steps, progress=progress)
        metrics[f"target_{target}"] = evaluate_vlm(sweep_models[f"target_{target}"], data, rerank_k=rerank_k)
    images, captions = data[0][:bench_batch], data[1][:bench_batch]
    speed = inference_speedup(teacher, {"student": student, "pruned": pruned, **sweep_models}, images, captions, repeats)

    def retention(name: str, key: str) -> float:
        return metrics[name][key] / metrics["teacher"][key]

    full = Gates(student).total_params()  # prunable parameters per modality before pruning

    def sparsity(model: ToyVLM) -> dict:
        kept = Gates(model).total_params()
        return {m: 1 - kept[m] / full[m] for m in full}

    def realised_sparsity(model: ToyVLM) -> float:
        return 1 - sum(Gates(model).total_params().values()) / sum(full.values())

    sweep = [{"target": t, "realised_sparsity": realised_sparsity(sweep_models[f"target_{t}"]),
              "params": count_params(sweep_models[f"target_{t}"]), "speedup": speed[f"target_{t}"]["speedup"],
              "retention_itm": retention(f"target_{t}", "itm_accuracy"),
              "retention_retrieval": retention(f"target_{t}", "retrieval_r1"),
              "retention_retrieval_rerank": retention(f"target_{t}", "retrieval_rerank_r1"),
              "sparsity_by_modality": sparsity(sweep_models[f"target_{t}"]), **metrics[f"target_{t}"]}
             for t in sweep_targets]
    return {
        "teacher_params": count_params(teacher), "student_params": count_params(student),
        "pruned_params": count_params(pruned), **pruned_recipe(pruned),
        "speedup": speed["pruned"]["speedup"], "student_speedup": speed["student"]["speedup"],
        "teacher_ms": speed["baseline_ms"], "pruned_ms": speed["pruned"]["ms"], "bench_batch": bench_batch,
        "retention_itm": retention("pruned", "itm_accuracy"), "retention_retrieval": retention("pruned", "retrieval_r1"),
        "student_retention_itm": retention("student", "itm_accuracy"),
        "student_retention_retrieval": retention("student", "retrieval_r1"),
        "retention_retrieval_rerank": retention("pruned", "retrieval_rerank_r1"),
        "student_retention_retrieval_rerank": retention("student", "retrieval_rerank_r1"), "rerank_k": rerank_k,
        "sparsity_by_modality": sparsity(pruned),
        "metrics": metrics, "sweep": sweep, "sweep_steps": sweep_steps,
        "sweep_recover_steps": sweep_recover_steps, "n_scenes": n,
        "device": str(next(teacher.parameters()).device), "threads": torch.get_num_threads(),
    }


def pruned_recipe(model: ToyVLM) -> dict:
    """How a pruned checkpoint was made, from its saved metadata: ``pruned_target`` (None if unknown) and
    ``pruned_recover_steps`` (0 for checkpoints made before recovery existed)."""
    meta = getattr(model, "meta", {})
    return {"pruned_target": meta.get("target"), "pruned_recover_steps": meta.get("recover_steps", 0)}
