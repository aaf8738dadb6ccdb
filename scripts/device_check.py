"""The lab's GPU figures in one run: ``python scripts/device_check.py --out DIR`` on a CUDA machine.

It measures every figure the lab reports for a GPU and writes them to one JSON, ``DIR/device_check.json``,
printing a summary as it goes (``--only masking,tip`` picks checks; ``--repeats`` sets the timed repeats):

* ``masking``: ``labkit bench masking`` (bf16 autocast on CUDA) at the CPU table's batches (toy 256,
  ViT-B-32 32) and ViT-B-32 at batch 256, where a GPU is busy enough for fewer tokens to matter;
* ``blip2``: Q-Former stage-1 and stage-2 (T5) training throughput, and how long the shipped runs would take;
* ``efficient``: teacher / student / pruned ``match_scores`` time (bf16) on 128 and 1,024 pairs;
* ``tip``: Tip-Adapter cache build (every class x 16 shots x 10 views) and per-query latency (one query, and 64
  at once), for the toy CLIP and a randomly initialised ViT-B-32 (no weights needed);
* ``clip``: toy CLIP pretraining throughput and how long the shipped run would take.

The shipped runs' batch sizes and flags are read from each checkpoint's ``metadata.json``. Expect a few
minutes on one modern GPU (an estimate until it has run on one). To turn the run into a table, copy
``DIR/device_check.json`` to ``results/device_check.json``, put an empty block
``<!-- results:device_check -->`` / ``<!-- /results:device_check -->`` where the table belongs in a page under
``docs/``, and run ``python scripts/update_readme.py``: it writes the masking bench as its usual table and every
other measurement as a row.

On a GPU machine without internet, bring open_clip as wheels (pip on a machine that has internet):

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux2014_x86_64 -d .whl open_clip_torch==3.3.0 ftfy wcwidth

and install them there before the run:

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \\
    PYTHONPATH=/tmp/site:. HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 python3 scripts/device_check.py --out results/gpu

It runs on a CPU as well: ``LABKIT_FAST=1 python scripts/device_check.py --out DIR`` is its smoke test
(``tests/test_scripts.py``; several minutes on a 2-core CPU, and its figures are smoke-test sizes, not
measurements).
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import statistics
import time
from pathlib import Path

import open_clip
import torch

from labkit.blip2.data import FrozenPatchEncoder
from labkit.blip2.train import load_stage1, load_text_lm, train_stage1, train_stage2
from labkit.cli import build_parser
from labkit.clip.eval import zero_shot_classifier
from labkit.clip.model import ClipModel, load_clip
from labkit.clip.pretrain import train_toy_clip
from labkit.core.assets import asset_dir
from labkit.core.checkpoint import OPEN_CLIP, read_metadata
from labkit.core.device import autocast, get_device, synchronize
from labkit.core.train import fast_mode, shorten
from labkit.efficientvlm.eval import eval_scenes, inference_speedup
from labkit.efficientvlm.model import load_efficient
from labkit.masking.bench import bench_masking
from labkit.tipadapter import cache as tip
from labkit.tipadapter import eval as tip_eval


def shipped_command(name: str) -> argparse.Namespace:
    """The ``labkit`` arguments that made a shipped checkpoint (``stage1``, ``stage2_t5`` or ``toy_clip``): its
    config records the command line, so the timed runs use the shipped batch size and flags."""
    if name == "toy_clip":
        command = read_metadata(asset_dir("toy_clip"), OPEN_CLIP)["command"]
    else:
        command = read_metadata(asset_dir(f"blip2/{name}"))["command"]
    return build_parser().parse_args(shlex.split(command)[1:])


def _median_ms(fn, device: torch.device, repeats: int) -> float:
    warmup, times = shorten(3, 1), []
    for i in range(warmup + repeats):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return round(1000 * statistics.median(times), 2)


def _throughput(images_per_s: float, shipped: argparse.Namespace) -> dict:
    """Steady training throughput (``fit``'s median after warm-up) and the shipped run's length at that speed."""
    batch = shipped.batch_size
    return {"batch": batch, "images_per_s": round(images_per_s, 1), "steps_per_s": round(images_per_s / batch, 2),
            "shipped_steps": shipped.steps, "shipped_run_s": round(shipped.steps * batch / images_per_s, 1)}


def check_masking() -> dict:
    readme = bench_masking()
    large = bench_masking(models=("ViT-B-32",), vit_batch=256)
    return {"readme_batches": readme, "vit_b32_batch_256": large}


def check_blip2(steps: int, device: torch.device) -> dict:
    clip = load_clip("toy", device)
    encoder = FrozenPatchEncoder(clip).to(device)
    one, two = shipped_command("stage1"), shipped_command("stage2_t5")
    _, info1 = train_stage1(encoder, clip, steps=steps, batch_size=one.batch_size, lr=one.lr, progress=False)
    _, info2 = train_stage2(encoder, load_text_lm(asset_dir("blip2/lm_t5")), load_stage1(), steps=steps,
                            batch_size=two.batch_size, lr=two.lr, progress=False, eval_n=50,
                            text_conditioned=two.text_conditioned,
                            shape_share=two.shape_share)
    return {"stage1": _throughput(info1["images_per_s"], one), "stage2_t5": _throughput(info2["images_per_s"], two)}


def check_efficient(device: torch.device, repeats: int) -> dict:
    clip = load_clip("toy", device)
    models = {name: load_efficient(name, device) for name in ("teacher", "student", "pruned")}
    batches = tuple(sorted({shorten(128, 16), shorten(1024, 16)}))
    images, captions, _ = eval_scenes(clip, max(batches))
    out = {}
    for batch in batches:
        with autocast(device):
            speed = inference_speedup(models["teacher"], {"student": models["student"], "pruned": models["pruned"]},
                                      images[:batch], captions[:batch], repeats=repeats)
        out[f"pairs_{batch}"] = {"teacher_ms": round(speed["baseline_ms"], 2),
                                 **{k: {"ms": round(v["ms"], 2), "speedup": round(v["speedup"], 3)}
                                    for k, v in speed.items() if k != "baseline_ms"}}
    return out


def _random_vit_b32(device: torch.device) -> ClipModel:
    logging.getLogger().setLevel(logging.ERROR)  # open_clip warns that there are no pretrained weights
    model = open_clip.create_model("ViT-B-32")
    return ClipModel("ViT-B-32 (random init)", model, open_clip.get_tokenizer("ViT-B-32"), 224,
                     open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD, device)


def _tip_latency(clip: ClipModel, support: tuple, queries: torch.Tensor, device: torch.device, repeats: int) -> dict:
    images, labels, classnames, templates = support
    classifier = zero_shot_classifier(clip, classnames, templates)
    cache = tip.build_cache(clip, images, labels, classnames)

    def classify(q):
        return tip.tip_logits(clip.encode_image(q), classifier, cache.keys, cache.values).argmax(-1).cpu()

    return {"support_images": len(labels), "views": 10,
            "cache_build_ms": _median_ms(lambda: tip.build_cache(clip, images, labels, classnames), device,
                                         max(shorten(3, 1), repeats // 5)),
            "query_ms": _median_ms(lambda: classify(queries[:1]), device, repeats),
            f"batch_{len(queries)}_queries_ms": _median_ms(lambda: classify(queries), device, repeats)}


def check_tip(device: torch.device, repeats: int) -> dict:
    images, labels, classnames, templates = tip_eval.task_data("shape", "support", 1000)
    shots = tip.select_shots(labels, shorten(16, 1), len(classnames))
    support = (images[shots], labels[shots], classnames, templates)
    queries = tip_eval.task_data("shape", "test", shorten(64, 8))[0]
    return {clip.name: _tip_latency(clip, support, queries, device, repeats)
            for clip in (load_clip("toy", device), _random_vit_b32(device))}


def check_clip(steps: int, device: torch.device) -> dict:
    shipped = shipped_command("toy_clip")
    _, record = train_toy_clip(steps=steps, batch_size=shipped.batch_size, lr=shipped.lr, eval_n=0, progress=False)
    return _throughput(record["images_per_s"], shipped)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for device_check.json")
    parser.add_argument("--steps", type=int, default=300, help="training steps timed per model")
    parser.add_argument("--repeats", type=int, default=25, help="timed repeats of each inference measurement")
    parser.add_argument("--only", default="masking,efficient,tip,blip2,clip", help="comma-separated checks to run")
    args = parser.parse_args()
    device = get_device()
    checks = {"masking": check_masking, "efficient": lambda: check_efficient(device, args.repeats),
              "tip": lambda: check_tip(device, args.repeats), "blip2": lambda: check_blip2(args.steps, device),
              "clip": lambda: check_clip(args.steps, device)}
    only = args.only.split(",")
    if unknown := sorted(set(only) - set(checks)):
        parser.error(f"unknown check(s) {', '.join(unknown)}; accepted: {', '.join(checks)}")
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
              "torch": torch.__version__, "fast_mode": fast_mode()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in only:
        started = time.perf_counter()
        try:
            result[name] = checks[name]()
        except Exception as e:  # one failed check must not cost the others' figures
            result[name] = {"error": f"{type(e).__name__}: {e}"}
        result[name + "_wall_s"] = round(time.perf_counter() - started, 1)
        print(name, json.dumps(result[name])[:2000], flush=True)
        (out / "device_check.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
