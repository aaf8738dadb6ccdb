"""The Tip-Adapter tab: few-shot CLIP without training (Zhang et al., ECCV 2022), live.

A student picks a built-in task or uploads a few images per class, builds the cache (keys = CLIP features
of the support images averaged over 10 augmented views, values = one-hot labels), classifies a query and
sees the fused logits ``100 f W_c^T + alpha * exp(-beta (1 - f F^T)) L`` decomposed per class at their true
scale, the nearest support images and sliders for alpha (logarithmic) and beta that re-mix without
re-encoding. For a built-in task, alpha and beta start where the lab's validation search
(:func:`labkit.tipadapter.cache.search_alpha_beta`, never the test split) puts them, and the validation
accuracy of the current setting is shown next to zero-shot's. All method logic is :mod:`labkit.tipadapter`.

Classify requests are batched (one encoder pass for up to ``MAX_BATCH`` queries of different students).
"""

from __future__ import annotations

import html
import math
import os
import threading
import time
from functools import lru_cache

import gradio as gr
import numpy as np
import torch

from labkit.clip.eval import zero_shot_classifier
from labkit.clip.model import cached_openclip_weights, load_clip
from labkit.core.assets import asset_dir
from labkit.core.checkpoint import OPEN_CLIP, is_checkpoint
from labkit.tipadapter import cache as tip
from labkit.tipadapter import eval as tip_eval
from labkit.tipadapter import viz as viz_tip

from .common import CONCURRENCY, MAX_BATCH, bar, data_uri, problem, table, thumb, thumb_rows, warn
from .uploads import MAX_SHOTS, load_image, support_from_uploads, to_tensor

MAX_CLASSES = 6
BUILD_BUDGET_S = 60.0
TOP_K = 5
N_VAL = 300  # validation images per built-in task for the alpha/beta search and the live accuracy
UPLOAD_TEMPLATES = ("a {}", "a picture of a {}", "a photo of a {}", "there is a {}")
BUILTIN_TASKS = {"ToyWorld novel shapes": "novel", "ToyWorld shapes": "shape", "ToyWorld colours": "color",
                 "ToyWorld shifted (textured backgrounds)": "shifted", "MNIST digits (real, out of domain)": "mnist"}
DEFAULT_TASK = "ToyWorld novel shapes"  # zero-shot is weak there, so the cache visibly matters
SOURCES = ("Built-in task", "My images")
LOG_ALPHA_MIN, LOG_ALPHA_MAX = -2.5, 3.0  # covers the search grid (0, 0.01 ... ~850); the leftmost end is alpha 0
DEFAULT_LOG_ALPHA, DEFAULT_BETA = 0.0, 1.0
WHERE = "Tip-Adapter tab"

_models: dict[str, object] = {}
_models_lock = threading.Lock()


# ---------------------------------------------------------------- models and data

def get_model(name: str):
    """Load a CLIP once per process; raises ModelError for names that cannot be used."""
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


def alpha_of(log_alpha: float) -> float:
    """The alpha slider is logarithmic: ``10 ** log_alpha``, and its leftmost end is alpha = 0 (zero-shot only)."""
    return 0.0 if float(log_alpha) <= LOG_ALPHA_MIN + 1e-9 else 10.0 ** float(log_alpha)


def log_alpha_of(alpha: float) -> float:
    return LOG_ALPHA_MIN if alpha <= 0 else min(LOG_ALPHA_MAX, max(LOG_ALPHA_MIN, math.log10(alpha)))


@lru_cache(maxsize=8)
def _task_split(task: str, role: str):
    return tip_eval.task_data(task, role, {"support": 1000, "val": N_VAL, "test": 300}[role])


@lru_cache(maxsize=16)
def _val_features(model_name: str, task: str) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP features of a built-in task's validation images (computed once per model and task)."""
    images, labels, _, _ = _task_split(task, "val")
    return get_model(model_name).encode_image(images), labels


