"""``labkit train|eval|bench|app``: every command of the lab.

Each ``eval`` and ``bench`` command takes ``--json`` and then prints one JSON object on its last line.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time

from .device import fast_mode


def _emit(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>28}: {value}")


def _command_line() -> str:
    """The command as typed, recorded in each checkpoint's metadata."""
    return "labkit " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def cmd_train_clip(args) -> dict:
    from .clip import evaluate_clip, train_toy_clip
    from .models import save_local_dir

    steps = min(args.steps, 20) if fast_mode() else args.steps
    started = time.perf_counter()
    clip, record = train_toy_clip(steps=steps, batch_size=args.batch_size, out_dir=args.work_dir, seed=args.seed,
                                  lr=args.lr, eval_every=args.eval_every, eval_n=args.eval_n,
                                  masking=args.masking, mask_ratio=args.mask_ratio)
    wall = time.perf_counter() - started
    if record["rank"] != 0:
        return {}
    metrics = evaluate_clip(clip)
    config = dict(clip.config)
    config["labkit"] = {**config["labkit"], "training": {
        "command": _command_line(),
        "steps": record["steps"], "batch_size": args.batch_size, "seed": args.seed, "wall_seconds": round(wall, 1),
        "world_size": record["world_size"], "device": str(clip.device), "metrics": metrics,
        "curve": record["evals"],
    }}
    save_local_dir(clip.model, config, args.out)
    return {"out": args.out, "steps": record["steps"], "wall_seconds": round(wall, 1), **metrics}


def cmd_eval_clip(args) -> dict:
    from .clip import evaluate_clip
    from .models import load_clip

    return {"model": args.model, **evaluate_clip(load_clip(args.model), n=args.n)}


def cmd_bench_toyworld(args) -> dict:
    from .bench import bench_toyworld

    return bench_toyworld(n=args.n)


def cmd_eval_tip(args) -> dict:
    from .models import load_clip
    from .tip_eval import EVAL_TASKS, evaluate_tip

    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip()) if args.tasks else EVAL_TASKS
    shots = tuple(int(s) for s in args.shots.split(","))
    n_val, n_test, views, epochs, repeats = args.n_val, args.n_test, args.views, args.epochs, args.repeats
    if fast_mode():  # same tasks and shot counts, fewer images, views, epochs and draws
        n_val, n_test, views, epochs, repeats = min(n_val, 60), min(n_test, 100), min(views, 2), min(epochs, 2), 1
    return evaluate_tip(load_clip(args.model), tasks, shots, n_val, n_test, views, epochs, repeats)


def cmd_bench_app(args) -> dict:
    from app.bench import bench_app

    n = min(args.n_requests, 40) if fast_mode() else args.n_requests
    return bench_app(n_requests=n, n_clients=args.clients, model=args.model)


def _save_json(result: dict, path: str | None) -> None:
    if path:
        from pathlib import Path

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=1))


def cmd_bench_masking(args) -> dict:
    from .masking_bench import bench_masking

    result = bench_masking(models=tuple(args.models.split(",")), toy_batch=args.toy_batch, vit_batch=args.vit_batch,
                           warmup=args.warmup, repeats=args.repeats, threads=args.threads)
    _save_json(result, args.save)
    return result


def cmd_eval_masking(args) -> dict:
    from .masking_bench import eval_masking

    result = eval_masking(budget_s=args.budget_s, ratio=args.ratio, variants=tuple(args.variants.split(",")),
                          batch_size=args.batch_size, seed=args.seed, threads=args.threads)
    _save_json(result, args.save)
    return result


def cmd_make_dataset(args) -> dict:
    from .openclip_train import make_dataset

    return make_dataset(args.out, n=args.n, split=args.split, seed=args.seed)


def _blip2_paths(assets: str | None) -> dict:
    from pathlib import Path

    from .blip2_data import ASSETS

    root = Path(assets) if assets else ASSETS
    return {"root": root, "stage1": root / "stage1", "lm": lambda kind: root / f"lm_{kind}",
            "stage2": lambda kind: root / f"stage2_{kind}"}


