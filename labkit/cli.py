"""``labkit train|eval|bench|app``: every command of the lab.

Each ``eval`` and ``bench`` command takes ``--json`` and then prints one JSON object on its last line.
"""

from __future__ import annotations

import argparse
import json
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
        "command": "labkit " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
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
    from .tipadapter import EVAL_TASKS, evaluate_tip

    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip()) if args.tasks else EVAL_TASKS
    shots = tuple(int(s) for s in args.shots.split(","))
    n_val, n_test, views, epochs = args.n_val, args.n_test, args.views, args.epochs
    if fast_mode():  # same tasks and shot counts, fewer images, views and epochs
        n_val, n_test, views, epochs = min(n_val, 60), min(n_test, 100), min(views, 2), min(epochs, 2)
    return evaluate_tip(load_clip(args.model), tasks, shots, n_val, n_test, views, epochs)


def cmd_bench_app(args) -> dict:
    from app.bench import bench_app

    n = min(args.n_requests, 40) if fast_mode() else args.n_requests
    return bench_app(n_requests=n, n_clients=args.clients, model=args.model)


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
    p.add_argument("--n-val", type=int, default=500, help="validation images per task (alpha/beta search)")
    p.add_argument("--n-test", type=int, default=1000, help="test images per task")
    p.add_argument("--views", type=int, default=10, help="augmented views averaged per support image")
    p.add_argument("--epochs", type=int, default=20, help="Tip-Adapter-F epochs")
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

    p = sub.add_parser("app", help="the Tip-Adapter web demo")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--model", default="toy")
    p.set_defaults(func=cmd_app)

    for p in [*train.choices.values(), *evaluate.choices.values(), *bench.choices.values()]:
        p.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    return parser


def main(argv: list[str] | None = None) -> int:
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
