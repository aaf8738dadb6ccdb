"""The Tip-Adapter classroom demo (Gradio Blocks): few-shot CLIP without training.

A learner picks a built-in task (ToyWorld shapes/colours/novel/shifted, real MNIST digits) or uploads
a few images per class, builds the cache (Tip-Adapter, ECCV 2022: keys = CLIP features of the support
images averaged over 10 augmented views, values = one-hot labels), then classifies a query and sees the
zero-shot, cache and fused probabilities, the most similar support images, and alpha/beta sliders that
update the result live. All method logic lives in :mod:`labkit.tipadapter`; :mod:`app.uploads` decodes
and checks uploads; this module keeps per-session state and draws.

Classroom settings: a queue with a concurrency limit and a maximum size, classify requests batched
(one encoder pass for up to ``MAX_BATCH`` queries from different students), bounded work per request
(caps on classes, images, pixels and a time budget for building a cache), a ``max_file_size`` on
uploads, and no ``allowed_paths``: the server reads only files uploaded to it. Every error a user can
cause is shown as a message; the previous cache is kept.
"""

from __future__ import annotations

import argparse
import logging
import os
import threading
import time
from functools import lru_cache

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # the lab runs offline

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from labkit.clip.eval import zero_shot_classifier  # noqa: E402
from labkit.clip.model import ModelError, cached_openclip_weights, load_clip  # noqa: E402
from labkit.core.assets import asset_dir  # noqa: E402
from labkit.core.checkpoint import OPEN_CLIP, is_checkpoint  # noqa: E402
from labkit.tipadapter import cache as tip  # noqa: E402
from labkit.tipadapter import eval as tip_eval
from labkit.tipadapter import viz as viz_tip  # noqa: E402

from .uploads import MAX_FILE_SIZE, MAX_SHOTS, load_image, support_from_uploads, to_tensor  # noqa: E402

log = logging.getLogger("labkit.app")

MAX_CLASSES = 6
BUILD_BUDGET_S = 60.0
QUEUE_SIZE = 256
CONCURRENCY = 2
MAX_BATCH = 32
TOP_K = 5
UPLOAD_TEMPLATES = ("a {}", "a picture of a {}", "a photo of a {}", "there is a {}")
BUILTIN_TASKS = {"ToyWorld shapes": "shape", "ToyWorld colours": "color", "ToyWorld novel shapes": "novel",
                 "ToyWorld shifted (textured backgrounds)": "shifted", "MNIST digits (real, out of domain)": "mnist"}
SOURCES = ("Built-in task", "My images")

_models: dict[str, object] = {}
_models_lock = threading.Lock()


# ---------------------------------------------------------------- models

def get_model(name: str):
    """Load a model once per process (thread-safe); raises ModelError for names that cannot be used."""
    with _models_lock:
        if name not in _models:
            _models[name] = load_clip(name)
        return _models[name]


def available_models(default: str = "toy") -> list[str]:
    """The default model, the shipped toy CLIP, and every open_clip pretrained tag whose weights are cached."""
    import open_clip

    names = [default]
    if default != "toy" and is_checkpoint(asset_dir("toy_clip"), OPEN_CLIP):
        names.append("toy")
    for arch, tag in open_clip.list_pretrained():
        try:
            cached_openclip_weights(arch, tag)
        except Exception:  # not cached (or no hub entry): not offered
            continue
        names.append(f"openclip:{arch}/{tag}")
    return names


@lru_cache(maxsize=8)
def _task_split(task: str, role: str):
    return tip_eval.task_data(task, role, 1000 if role == "support" else 300)


def support_from_task(task: str, shots: int) -> tuple[torch.Tensor, torch.Tensor, tuple, tuple]:
    """The first ``shots`` images per class of a built-in task's support pool."""
    if not 1 <= int(shots) <= MAX_SHOTS:
        raise ValueError(f"shots must be between 1 and {MAX_SHOTS}, got {shots}")
    images, labels, classnames, templates = _task_split(task, "support")
    idx = tip.select_shots(labels, int(shots), len(classnames))
    return images[idx], labels[idx], classnames, templates


# ---------------------------------------------------------------- the session: build, score

def build_session(model_name: str, source: str, task_label: str, shots: int, names=(), files=()) -> dict:
    """A fresh session state holding the cache; raises ValueError/TimeoutError/ModelError on bad input."""
    clip = get_model(model_name)
    if source == SOURCES[0]:
        if task_label not in BUILTIN_TASKS:
            raise ValueError(f"unknown built-in task {task_label!r}; pick one of {list(BUILTIN_TASKS)}")
        task = BUILTIN_TASKS[task_label]
        images, labels, classnames, templates = support_from_task(task, shots)
    else:
        task, templates = None, UPLOAD_TEMPLATES
        images, labels, classnames = support_from_uploads(names, files, shots, clip.image_size)
    deadline = time.monotonic() + BUILD_BUDGET_S
    cache = tip.build_cache(clip, images, labels, classnames, deadline=deadline)
    classifier = zero_shot_classifier(clip, classnames, templates)
    return {"model": model_name, "task": task, "cache": cache, "classifier": classifier, "support": images,
            "shots": int(shots), "query": None}