def support_from_task(task: str, shots: int) -> tuple[torch.Tensor, torch.Tensor, tuple, tuple]:
    """The first ``shots`` images per class of a built-in task's support pool."""
    if not 1 <= int(shots) <= MAX_SHOTS:
        raise ValueError(f"shots must be between 1 and {MAX_SHOTS}, got {shots}")
    images, labels, classnames, templates = _task_split(task, "support")
    idx = tip.select_shots(labels, int(shots), len(classnames))
    return images[idx], labels[idx], classnames, templates


# ---------------------------------------------------------------- the session: build, score

def build_session(model_name: str, source: str, task_label: str, shots: int, names=(), files=()) -> dict:
    """A fresh session state holding the cache; raises ValueError/TimeoutError/ModelError on bad input.

    For a built-in task it also holds the validation features and the validation search's alpha/beta.
    Over-limit uploads are skipped and named in ``skipped``.
    """
    clip = get_model(model_name)
    skipped: list[str] = []
    if source == SOURCES[0]:
        if task_label not in BUILTIN_TASKS:
            raise ValueError(f"unknown built-in task {task_label!r}; pick one of {list(BUILTIN_TASKS)}")
        task = BUILTIN_TASKS[task_label]
        images, labels, classnames, templates = support_from_task(task, shots)
    elif source == SOURCES[1]:
        task, templates = None, UPLOAD_TEMPLATES
        images, labels, classnames, skipped = support_from_uploads(names, files, shots, clip.image_size)
    else:
        raise ValueError(f"unknown support source {source!r}; pick one of {list(SOURCES)}")
    cache = tip.build_cache(clip, images, labels, classnames, deadline=time.monotonic() + BUILD_BUDGET_S)
    classifier = zero_shot_classifier(clip, classnames, templates)
    uris = [data_uri(img) for img in images]
    session = {"model": model_name, "task": task, "cache": cache, "classifier": classifier, "shots": int(shots),
               "support_uris": uris, "skipped": skipped, "query": None, "val": None, "search": None}
    if task is not None:
        feats, val_labels = _val_features(model_name, task)
        search = tip.search_alpha_beta(feats, val_labels, classifier, cache.keys, cache.values)
        session["val"] = {"zero_shot": tip.zero_shot_logits(feats, classifier),
                          "affinity": tip.affinity(feats, cache.keys), "labels": val_labels}
        session["search"] = {k: search[k] for k in ("alpha", "beta", "accuracy", "zero_shot_accuracy", "cache_helps")}
    return session


def val_accuracy(session: dict, alpha: float, beta: float) -> float:
    """Validation accuracy of Tip-Adapter at (alpha, beta) for the session's built-in task."""
    v = session["val"]
    logits = v["zero_shot"] + alpha * tip.cache_logits(v["affinity"], session["cache"].values, beta)
    return tip.accuracy(logits, v["labels"])


def score(session: dict, feature: torch.Tensor, alpha: float, beta: float) -> dict:
    """Zero-shot, cache and fused probabilities and logits of one query feature ``[D]``, and its nearest supports."""
    cache = session["cache"]
    r = tip.explain(feature, session["classifier"], cache.keys, cache.values, alpha, beta)
    top = r["affinity"].topk(min(TOP_K, len(cache.keys)))
    names = cache.classnames
    return {"classnames": names, "zero_shot": r["zero_shot"].cpu(), "fused": r["fused"].cpu(),
            "zero_shot_logits": r["zero_shot_logits"].cpu(), "cache_logits": (r["logits"] - r["zero_shot_logits"]).cpu(),
            "label": names[r["prediction"]],
            "nearest": [(int(i), names[int(cache.labels[i])], float(a))
                        for a, i in zip(top.values, top.indices, strict=True)]}