def cmd_train_qformer(args) -> dict:
    """BLIP-2 on ToyWorld: ``--stage lm`` (text-only LM), ``--stage 1`` (ITC+ITM+ITG), ``--stage 2 --lm {opt,t5}``."""
    from .blip2_data import load_encoder
    from .blip2_lm import check_lm_kind
    from .blip2_train import load_stage1, load_text_lm, train_stage1, train_stage2, train_text_lm
    from .models import load_clip

    paths, budget = _blip2_paths(args.assets), args.time_budget_s
    meta = {"command": _command_line(), "clip": args.clip}
    if args.stage not in ("lm", "1", "2"):
        raise ValueError(f"unknown stage {args.stage!r}; accepted: lm, 1, 2")
    if args.stage != "1":
        check_lm_kind(args.lm)  # before anything slow
    if args.stage == "lm":
        _, info = train_text_lm(args.lm, args.steps, args.batch_size, args.lr, args.seed, budget,
                                paths["lm"](args.lm), meta=meta)
        return {"out": str(paths["lm"](args.lm)), **{k: v for k, v in info.items() if k != "curve"}}
    clip = load_clip(args.clip)
    encoder = load_encoder(clip)
    if args.stage == "1":
        _, info = train_stage1(encoder, clip, args.steps, args.batch_size, args.lr, args.seed, budget, paths["stage1"],
                               meta=meta)
        return {"out": str(paths["stage1"]), **{k: v for k, v in info.items() if not k.startswith("curve")}}
    lm = load_text_lm(paths["lm"](args.lm))
    stage1 = load_stage1(paths["stage1"]) if not args.no_stage1 else None
    _, info = train_stage2(encoder, lm, stage1, args.steps, args.batch_size, args.lr, args.seed, budget,
                           paths["stage2"](args.lm), eval_n=args.eval_n, meta=meta, text_conditioned=args.text_conditioned,
                           shape_share=args.shape_share)
    return {"out": str(paths["stage2"](args.lm)), **{k: v for k, v in info.items() if k != "curve"}}


def cmd_eval_qformer(args) -> dict:
    from .blip2_data import load_encoder
    from .blip2_eval import evaluate_stage2, hf_equivalence_max_abs_diff, itc_retrieval_r1, param_counts
    from .blip2_lm import check_lm_kind
    from .blip2_train import load_stage1, load_stage2, load_text_lm

    paths = _blip2_paths(args.assets)
    check_lm_kind(args.lm)
    n, n_itc = (min(args.n, 20), min(args.n_itc, 50)) if fast_mode() else (args.n, args.n_itc)
    encoder = load_encoder(args.clip)
    model = load_stage2(paths["stage2"](args.lm), load_text_lm(paths["lm"](args.lm))).to(encoder.mean.device)
    metrics = evaluate_stage2(model, encoder, n=n, details=False)
    return {"lm": args.lm, **param_counts(model, encoder), "caption_attribute_accuracy": metrics["caption_attribute_accuracy"],
            "vqa_accuracy": metrics["vqa_accuracy"], "vqa_accuracy_all": metrics["vqa_accuracy_all"],
            "vqa_by_type": metrics["vqa_by_type"],
            "itc_i2t_r1": itc_retrieval_r1(load_stage1(paths["stage1"]).to(encoder.mean.device), encoder, n=n_itc),
            "hf_equivalence_max_abs_diff": hf_equivalence_max_abs_diff(), "n_scenes": n, "n_itc": n_itc}