def score(session: dict, feature: torch.Tensor, alpha: float, beta: float) -> dict:
    """Zero-shot, cache and fused probabilities of one query feature ``[D]``, and its nearest supports."""
    cache = session["cache"]
    r = tip.explain(feature, session["classifier"], cache.keys, cache.values, alpha, beta)
    top = r["affinity"].topk(min(TOP_K, len(cache.keys)))
    names = cache.classnames
    return {"classnames": names, "zero_shot": r["zero_shot"].cpu(), "cache": r["cache"].cpu(),
            "fused": r["fused"].cpu(), "label": names[r["prediction"]],
            "nearest": [(int(i), names[int(cache.labels[i])], float(a))
                        for a, i in zip(top.values, top.indices, strict=True)]}


def _bars(names, probs) -> pd.DataFrame:
    return pd.DataFrame({"class": list(names), "probability": [round(float(p), 4) for p in probs]})


def _result_outputs(session: dict, result: dict) -> tuple:
    names = result["classnames"]
    label = {n: float(p) for n, p in zip(names, result["fused"], strict=False)}
    gallery = [(session["support"][i].permute(1, 2, 0).numpy(), f"{c} · affinity {a:.2f}")
               for i, c, a in result["nearest"]]
    return (label, _bars(names, result["zero_shot"]), _bars(names, result["cache"]), _bars(names, result["fused"]),
            gallery)


N_RESULT = 5  # label, three bar plots, nearest-support gallery


def _skip_results() -> tuple:
    return tuple(gr.skip() for _ in range(N_RESULT))


def _message(e: Exception) -> str:
    if isinstance(e, (ValueError, TimeoutError)):
        return str(e)
    log.exception("unexpected error in the Tip-Adapter app")
    return "something went wrong on the server (logged); the previous cache is kept"


# ---------------------------------------------------------------- event handlers

def on_build(state, model_name, source, task_label, shots, *slots):
    """Build button: new cache on success; on any error a warning and the previous state untouched."""
    names, files = slots[:MAX_CLASSES], slots[MAX_CLASSES:]
    try:
        session = build_session(model_name, source, task_label, shots, names, files)
    except Exception as e:  # noqa: BLE001 - every failure becomes a message, never a traceback
        msg = _message(e)
        gr.Warning(msg)
        return state, f"**Problem:** {msg}. The previous cache is kept.", gr.skip(), gr.skip()
    cache = session["cache"]
    gallery = [(img.permute(1, 2, 0).numpy(), cache.classnames[int(y)])
               for img, y in zip(session["support"], cache.labels.cpu(), strict=True)]
    fig = viz_tip.cache_figure(cache.keys.cpu(), cache.values.cpu(), cache.classnames)
    status = (f"**Cache built:** {cache.n_classes} classes × {session['shots']} shots = {len(cache.keys)} keys "
              f"(each averaged over 10 augmented views), model `{model_name}`.")
    return session, status, gallery, fig


def classify_batch(states, files, alphas, betas):
    """Batched classify: one encoder pass per model for every query in the batch, then per-session scoring."""
    n = len(states)
    out_states, statuses = list(states), [""] * n
    results = [_skip_results() for _ in range(n)]
    images: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for i, (state, path) in enumerate(zip(states, files, strict=False)):
        try:
            if not state or "cache" not in state:
                raise ValueError("build a cache first (step 1)")
            if not path:
                raise ValueError("upload a query image first")
            clip = get_model(state["model"])
            images.setdefault(state["model"], []).append((i, to_tensor(load_image(path), clip.image_size)))
        except Exception as e:  # noqa: BLE001
            statuses[i] = f"**Problem:** {_message(e)}"
    for model_name, items in images.items():
        try:
            feats = get_model(model_name).encode_image(torch.stack([t for _, t in items]))
        except Exception as e:  # noqa: BLE001
            for i, _ in items:
                statuses[i] = f"**Problem:** {_message(e)}"
            continue
        for (i, img), f in zip(items, feats, strict=False):
            session = dict(states[i], query=f, query_image=img)
            result = score(session, f, float(alphas[i]), float(betas[i]))
            results[i] = _result_outputs(session, result)
            out_states[i] = session
            statuses[i] = f"Prediction: **{result['label']}** (alpha={alphas[i]:g}, beta={betas[i]:g})"
    columns = list(zip(*results, strict=False))
    return (*[list(c) for c in columns], statuses, out_states)