def logits_html(result: dict, alpha: float) -> str:
    """Per class, the fused logit as a stacked bar at its true scale: zero-shot part + alpha x cache vote.

    Every bar is shifted by one constant per term (the smallest class's value), which leaves the softmax,
    and so the fused probabilities, unchanged; at beta = 20 the cache part is as small as it really is.
    """
    zs, cv = result["zero_shot_logits"], result["cache_logits"]
    zs_rel, cv_rel = zs - zs.min(), cv - cv.min()
    scale = float((zs_rel + cv_rel).max()) or 1.0
    rows = []
    for c, name in enumerate(result["classnames"]):
        stacked = (f'<div style="width:100%;white-space:nowrap">{bar(float(zs_rel[c]), scale, "#4c72b0")}'
                   f'{bar(float(cv_rel[c]), scale, "#dd8452")}</div>')
        rows.append([html.escape(name), stacked, f"{float(zs_rel[c]):.2f} + {float(cv_rel[c]):.2f}",
                     f"<b>{float(result['fused'][c]):.3f}</b> ({float(result['zero_shot'][c]):.3f})"])
    caption = (f"Bars: fused logit = <span style='color:#4c72b0'>■ zero-shot 100·f·W<sub>c</sub></span> + "
               f"<span style='color:#dd8452'>■ α·cache vote</span> (α = {alpha:.3g}), each minus its smallest class "
               "value (the same shift for every class, so the probabilities are unchanged).")
    return table(["class", "fused logit", "zero-shot + α·cache", "P fused (zero-shot)"], rows, caption,
                 widths=["22%", "34%", "22%", "22%"])


def nearest_html(session: dict, result: dict) -> str:
    uris = session["support_uris"]
    return "".join(thumb(uris[i], f"{c} · affinity {a:.2f}", 112) for i, c, a in result["nearest"])


def query_html(uri: str, caption: str) -> str:
    return thumb(uri, caption, 192)


def result_line(session: dict, result: dict, alpha: float, beta: float) -> str:
    line = f"Prediction: **{result['label']}** (alpha={alpha:.3g}, beta={beta:g})"
    if session.get("true_class"):
        line += f" — true class: **{session['true_class']}**"
    return line


def val_line(session: dict | None, log_alpha: float, beta: float) -> str:
    """Live: validation accuracy of the current alpha/beta next to zero-shot's (built-in tasks)."""
    if not session or session.get("val") is None:
        return "Validation accuracy is shown for built-in tasks (your own images have no labelled validation set)."
    s, alpha = session["search"], alpha_of(log_alpha)
    return (f"Validation accuracy ({N_VAL} images): **{val_accuracy(session, alpha, float(beta)):.3f}** at "
            f"alpha = {alpha:.3g}, beta = {float(beta):g} · zero-shot CLIP {s['zero_shot_accuracy']:.3f} · "
            f"the search's choice alpha = {s['alpha']:.3g}, beta = {s['beta']:g}: {s['accuracy']:.3f}")


N_RESULT = 3  # fused label, logits decomposition, nearest supports
CLEARED = (None, "", "")  # what a failed request leaves: no stale prediction next to a new query


def _outputs(session: dict, result: dict, alpha: float) -> tuple:
    label = {n: float(p) for n, p in zip(result["classnames"], result["fused"], strict=True)}
    return label, logits_html(result, alpha), nearest_html(session, result)


# ---------------------------------------------------------------- event handlers

