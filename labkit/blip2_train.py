"""BLIP-2 on ToyWorld, training: stage 1 (§3.2, :class:`labkit.blip2.Blip2Stage1`), the lab's "pretrained
LLM" (a tiny LM trained on ToyWorld text alone: captions and ``caption question? answer``) and
stage 2 (§3.3, :class:`labkit.blip2_lm.Blip2Stage2`, captioning and VQA); all reuse
:func:`labkit.train.fit`. Saving, loading, and "load the shipped checkpoint if present, else train".
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
from torch import nn

from .blip2 import Blip2Stage1
from .blip2_data import ASSETS, TEXT_LEN, FrozenPatchEncoder, Stage1Batches, Stage2Batches, TextLMBatches, tokenizer
from .blip2_eval import evaluate_stage2, evaluate_text_lm, itc_retrieval_r1
from .blip2_lm import Blip2Stage2, lm_loss, load_module_state, new_lm, save_module
from .device import fast_mode
from .models import ClipModel
from .qformer import QFormerConfig
from .tokenizer import EOT, PAD, SOT
from .train import TrainConfig, fit

CONTEXT = 64  # LM context: 16 soft prompts + up to 48 text tokens

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
    cfg = TrainConfig(steps=_steps(steps), lr=lr, seed=seed, weight_decay=0.05, time_budget_s=time_budget_s,
                      desc=f"stage 2 ({model.lm_kind})")
    record = fit(model, lambda m, batch: m(*batch), Stage2Batches(encoder, batch_size, seed=seed, shape_share=shape_share), cfg,
                 device=encoder.mean.device, progress=progress)
    info = _record(record, time.perf_counter() - started)
    info.update(evaluate_stage2(model, encoder, n=min(eval_n, 30) if fast_mode() else eval_n, details=False))
    if out:
        save_module(out, model.trainable_state(), {"qformer": model.config.to_dict(), "lm_kind": model.lm_kind,
                                                   "from_stage1": stage1 is not None, "text_conditioned": text_conditioned,
                                                   "shape_share": shape_share, "training": info, **(meta or {})})
    return model, info


def load_stage2(path: str | Path, lm: nn.Module) -> Blip2Stage2:
    state, config = load_module_state(path)
    model = Blip2Stage2(QFormerConfig(**config["qformer"]), lm, text_conditioned=config.get("text_conditioned", False))
    missing = set(model.trainable_state()) - set(state)
    if missing:
        raise ValueError(f"stage-2 checkpoint {path} lacks {sorted(missing)[:5]}")
    model.load_state_dict(state, strict=False)
    return model.eval()


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