def on_rescore(state, alpha, beta):
    """Slider moved: re-mix the stored query's logits, no re-encoding."""
    if not state or state.get("query") is None:
        return (*_skip_results(), gr.skip())
    result = score(state, state["query"], float(alpha), float(beta))
    return (*_result_outputs(state, result), f"Prediction: **{result['label']}** (alpha={alpha:g}, beta={beta:g})")


def on_pick_query(state, alpha, beta, seed):
    """Classify a random test image of the built-in task the cache was built from."""
    try:
        if not state or "cache" not in state:
            raise ValueError("build a cache first (step 1)")
        if state.get("task") is None:
            raise ValueError("random queries come from built-in tasks; upload a query for your own classes")
        images, labels, classnames, _ = _task_split(state["task"], "test")
        i = int(np.random.default_rng(int(seed)).integers(len(labels)))
        clip = get_model(state["model"])
        f = clip.encode_image(images[i: i + 1])[0]
    except Exception as e:  # noqa: BLE001
        msg = _message(e)
        gr.Warning(msg)
        return (*_skip_results(), f"**Problem:** {msg}", state, gr.skip(), gr.skip())
    session = dict(state, query=f, query_image=images[i])
    result = score(session, f, float(alpha), float(beta))
    status = f"Prediction: **{result['label']}** — true class: **{classnames[int(labels[i])]}**"
    return (*_result_outputs(session, result), status, session, images[i].permute(1, 2, 0).numpy(), int(seed) + 1)


@lru_cache(maxsize=16)
def _shots_curve(model_name: str, task: str) -> dict:
    clip = get_model(model_name)
    res, _, _ = tip_eval.evaluate_task(clip, task, n_val=200, n_test=300, n_views=10, epochs=20)
    return res


def on_shots_plot(state, model_name, source, task_label):
    """Accuracy versus shots for the selected built-in task (computed once per model and task)."""
    try:
        if source != SOURCES[0] or task_label not in BUILTIN_TASKS:
            raise ValueError("the accuracy-versus-shots plot is for built-in tasks (they have labelled test images)")
        task = BUILTIN_TASKS[task_label]
        return viz_tip.accuracy_vs_shots_figure({task_label: _shots_curve(model_name, task)})
    except Exception as e:  # noqa: BLE001
        gr.Warning(_message(e))
        return gr.skip()


def on_query_upload(path):
    if not path:
        return None
    try:
        return np.asarray(load_image(path))
    except ValueError as e:
        gr.Warning(str(e))
        return None


# ---------------------------------------------------------------- the UI

INTRO = """# Tip-Adapter: few-shot CLIP without training
1. Pick a **built-in task** or upload a few images per class (**My images**), choose the shots and **build the cache**
   — its keys are CLIP features of the support images (averaged over 10 augmented views), its values one-hot labels.
2. **Classify** a query: zero-shot CLIP (text only), the cache's vote, and the fused result
   `100·f·W_cᵀ + α·exp(−β(1 − f·keys))·values`. Move **alpha** (weight of the cache) and **beta** (its sharpness).
"""


