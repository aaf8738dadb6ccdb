"""BLIP-2 on ToyWorld, training: stage 1 (§3.2, :class:`labkit.blip2.stage1.Blip2Stage1`), the lab's "pretrained
LLM" (a tiny LM trained on ToyWorld text alone: captions and ``caption question? answer``) and
stage 2 (§3.3, :class:`labkit.blip2.stage2.Blip2Stage2`, captioning and VQA); all reuse
:func:`labkit.core.train.fit`. Saving, loading (the lab's checkpoint format, :mod:`labkit.core.checkpoint`,
weights stored in fp16 to keep the shipped files small), and "load the shipped checkpoint if present, else
train". :func:`train_qformer` is ``labkit train qformer``.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
from torch import nn

from labkit.blip2.data import TEXT_LEN, FrozenPatchEncoder, Stage1Batches, Stage2Batches, TextLMBatches, tokenizer
from labkit.blip2.eval import evaluate_stage2, evaluate_text_lm, itc_retrieval_r1
from labkit.blip2.lm import lm_loss, new_lm
from labkit.blip2.qformer import QFormerConfig
from labkit.blip2.stage1 import Blip2Stage1
from labkit.blip2.stage2 import Blip2Stage2
from labkit.clip.model import ClipModel
from labkit.core.assets import asset_dir
from labkit.core.checkpoint import invocation, is_checkpoint, load_checkpoint, read_metadata, save_checkpoint
from labkit.core.train import TrainConfig, fit, shorten
from labkit.data.tokenizer import EOT, PAD, SOT

CONTEXT = 64  # LM context: 16 soft prompts + up to 48 text tokens


def stage1_config(ln_vision: bool = False) -> QFormerConfig:
    """The tiny Q-Former of every ToyWorld stage (vocabulary + [DEC]). Dropout is 0 where LAVIS's BERT config
    has 0.1: every batch is freshly rendered, so there is no fixed training set to overfit (0.1 is untested here).
    ``ln_vision`` adds LAVIS's LayerNorm on the frozen features (off: see ``docs/blip2.md``)."""
    return QFormerConfig.tiny(vocab_size=tokenizer().vocab_size + 1, max_positions=TEXT_LEN, dropout=0.0,
                              ln_vision=ln_vision)


def new_stage1(ln_vision: bool = False) -> Blip2Stage1:
    return Blip2Stage1(stage1_config(ln_vision), dec_token_id=tokenizer().vocab_size, embed_dim=128)


def new_text_lm(kind: str) -> nn.Module:
    tok = tokenizer()
    return new_lm(kind, tok.vocab_size, tok.ids[PAD], tok.ids[SOT], tok.ids[EOT], context=CONTEXT)


FAST_STEPS = 8  # each BLIP-2 training loop in fast mode (LABKIT_FAST=1)
PARTS = ("stage1", "lm_opt", "lm_t5", "stage2_opt", "stage2_t5")


def checkpoint_dir(part: str, assets: str | Path | None = None) -> Path:
    """The folder of a BLIP-2 part (one of :data:`PARTS`): under ``assets`` if given, else the shipped one."""
    if part not in PARTS:
        raise ValueError(f"unknown BLIP-2 part {part!r}; accepted: {', '.join(PARTS)}")
    return Path(assets) / part if assets else asset_dir(f"blip2/{part}")


def _save(out: str | Path, state: dict, config: dict, info: dict, meta: dict | None, command: str) -> None:
    save_checkpoint(out, state, config, {"command": command, **(meta or {}), "training": info}, dtype=torch.float16)


def _load(path: str | Path) -> tuple[dict, dict]:
    state, config, _ = load_checkpoint(path, what="labkit BLIP-2 checkpoint",
                                       how_to_make="train one with `labkit train qformer`")
    return state, config