def on_build(state, model_name, source, task_label, shots, *slots):
    """Build button: a new cache (and, for built-in tasks, alpha/beta from validation); on error the old one stays."""
    names, files = slots[:MAX_CLASSES], slots[MAX_CLASSES:]
    try:
        session = build_session(model_name, source, task_label, shots, names, files)
    except Exception as e:  # noqa: BLE001 - every failure becomes a message, never a traceback
        return state, f"{warn(e, WHERE)}. The previous cache is kept.", gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
    cache = session["cache"]
    notes = []
    if source == SOURCES[0] and any(f for f in files if f):
        n = sum(len(f) for f in files if f)
        notes.append(f"{n} uploaded image(s) ignored: the support set came from the built-in task "
                     "(choose **My images** to use them)")
    if session["skipped"]:
        notes.append("skipped (over the size limit): " + ", ".join(session["skipped"]))
    for note in notes:
        gr.Warning(note.replace("**", ""))
    rows = [(name, [(session["support_uris"][i], f"{name} #{k + 1}")
                    for k, i in enumerate(torch.nonzero(cache.labels.cpu() == c).flatten().tolist())])
            for c, name in enumerate(cache.classnames)]
    fig = viz_tip.cache_figure(cache.keys.cpu(), cache.values.cpu(), cache.classnames)
    status = (f"**Cache built:** {cache.n_classes} classes × {session['shots']} shots = {len(cache.keys)} keys "
              f"(each averaged over 10 augmented views), model `{model_name}`.")
    log_alpha, beta, val = gr.skip(), gr.skip(), val_line(None, DEFAULT_LOG_ALPHA, DEFAULT_BETA)
    if session["search"] is not None:
        s = session["search"]
        log_alpha, beta = log_alpha_of(s["alpha"]), s["beta"]
        val = val_line(session, log_alpha, beta)
        status += (f" alpha = {s['alpha']:.3g} and beta = {s['beta']:g} were set by the validation search "
                   f"({'the cache beats zero-shot' if s['cache_helps'] else 'the cache does not beat zero-shot'} "
                   "on validation).")
    status += "".join(f"<br>Note: {n}." for n in notes)
    return session, status, thumb_rows(rows), fig, log_alpha, beta, val


def classify_batch(states, files, log_alphas, betas):
    """Batched classify: one encoder pass per model for every query in the batch, then per-session scoring."""
    n = len(states)
    out_states, statuses, results = list(states), [""] * n, [CLEARED] * n
    images: dict[str, list[tuple[int, torch.Tensor, str]]] = {}  # model -> (request, image, file name)
    for i, (state, path) in enumerate(zip(states, files, strict=True)):
        try:
            if not state or "cache" not in state:
                raise ValueError("build a cache first (step 1)")
            if not path:
                raise ValueError("upload a query image first")
            clip = get_model(state["model"])
            img = to_tensor(load_image(path), clip.image_size)
            images.setdefault(state["model"], []).append((i, img, os.path.basename(str(path))))
        except Exception as e:  # noqa: BLE001
            statuses[i] = problem(e, WHERE)
    for model_name, items in images.items():
        try:
            feats = get_model(model_name).encode_image(torch.stack([t for _, t, _ in items]))
        except Exception as e:  # noqa: BLE001
            for i, _, _ in items:
                statuses[i] = problem(e, WHERE)
            continue
        for (i, _, name), f in zip(items, feats, strict=True):
            alpha, beta = alpha_of(float(log_alphas[i])), float(betas[i])
            session = dict(states[i], query=f, true_class=None, query_name=name)
            result = score(session, f, alpha, beta)
            results[i] = _outputs(session, result, alpha)
            out_states[i] = session
            statuses[i] = result_line(session, result, alpha, beta)
    columns = list(zip(*results, strict=True))
    return (*[list(c) for c in columns], statuses, out_states)


def on_rescore(state, log_alpha, beta):
    """Slider moved: re-mix the stored query's logits (no re-encoding) and update the validation line."""
    if not state or "cache" not in state:
        return (*[gr.skip()] * N_RESULT, gr.skip(), gr.skip())
    val = val_line(state, log_alpha, beta)
    if state.get("query") is None:
        return (*[gr.skip()] * N_RESULT, gr.skip(), val)
    alpha, beta = alpha_of(log_alpha), float(beta)
    result = score(state, state["query"], alpha, beta)
    return (*_outputs(state, result, alpha), result_line(state, result, alpha, beta), val)