def cmd_train_vlm(args) -> dict:
    """EfficientVLM on ToyWorld: ``teacher`` (from the toy CLIP), ``student`` (distilled), ``pruned`` (L0 gates)."""
    from .efficient_eval import efficient_assets_dir, eval_scenes, evaluate_vlm
    from .models import load_clip
    from .vlm import load_vlm, save_vlm
    from .vlm_train import prune_student, train_student, train_teacher

    assets = efficient_assets_dir()
    steps, n = (min(args.steps, 3), 50) if fast_mode() else (args.steps, args.eval_n)
    clip = load_clip(args.clip)
    check = eval_scenes(clip, n, split="val")
    evaluate = lambda model: evaluate_vlm(model, check, rerank_k=0)  # noqa: E731
    started = time.perf_counter()
    common = dict(batch_size=args.batch_size, seed=args.seed, progress=not args.json)
    if args.what == "teacher":
        model, record = train_teacher(clip, steps, lr=args.lr, evaluate=evaluate, **common)
    else:
        teacher = load_vlm(args.teacher or assets / "teacher", clip.device)
        if args.what == "student":
            init = load_vlm(args.init, clip.device) if args.init else None
            model, record = train_student(teacher, clip, steps, lr=args.lr, evaluate=evaluate, init=init, **common)
        else:
            student = load_vlm(args.student or assets / "student", clip.device)
            model, record = prune_student(student, teacher, clip, args.target, steps, lr=args.lr,
                                          recover_steps=min(args.recover_steps, 3) if fast_mode() else args.recover_steps,
                                          **common)
            record["evals"] = [evaluate(model)]
    wall = time.perf_counter() - started
    out = args.out or assets / args.what
    meta = {"command": _command_line(), "steps": record["steps"], "wall_seconds": round(wall, 1),
            "device": str(clip.device), "val": record["evals"][-1],
            "curve": [{k: v for k, v in h.items() if isinstance(v, float | int)}
                      for h in record["history"][::math.ceil(len(record["history"]) / 1000)]]}  # <= 1,000 points
    if getattr(args, "init", None):  # provenance of a student distilled further
        meta["init_from"] = {k: init.meta.get(k) for k in ("command", "steps", "wall_seconds", "init_from")}
    if args.what == "pruned":
        meta.update(target=args.target, sparsity_by_modality=record["sparsity_by_modality"],
                    recover_steps=record.get("recovery", {}).get("steps", 0))
    save_vlm(model, out, extra=meta)
    return {"out": str(out), "steps": record["steps"], "wall_seconds": round(wall, 1), **record["evals"][-1]}


def cmd_eval_efficient(args) -> dict:
    from .efficient_eval import efficient_assets_dir, eval_efficient
    from .models import load_clip
    from .vlm import load_vlm

    assets, clip = efficient_assets_dir(), load_clip(args.clip)
    models = [load_vlm(getattr(args, w) or assets / w, clip.device) for w in ("teacher", "student", "pruned")]
    targets = tuple(float(t) for t in args.sweep.split(",") if t.strip())
    n, steps, recover, repeats = ((60, 2, 2, 2) if fast_mode() else
                                  (args.n, args.sweep_steps, args.sweep_recover_steps, args.repeats))
    result = eval_efficient(clip, *models, sweep_targets=targets, sweep_steps=steps, sweep_recover_steps=recover,
                            n=n, bench_batch=args.bench_batch, repeats=repeats, progress=not args.json)
    _save_json(result, args.save)
    return result


def cmd_app(args) -> dict:
    from app.main import launch

    launch(host=args.host, port=args.port, model=args.model)
    return {}