def _record(record: dict, wall: float) -> dict:
    hist = record["history"]
    return {"steps": record["steps"], "wall_seconds": round(wall, 1), "train_seconds": round(hist[-1]["train_seconds"], 1),
            "images_per_s": round(record["images_per_s"], 1),
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
    cfg = TrainConfig(steps=steps, lr=lr, seed=seed, weight_decay=0.01, time_budget_s=time_budget_s,
                      desc=f"text LM ({kind})", eval_every=max(1, shorten(steps, FAST_STEPS) // 10), fast_steps=FAST_STEPS)
    record = fit(lm, lambda m, text: lm_loss(m, None, text, prefix_loss=prefix_loss), TextLMBatches(kind, batch_size, seed=seed),
                 cfg, evaluate=lambda m: evaluate_text_lm(m, n=shorten(100, 10), split="val"), progress=progress)
    info = {**_record(record, time.perf_counter() - started), **evaluate_text_lm(lm, n=shorten(300, 50), split="val"),
            "qa_curve": [{k: e[k] for k in ("step", "lm_vqa_from_caption_color_shape")} for e in record["evals"]]}
    if out:
        _save(out, lm.state_dict(), {"kind": kind, "lm_config": lm.config.to_dict()}, info, meta,
              invocation("labkit.blip2.train.train_text_lm", kind=kind, steps=steps, batch_size=batch_size, lr=lr, seed=seed))
    return lm, info


def load_text_lm(path: str | Path) -> nn.Module:
    state, config = _load(path)
    lm = new_text_lm(config["kind"])
    lm.load_state_dict(state)
    return lm.eval()


def train_stage1(encoder: FrozenPatchEncoder, clip: ClipModel, steps: int = 2000, batch_size: int = 64, lr: float = 1e-3,
                 seed: int = 0, time_budget_s: float | None = None, out: str | Path | None = None,
                 progress: bool = True, meta: dict | None = None, ln_vision: bool = False) -> tuple[Blip2Stage1, dict]:
    """Stage 1 (§3.2): ITC + ITM + ITG on fresh scenes; saves only the Q-Former and heads (the encoder is frozen).
    ``ln_vision``: LAVIS's trainable LayerNorm on the frozen features (stage 2 inherits it with the Q-Former)."""
    torch.manual_seed(seed)
    model, started = new_stage1(ln_vision), time.perf_counter()

    def loss_fn(m, batch):
        out = m(*batch)
        return out.loss, {"itc": out.itc.item(), "itm": out.itm.item(), "itg": out.itg.item()}

    cfg = TrainConfig(steps=steps, lr=lr, seed=seed, weight_decay=0.05, time_budget_s=time_budget_s, desc="stage 1",
                      fast_steps=FAST_STEPS)
    record = fit(model, loss_fn, Stage1Batches(encoder, clip, batch_size, seed), cfg, device=encoder.mean.device,
                 progress=progress)
    info = _record(record, time.perf_counter() - started)
    info["curve_terms"] = [{k: round(h[k], 4) for k in ("step", "itc", "itm", "itg")}
                           for h in record["history"][:: max(1, len(record["history"]) // 200)]]
    info["itc_i2t_r1"] = itc_retrieval_r1(model, encoder, n=shorten(1000, 100), split="val")
    if out:
        _save(out, model.state_dict(), {"qformer": model.config.to_dict(), "dec_token_id": model.dec_token_id,
                                        "embed_dim": model.vision_proj.out_features}, info, {"clip": clip.name, **(meta or {})},
              invocation("labkit.blip2.train.train_stage1", steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                         ln_vision=ln_vision))
    return model, info


def load_stage1(path: str | Path | None = None) -> Blip2Stage1:
    """Stage 1 from ``path`` (default: the shipped one)."""
    path = path or checkpoint_dir("stage1")
    state, config = _load(path)
    model = Blip2Stage1(QFormerConfig(**config["qformer"]), config["dec_token_id"], config["embed_dim"])
    model.load_state_dict(state)
    return model.eval()


def train_stage2(encoder: FrozenPatchEncoder, lm: nn.Module, stage1: Blip2Stage1 | None = None, steps: int = 3000,
                 batch_size: int = 64, lr: float = 1e-3, seed: int = 0, time_budget_s: float | None = None,
                 out: str | Path | None = None, progress: bool = True, eval_n: int = 200,
                 meta: dict | None = None, text_conditioned: bool = False,
                 shape_share: float = 0.0) -> tuple[Blip2Stage2, dict]:
    """Stage 2 (§3.3): Q-Former (from stage 1 when given) + projection into the frozen LM, captioning and VQA.

    ``text_conditioned``: the Q-Former also reads the prompt text (the question), as BLIP-2 does for VQA (§4.3).
    ``shape_share``: the share of VQA samples that are colour-keyed shape questions (:class:`Stage2Batches`).
    """
    torch.manual_seed(seed)
    qformer = copy.deepcopy(stage1.qformer) if stage1 is not None else None
    model = Blip2Stage2(stage1_config(), lm, qformer=qformer, text_conditioned=text_conditioned)
    started = time.perf_counter()
    cfg = TrainConfig(steps=steps, lr=lr, seed=seed, weight_decay=0.05, time_budget_s=time_budget_s,
                      desc=f"stage 2 ({model.lm_kind})", fast_steps=FAST_STEPS)
    record = fit(model, lambda m, batch: m(*batch), Stage2Batches(encoder, batch_size, seed=seed, shape_share=shape_share), cfg,
                 device=encoder.mean.device, progress=progress)
    info = _record(record, time.perf_counter() - started)
    info.update(evaluate_stage2(model, encoder, n=shorten(eval_n, 30), details=False, split="val"))
    if out:
        _save(out, model.trainable_state(), {"qformer": model.config.to_dict(), "lm_kind": model.lm_kind,
                                             "text_conditioned": text_conditioned}, info,
              {"from_stage1": stage1 is not None, "shape_share": shape_share, **(meta or {})},
              invocation("labkit.blip2.train.train_stage2", steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                         text_conditioned=text_conditioned, shape_share=shape_share))
    return model, info


def load_stage2(path: str | Path, lm: nn.Module) -> Blip2Stage2:
    state, config = _load(path)
    model = Blip2Stage2(QFormerConfig(**config["qformer"]), lm, text_conditioned=config.get("text_conditioned", False))
    missing = set(model.trainable_state()) - set(state)
    if missing:
        raise ValueError(f"stage-2 checkpoint {path} lacks {sorted(missing)[:5]}")
    model.load_state_dict(state, strict=False)
    return model.eval()


def checkpoint_record(path: str | Path) -> dict:
    """The training record stored in a checkpoint's ``metadata.json`` (loss curve, wall time, metrics)."""
    return read_metadata(path).get("training", {})


def load_or_train(encoder: FrozenPatchEncoder, clip: ClipModel, lm_kind: str = "opt", assets: str | Path | None = None,
                  steps: int = 200, progress: bool = True) -> dict:
    """Stage 1, the text-only LM and stage 2 from ``assets`` when present, else trained briefly (``steps`` each).

    Returns ``{"stage1", "lm", "stage2", "records"}``; ``records`` holds each part's training record.
    """
    out: dict = {"records": {}}
    parts = (("stage1", lambda: train_stage1(encoder, clip, steps, batch_size=32, progress=progress), load_stage1),
             (f"lm_{lm_kind}", lambda: train_text_lm(lm_kind, steps, progress=progress), load_text_lm))
    for name, train, load in parts:
        path = checkpoint_dir(name, assets)
        if is_checkpoint(path):
            out[name], out["records"][name] = load(path), checkpoint_record(path)
        else:
            out[name], out["records"][name] = train()
    out["stage1"].to(encoder.mean.device)
    out["lm"] = out.pop(f"lm_{lm_kind}")
    path = checkpoint_dir(f"stage2_{lm_kind}", assets)
    if is_checkpoint(path):
        out["stage2"], out["records"]["stage2"] = load_stage2(path, out["lm"]), checkpoint_record(path)
    else:
        out["stage2"], out["records"]["stage2"] = train_stage2(encoder, out["lm"], out["stage1"], steps, progress=progress,
                                                                eval_n=20)
    out["stage2"].to(encoder.mean.device)
    return out
