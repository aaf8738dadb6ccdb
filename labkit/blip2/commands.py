"""``labkit train qformer`` and ``labkit eval qformer``: BLIP-2 on ToyWorld."""

from __future__ import annotations

from labkit.blip2.data import load_encoder
from labkit.blip2.eval import evaluate_stage2, itc_retrieval_r1, param_counts
from labkit.blip2.hf import hf_equivalence_max_abs_diff
from labkit.blip2.lm import check_lm_kind
from labkit.blip2.train import (
    checkpoint_dir,
    load_stage1,
    load_stage2,
    load_text_lm,
    train_stage1,
    train_stage2,
    train_text_lm,
)
from labkit.clip.model import load_clip
from labkit.core.command import Command
from labkit.core.train import shorten

STAGES = ("lm", "1", "2")


def train_qformer(stage: str = "1", lm: str = "opt", steps: int = 3000, batch_size: int = 64, lr: float = 1e-3,
                  seed: int = 0, time_budget_s: float | None = None, clip: str = "toy", assets: str | None = None,
                  no_stage1: bool = False, eval_n: int = 200, text_conditioned: bool = False, shape_share: float = 0.0,
                  ln_vision: bool = False, progress: bool = True) -> dict:
    """Train one BLIP-2 part into ``assets`` (default: the shipped folder): ``stage="lm"`` the frozen LM on text
    alone, ``"1"`` the Q-Former with ITC + ITM + ITG, ``"2"`` the soft prompts into the LM of kind ``lm``."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; accepted: {', '.join(STAGES)}")
    if stage != "1":
        check_lm_kind(lm)  # before anything slow
        if ln_vision:
            raise ValueError("--ln-vision belongs to stage 1 (stage 2 inherits the stage-1 Q-Former with its LayerNorm)")
    common = dict(steps=steps, batch_size=batch_size, lr=lr, seed=seed, time_budget_s=time_budget_s, progress=progress)
    if stage == "lm":
        out = checkpoint_dir(f"lm_{lm}", assets)
        _, info = train_text_lm(lm, out=out, **common)
        return {"out": str(out), **{k: v for k, v in info.items() if k != "curve"}}
    clip_model = load_clip(clip)
    encoder = load_encoder(clip_model)
    if stage == "1":
        out = checkpoint_dir("stage1", assets)
        _, info = train_stage1(encoder, clip_model, out=out, ln_vision=ln_vision, **common)
        return {"out": str(out), **{k: v for k, v in info.items() if not k.startswith("curve")}}
    out = checkpoint_dir(f"stage2_{lm}", assets)
    stage1 = None if no_stage1 else load_stage1(checkpoint_dir("stage1", assets))
    _, info = train_stage2(encoder, load_text_lm(checkpoint_dir(f"lm_{lm}", assets)), stage1, out=out, eval_n=eval_n,
                           meta={"clip": clip}, text_conditioned=text_conditioned, shape_share=shape_share, **common)
    return {"out": str(out), **{k: v for k, v in info.items() if k != "curve"}}


def eval_qformer(lm: str = "t5", n: int = 300, n_itc: int = 1000, clip: str = "toy", assets: str | None = None) -> dict:
    """The shipped (or ``assets``') stage 2 on ``n`` held-out scenes (captions, VQA by question type), stage-1
    ITC image->text R@1 on ``n_itc`` scenes, the equivalence with ``transformers`` and the parameter counts."""
    check_lm_kind(lm)
    n, n_itc = shorten(n, 20), shorten(n_itc, 50)
    encoder = load_encoder(clip)
    model = load_stage2(checkpoint_dir(f"stage2_{lm}", assets), load_text_lm(checkpoint_dir(f"lm_{lm}", assets)))
    metrics = evaluate_stage2(model.to(encoder.mean.device), encoder, n=n, details=False)
    stage1 = load_stage1(checkpoint_dir("stage1", assets)).to(encoder.mean.device)
    return {"lm": lm, **param_counts(model, encoder), "caption_attribute_accuracy": metrics["caption_attribute_accuracy"],
            "vqa_accuracy": metrics["vqa_accuracy"], "vqa_accuracy_all": metrics["vqa_accuracy_all"],
            "vqa_by_type": metrics["vqa_by_type"], "itc_i2t_r1": itc_retrieval_r1(stage1, encoder, n=n_itc),
            "hf_equivalence_max_abs_diff": hf_equivalence_max_abs_diff(), "n_scenes": n, "n_itc": n_itc}


ASSETS = {"help": "checkpoint folder (default: the shipped labkit/assets/blip2)"}
COMMANDS = [
    Command("train", "qformer", train_qformer, "BLIP-2 on ToyWorld: --stage lm (text-only LM), 1, or 2 --lm {opt,t5}", {
        "stage": {"choices": STAGES, "help": "lm: pretrain the frozen LM on text; 1: ITC+ITM+ITG; 2: soft prompts into the LM"},
        "lm": {"help": "language model for --stage lm/2: opt (decoder-only) or t5 (encoder-decoder)"},
        "steps": {}, "batch_size": {}, "lr": {}, "seed": {},
        "time_budget_s": {"type": float, "help": "stop once this much training time has passed"},
        "clip": {"help": "CLIP whose vision tower gives the frozen features"}, "assets": ASSETS,
        "no_stage1": {"help": "stage 2 from a fresh Q-Former instead of the stage-1 one"},
        "eval_n": {"help": "held-out scenes evaluated after stage 2"},
        "text_conditioned": {"help": "stage 2: the Q-Former also reads the question (BLIP-2's VQA set-up, §4.3)"},
        "shape_share": {"help": "stage 2: share of VQA samples that are 'what shape is the <colour> object?' (0: uniform)"},
        "ln_vision": {"help": "stage 1: LAVIS's trainable LayerNorm on the frozen image features (off in the shipped recipe)"}}),
    Command("eval", "qformer", eval_qformer, "BLIP-2 stage 2 captioning/VQA, stage-1 ITC R@1, HF equivalence, param counts", {
        "lm": {"help": "whose stage 2 to evaluate: t5 (the shipped best) or opt"},
        "n": {"help": "held-out scenes for captioning and VQA"},
        "n_itc": {"help": "held-out 2-3-object scenes for ITC image->text R@1"}, "clip": {}, "assets": ASSETS}),
]