def on_pick_query(state, log_alpha, beta, seed):
    """Classify a random test image of the built-in task the cache was built from."""
    try:
        if not state or "cache" not in state:
            raise ValueError("build a cache first (step 1)")
        if state.get("task") is None:
            raise ValueError("random queries come from built-in tasks; upload a query for your own classes")
        images, labels, classnames, _ = _task_split(state["task"], "test")
        i = int(np.random.default_rng(int(seed)).integers(len(labels)))
        f = get_model(state["model"]).encode_image(images[i: i + 1])[0]
    except Exception as e:  # noqa: BLE001
        return (*CLEARED, warn(e, WHERE), state, "", gr.skip())
    truth = classnames[int(labels[i])]
    session = dict(state, query=f, true_class=truth, query_name=f"test image {i}")
    alpha, beta = alpha_of(log_alpha), float(beta)
    result = score(session, f, alpha, beta)
    return (*_outputs(session, result, alpha), result_line(session, result, alpha, beta), session,
            query_html(data_uri(images[i]), f"test image {i} · true class {truth}"), int(seed) + 1)


@lru_cache(maxsize=16)
def _shots_curve(model_name: str, task: str) -> dict:
    res, _, _ = tip_eval.evaluate_task(get_model(model_name), task, n_val=200, n_test=300, n_views=10, epochs=20)
    return res


def on_shots_plot(model_name, source, task_label):
    """Accuracy versus shots for the selected built-in task (computed once per model and task)."""
    try:
        if source != SOURCES[0] or task_label not in BUILTIN_TASKS:
            raise ValueError("the accuracy-versus-shots plot is for built-in tasks (they have labelled test images)")
        return viz_tip.accuracy_vs_shots_figure({task_label: _shots_curve(model_name, BUILTIN_TASKS[task_label])})
    except Exception as e:  # noqa: BLE001
        warn(e, WHERE)
        return gr.skip()


def on_query_upload(path):
    """Show the uploaded query at a size one can see (or say why it cannot be read)."""
    if not path:
        return ""
    try:
        return query_html(data_uri(load_image(path)), os.path.basename(str(path)))
    except ValueError as e:
        warn(e, WHERE)
        return ""


def on_source(source):
    """'My images' opens the upload panel and disables the task list; 'Built-in task' does the reverse."""
    mine = source == SOURCES[1]
    return gr.update(visible=mine), gr.update(interactive=not mine)


# ---------------------------------------------------------------- the UI

INTRO = """## Tip-Adapter: few-shot CLIP without training
1. Pick a **built-in task** or upload a few images per class (**My images**), choose the shots and **build the cache**
   — its keys are CLIP features of the support images (averaged over 10 augmented views), its values one-hot labels.
   For a built-in task, alpha and beta are then set by the lab's validation search.
2. **Classify** a query: the fused logits `100·f·W_cᵀ + α·exp(−β(1 − f·keys))·values`, split into zero-shot CLIP
   (text only) and the cache's vote. Move **alpha** (weight of the cache, logarithmic) and **beta** (its sharpness).
"""