def build_demo(model: str = "toy", queue_size: int = QUEUE_SIZE, concurrency: int = CONCURRENCY,
               max_batch: int = MAX_BATCH) -> gr.Blocks:
    """The app. Loads ``model`` up front (fails fast with ModelError if it cannot be used)."""
    get_model(model)
    models = available_models(model)
    with gr.Blocks(title="Tip-Adapter · VLM Efficiency Lab", analytics_enabled=False,
                   delete_cache=(3600, 3600)) as demo:
        state = gr.State(None)
        gr.Markdown(INTRO)
        with gr.Row():
            model_dd = gr.Dropdown(models, value=model, label="CLIP model", elem_id="model")
            source = gr.Radio(list(SOURCES), value=SOURCES[0], label="Support images", elem_id="source")
            task_dd = gr.Dropdown(list(BUILTIN_TASKS), value=next(iter(BUILTIN_TASKS)), label="Built-in task",
                                  elem_id="task")
            shots = gr.Slider(1, MAX_SHOTS, value=4, step=1, label="Shots per class", elem_id="shots")
        with gr.Accordion("My images: a name and a few images per class (empty rows are ignored)", open=False):
            names, files = [], []
            for i in range(MAX_CLASSES):
                with gr.Row():
                    names.append(gr.Textbox(label=f"Class {i + 1} name", elem_id=f"class-name-{i}", scale=1))
                    files.append(gr.File(file_count="multiple", file_types=["image"], label=f"Class {i + 1} images",
                                         elem_id=f"class-files-{i}", scale=3))
        build_btn = gr.Button("1 · Build the cache", variant="primary", elem_id="build-btn")
        status = gr.Markdown("No cache yet.", elem_id="status")
        with gr.Row():
            support_gallery = gr.Gallery(label="Support set (the cache's keys come from these)", columns=8,
                                         height=220, elem_id="support-gallery")
            cache_plot = gr.Plot(label="Cache: keys, values, key-key affinities", elem_id="cache-plot")
        gr.Markdown("### 2 · Classify a query")
        with gr.Row():
            query = gr.File(label="Query image", file_types=["image"], elem_id="query-file")
            preview = gr.Image(label="Query", interactive=False, height=160, elem_id="query-preview")
            with gr.Column():
                classify_btn = gr.Button("Classify", variant="primary", elem_id="classify-btn")
                pick_btn = gr.Button("Random test image (built-in task)", elem_id="pick-btn")
                pick_seed = gr.Number(0, visible=False, precision=0)
        with gr.Row():
            alpha = gr.Slider(0.0, 50.0, value=1.0, step=0.1, label="alpha: weight of the cache", elem_id="alpha")
            beta = gr.Slider(0.1, 20.0, value=1.0, step=0.1, label="beta: sharpness of affinities", elem_id="beta")
        result_md = gr.Markdown(elem_id="result")
        label = gr.Label(num_top_classes=3, label="Fused prediction", elem_id="fused-label")
        with gr.Row():
            plots = [gr.BarPlot(x="class", y="probability", y_lim=[0, 1], title=t, height=220, elem_id=e)
                     for t, e in (("Zero-shot CLIP", "zs-plot"), ("Cache vote", "cache-vote-plot"),
                                  ("Fused (Tip-Adapter)", "fused-plot"))]
        nearest = gr.Gallery(label="Most similar support images", columns=TOP_K, height=180, elem_id="nearest")
        gr.Markdown("### 3 · How many shots? (built-in tasks)")
        shots_btn = gr.Button("Accuracy versus shots", elem_id="shots-btn")
        shots_plot = gr.Plot(elem_id="shots-plot")

        result_outputs = [label, *plots, nearest]
        build_btn.click(on_build, [state, model_dd, source, task_dd, shots, *names, *files],
                        [state, status, support_gallery, cache_plot], api_name="build_cache",
                        concurrency_limit=concurrency)
        classify_btn.click(classify_batch, [state, query, alpha, beta], [*result_outputs, result_md, state],
                           api_name="classify", batch=True, max_batch_size=max_batch, concurrency_limit=concurrency)
        for slider in (alpha, beta):
            slider.change(on_rescore, [state, alpha, beta], [*result_outputs, result_md], api_name=False,
                          trigger_mode="always_last", show_progress="hidden")
        pick_btn.click(on_pick_query, [state, alpha, beta, pick_seed],
                       [*result_outputs, result_md, state, preview, pick_seed], api_name="pick_query")
        query.change(on_query_upload, query, preview, api_name=False, show_progress="hidden")
        shots_btn.click(on_shots_plot, [state, model_dd, source, task_dd], shots_plot, api_name="shots_plot",
                        concurrency_limit=1)
    demo.queue(default_concurrency_limit=concurrency, max_size=queue_size)
    return demo


def theme():
    """Gradio's default look with system fonts: the default theme fetches Google Fonts, and a lab runs offline."""
    return gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


def serve(demo: gr.Blocks, host: str = "127.0.0.1", port: int = 7860, block: bool = True, **kwargs):
    """Serve ``demo`` with the classroom settings (upload limit, no error tracebacks, offline theme).

    No ``allowed_paths`` are passed: the server serves only its own static files and uploads.
    With ``block=False`` it returns ``(app, local_url, share_url)`` and runs in a background thread.
    """
    return demo.launch(server_name=host, server_port=port, max_file_size=MAX_FILE_SIZE, show_error=False,
                       theme=theme(), footer_links=["api"], prevent_thread_lock=not block, quiet=not block, **kwargs)


def launch(host: str = "127.0.0.1", port: int = 7860, model: str = "toy", **kwargs):
    """Build and serve the app (``labkit app``, ``make app``); blocks."""
    return serve(build_demo(model), host, port, **kwargs)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="the Tip-Adapter demo")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--model", default="toy")
    args = parser.parse_args(argv)
    try:
        launch(args.host, args.port, args.model)
    except ModelError as e:
        raise SystemExit(f"labkit app: {e}") from None


if __name__ == "__main__":
    main()