def build_parser() -> argparse.ArgumentParser:
    from .models import toy_checkpoint_dir

    parser = argparse.ArgumentParser(prog="labkit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model").add_subparsers(dest="what", required=True)
    p = train.add_parser("clip", help="pretrain the toy CLIP on ToyWorld from scratch")
    p.add_argument("--steps", type=int, default=2800)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=400)
    p.add_argument("--eval-n", type=int, default=500)
    p.add_argument("--out", default=str(toy_checkpoint_dir()), help="local-dir to write (default: the shipped one)")
    p.add_argument("--work-dir", default="runs/toy_clip", help="training state for resume")
    p.add_argument("--masking", choices=("none", "random", "cluster"), default="none")
    p.add_argument("--mask-ratio", type=float, default=0.0)
    p.set_defaults(func=cmd_train_clip)

    evaluate = sub.add_parser("eval", help="evaluate a model").add_subparsers(dest="what", required=True)
    p = evaluate.add_parser("clip", help="zero-shot accuracy and retrieval R@1 on held-out scenes")
    p.add_argument("--model", default="toy")
    p.add_argument("--n", type=int, default=1000)
    p.set_defaults(func=cmd_eval_clip)
    p = evaluate.add_parser("tip", help="zero-shot vs Tip-Adapter(-F) vs linear probe at 1-16 shots")
    p.add_argument("--model", default="toy")
    p.add_argument("--tasks", default="", help="comma-separated subset of shape,color,novel,shifted,mnist")
    p.add_argument("--shots", default="1,2,4,8,16")
    p.add_argument("--n-val", type=int, default=1000, help="validation images per task (alpha/beta search)")
    p.add_argument("--n-test", type=int, default=1000, help="test images per task")
    p.add_argument("--views", type=int, default=10, help="augmented views averaged per support image")
    p.add_argument("--epochs", type=int, default=20, help="Tip-Adapter-F epochs")
    p.add_argument("--repeats", type=int, default=3, help="support draws averaged per shot count")
    p.set_defaults(func=cmd_eval_tip)

    bench = sub.add_parser("bench", help="measure speed").add_subparsers(dest="what", required=True)
    p = bench.add_parser("toyworld", help="scene rendering throughput")
    p.add_argument("--n", type=int, default=3000)
    p.set_defaults(func=cmd_bench_toyworld)
    p = bench.add_parser("app", help="concurrent classify requests against a locally launched Tip-Adapter app")
    p.add_argument("--model", default="toy")
    p.add_argument("--n-requests", type=int, default=200)
    p.add_argument("--clients", type=int, default=20, help="simulated students, each with its own session/cache")
    p.set_defaults(func=cmd_bench_app)

    p = bench.add_parser("masking", help="vision-tower step speedup of FLIP / cluster masking at ratios 0, 0.5, 0.75")
    p.add_argument("--models", default="toy,ViT-B-32", help="comma-separated: toy and/or open_clip architectures")
    p.add_argument("--toy-batch", type=int, default=256)
    p.add_argument("--vit-batch", type=int, default=32)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default; 1 on a shared CPU)")
    p.add_argument("--save", default=None, help="also write the JSON result to this file")
    p.set_defaults(func=cmd_bench_masking)

    p = evaluate.add_parser("masking", help="toy CLIP trained with none/random/cluster masking, same wall-clock budget")
    p.add_argument("--budget-s", type=float, default=450.0, help="training seconds per variant")
    p.add_argument("--ratio", type=float, default=0.5, help="mask ratio of variants given without one")
    p.add_argument("--variants", default="none,random,cluster,random:0.75,cluster:0.75")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default; 1 on a shared CPU)")
    p.add_argument("--save", default=None, help="also write the JSON result to this file")
    p.set_defaults(func=cmd_eval_masking)

    p = sub.add_parser("make-dataset", help="write ToyWorld scenes as PNG + CSV for open_clip_train")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--split", default="train")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_make_dataset)

    p = sub.add_parser("openclip-train", add_help=False,
                       help="open_clip_train with labkit masking: labkit openclip-train --masking M --mask-ratio R -- ...")
    p.add_argument("openclip_argv", nargs=argparse.REMAINDER)  # dispatched in main() before parsing

    for what, steps, lr, text in (("teacher", 900, 2e-4, "EfficientVLM teacher: X-VLM-style VLM from the toy CLIP towers"),
                                  ("student", 4000, 2e-4, "EfficientVLM student: half the layers, distilled from the teacher"),
                                  ("pruned", 1000, 1e-4, "EfficientVLM: modal-adaptive L0 pruning of the student")):
        p = train.add_parser(what, help=text)
        p.add_argument("--steps", type=int, default=steps)
        p.add_argument("--batch-size", type=int, default=64)
        p.add_argument("--lr", type=float, default=lr)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--clip", default="toy", help="CLIP for preprocessing, tokenizer and (teacher) initial towers")
        p.add_argument("--eval-n", type=int, default=500, help="validation scenes evaluated during training")
        p.add_argument("--out", default=None, help="checkpoint folder (default: the shipped labkit/assets/efficient/...)")
        if what != "teacher":
            p.add_argument("--teacher", default=None, help="teacher checkpoint (default: the shipped one)")
        if what == "student":
            p.add_argument("--init", default=None, help="start from this student checkpoint and distil it further")
        if what == "pruned":
            p.add_argument("--student", default=None, help="student checkpoint (default: the shipped one)")
            p.add_argument("--target", type=float, default=0.3, help="global target sparsity in [0, 1)")
            p.add_argument("--recover-steps", type=int, default=500,
                           help="distil the finalized model from the teacher for this many more steps")
        p.set_defaults(func=cmd_train_vlm)

    p = train.add_parser("qformer", help="BLIP-2 on ToyWorld: --stage lm (text-only LM), 1, or 2 --lm {opt,t5}")
    p.add_argument("--stage", default="1", help="lm: pretrain the frozen LM on text; 1: ITC+ITM+ITG; 2: soft prompts into the LM")
    p.add_argument("--lm", default="opt", help="language model for --stage lm/2: opt (decoder-only) or t5 (encoder-decoder)")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-budget-s", type=float, default=None, help="stop once this much training time has passed")
    p.add_argument("--clip", default="toy", help="CLIP whose vision tower gives the frozen features")
    p.add_argument("--assets", default=None, help="checkpoint folder (default: the shipped labkit/assets/blip2)")
    p.add_argument("--no-stage1", action="store_true", help="stage 2 from a fresh Q-Former instead of the stage-1 one")
    p.add_argument("--eval-n", type=int, default=200, help="held-out scenes evaluated after stage 2")
    p.add_argument("--text-conditioned", action="store_true",
                   help="stage 2: the Q-Former also reads the question (BLIP-2's VQA set-up, §4.3)")
    p.add_argument("--shape-share", type=float, default=0.0,
                   help="stage 2: share of VQA samples that are 'what shape is the <colour> object?' (0: uniform)")
    p.set_defaults(func=cmd_train_qformer)

    p = evaluate.add_parser("qformer", help="BLIP-2 stage 2 captioning/VQA, stage-1 ITC R@1, HF equivalence, param counts")
    p.add_argument("--lm", default="t5", help="whose stage 2 to evaluate: t5 (the shipped best) or opt")
    p.add_argument("--n", type=int, default=300, help="held-out scenes for captioning and VQA")
    p.add_argument("--n-itc", type=int, default=1000, help="held-out 2-3-object scenes for ITC image->text R@1")
    p.add_argument("--clip", default="toy")
    p.add_argument("--assets", default=None)
    p.set_defaults(func=cmd_eval_qformer)

    p = evaluate.add_parser("efficient", help="EfficientVLM: sizes, speedup and retention of student and pruned model")
    for what in ("teacher", "student", "pruned"):
        p.add_argument(f"--{what}", default=None, help=f"{what} checkpoint (default: the shipped one)")
    p.add_argument("--clip", default="toy")
    p.add_argument("--n", type=int, default=1000, help="held-out test scenes")
    p.add_argument("--sweep", default="0.3,0.5,0.7", help="comma-separated target sparsities pruned afresh")
    p.add_argument("--sweep-steps", type=int, default=300, help="pruning steps per sweep point")
    p.add_argument("--sweep-recover-steps", type=int, default=150, help="recovery distillation steps per sweep point")
    p.add_argument("--bench-batch", type=int, default=128, help="image-caption pairs per timed inference")
    p.add_argument("--repeats", type=int, default=15, help="timed repeats (median) after 3 warm-up runs")
    p.add_argument("--save", default=None, help="also write the JSON result to this file")
    p.set_defaults(func=cmd_eval_efficient)

    p = sub.add_parser("app", help="the Tip-Adapter web demo")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--model", default="toy")
    p.set_defaults(func=cmd_app)

    for p in [*train.choices.values(), *evaluate.choices.values(), *bench.choices.values()]:
        p.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["openclip-train"]:  # its own parser; everything after -- goes to open_clip_train
        from .openclip_train import main as openclip_main

        try:
            return openclip_main(argv[1:])
        except ValueError as e:
            print(f"labkit: error: {e}", file=sys.stderr)
            return 2
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except ValueError as e:  # user errors: a clear message, no traceback
        print(f"labkit: error: {e}", file=sys.stderr)
        return 2
    if result:
        _emit(result, getattr(args, "json", False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