def build_tab(model: str) -> None:
    """The tab's components and events (inside an open ``gr.Blocks``/``gr.Tab``)."""
    state = gr.State(None)
    gr.Markdown(INTRO)
    with gr.Row(equal_height=True):
        model_dd = gr.Dropdown(available_models(model), value=model, label="CLIP model", elem_id="model", scale=2)
        source = gr.Radio(list(SOURCES), value=SOURCES[0], label="Support images", elem_id="source", scale=2)
        task_dd = gr.Dropdown(list(BUILTIN_TASKS), value=DEFAULT_TASK, label="Built-in task", elem_id="task", scale=3)
        shots = gr.Slider(1, MAX_SHOTS, value=4, step=1, label="Shots per class", elem_id="shots", scale=2)
    with gr.Column(visible=False, elem_id="my-images") as my_panel:
        gr.Markdown("**My images:** a name and a few images per class (empty rows are ignored; files over the "
                    "per-image limit are skipped and named).")
        names, files = [], []
        for i in range(MAX_CLASSES):
            with gr.Row():
                names.append(gr.Textbox(label=f"Class {i + 1} name", elem_id=f"class-name-{i}", scale=1))
                files.append(gr.File(file_count="multiple", file_types=["image"], label=f"Class {i + 1} images",
                                     elem_id=f"class-files-{i}", scale=3))
    build_btn = gr.Button("1 · Build the cache", variant="primary", elem_id="build-btn")
    status = gr.Markdown("No cache yet.", elem_id="status")
    gr.Markdown("#### The support set (one row per class)")
    support = gr.HTML(elem_id="support-gallery")
    gr.Markdown("#### The cache: keys, values, key-key affinities")
    cache_plot = gr.Plot(show_label=False, elem_id="cache-plot")
    gr.Markdown("### 2 · Classify a query")
    with gr.Row():
        with gr.Column(scale=1, min_width=240):
            query = gr.File(label="Query image", file_types=["image"], elem_id="query-file", height=120)
            classify_btn = gr.Button("Classify", variant="primary", elem_id="classify-btn")
            pick_btn = gr.Button("Random test image (built-in task)", elem_id="pick-btn")
            pick_seed = gr.Number(0, visible=False, precision=0)
        with gr.Column(scale=1, min_width=220):
            preview = gr.HTML(elem_id="query-preview", label="Query")
        with gr.Column(scale=2, min_width=280):
            log_alpha = gr.Slider(LOG_ALPHA_MIN, LOG_ALPHA_MAX, value=DEFAULT_LOG_ALPHA, step=0.05,
                                  label="log10 alpha: weight of the cache (leftmost = alpha 0, zero-shot only)",
                                  elem_id="alpha")
            beta = gr.Slider(0.1, 20.0, value=DEFAULT_BETA, step=0.1, label="beta: sharpness of affinities",
                             elem_id="beta")
            val_md = gr.Markdown(val_line(None, 0, 1), elem_id="val-accuracy")
    result_md = gr.Markdown(elem_id="result")
    label = gr.Label(num_top_classes=3, label="Fused prediction", elem_id="fused-label")
    logits = gr.HTML(elem_id="logits")
    gr.Markdown("#### Most similar support images")
    nearest = gr.HTML(elem_id="nearest")
    gr.Markdown("### 3 · How many shots? (built-in tasks)")
    shots_btn = gr.Button("Accuracy versus shots", elem_id="shots-btn")
    shots_plot = gr.Plot(show_label=False, elem_id="shots-plot")

    results = [label, logits, nearest]
    source.change(on_source, source, [my_panel, task_dd], api_name=False, show_progress="hidden")
    build_btn.click(on_build, [state, model_dd, source, task_dd, shots, *names, *files],
                    [state, status, support, cache_plot, log_alpha, beta, val_md], api_name="build_cache",
                    concurrency_limit=CONCURRENCY)
    classify_btn.click(classify_batch, [state, query, log_alpha, beta], [*results, result_md, state],
                       api_name="classify", batch=True, max_batch_size=MAX_BATCH, concurrency_limit=CONCURRENCY)
    for slider in (log_alpha, beta):
        slider.change(on_rescore, [state, log_alpha, beta], [*results, result_md, val_md], api_name=False,
                      trigger_mode="always_last", show_progress="hidden")
    pick_btn.click(on_pick_query, [state, log_alpha, beta, pick_seed],
                   [*results, result_md, state, preview, pick_seed], api_name="pick_query")
    query.change(on_query_upload, query, preview, api_name=False, show_progress="hidden")
    shots_btn.click(on_shots_plot, [model_dd, source, task_dd], shots_plot, api_name="shots_plot",
                    concurrency_limit=1)
