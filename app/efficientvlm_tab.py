"""The EfficientVLM tab: teacher, distilled student and pruned model side by side (Wang et al., 2022), live.

A student picks a ToyWorld scene and a caption (its true caption, a hard negative with other shapes, or typed)
and sees each shipped model's match probability P(match), its parameter count and its latency measured in
the request (median of interleaved runs, device synchronised before every timer read), and the pruned
model's gate map per modality (heads and FFN units that survived the L0 gates). All method logic is
:mod:`labkit.efficientvlm`; the timing is :func:`labkit.efficientvlm.eval.inference_speedup`.
"""

from __future__ import annotations

import html

import gradio as gr
import torch

from labkit.clip.model import load_clip
from labkit.data import toyworld as tw
from labkit.efficientvlm.eval import count_params, inference_speedup
from labkit.efficientvlm.model import load_efficient, trim_padding
from labkit.efficientvlm.viz import show_gates

from .common import CONCURRENCY, Lazy, data_uri, problem, table, thumb

MODELS = ("teacher", "student", "pruned")
CAPTIONS = ("true caption", "hard negative (other shapes)", "my caption")
WHERE = "EfficientVLM tab"
CLIP = Lazy(lambda: load_clip("toy"))
_VLMS = Lazy(lambda: {name: load_efficient(name) for name in MODELS})
REPEATS = 5


def scene_and_caption(seed, caption_mode: str, typed: str) -> tuple[tw.Scene, str]:
    """The test scene ``seed`` (2-3 objects) and the caption to score; ValueError on a bad seed, mode or word."""
    seed = int(seed)
    if seed < 0:
        raise ValueError(f"the scene seed must be 0 or more, got {seed}")
    world = tw.ToyWorld("test", seed=0, size=seed + 1, objects=(2, 3), canonical_captions=True)
    scene = world.scene(seed)
    if caption_mode == CAPTIONS[0]:
        return scene, scene.caption()
    if caption_mode == CAPTIONS[1]:
        return scene, world.hard_negative_group(seed, 2)[1].caption()
    if caption_mode != CAPTIONS[2]:
        raise ValueError(f"unknown caption choice {caption_mode!r}; pick one of {list(CAPTIONS)}")
    typed = (typed or "").strip()
    if not typed:
        raise ValueError("type a caption, e.g. 'a red circle at the top left'")
    unknown = CLIP().tokenizer.unknown_words(typed)
    if unknown:
        raise ValueError(f"the toy vocabulary does not know {', '.join(repr(w) for w in unknown)}; describe shapes, "
                         "colours, sizes and positions")
    return scene, typed


def gate_map(pruned, student) -> dict:
    """The pruned model's gates as 0/1 per head or unit of the student it was pruned from (kept first)."""
    full = student.sizes()
    return {name: torch.arange(full[name]) < kept for name, kept in pruned.sizes().items()}


def compare(seed, caption_mode: str, typed: str) -> dict:
    scene, caption = scene_and_caption(seed, caption_mode, typed)
    clip, vlms = CLIP(), _VLMS()
    images = clip.prepare(torch.from_numpy(scene.render().copy()).permute(2, 0, 1)[None])
    ids = trim_padding(clip.tokenize([caption]))
    scores = {name: float(m.match_scores(images, ids)[0]) for name, m in vlms.items()}
    timing = inference_speedup(vlms["teacher"], {n: vlms[n] for n in MODELS[1:]}, images, ids, repeats=REPEATS,
                               warmup=1)
    ms = {"teacher": timing["baseline_ms"], **{n: timing[n]["ms"] for n in MODELS[1:]}}
    return {"scene": scene, "caption": caption, "scores": scores, "ms": ms,
            "params": {n: count_params(m) for n, m in vlms.items()}}


def on_compare(seed, caption_mode, typed):
    """Compare button: the three models on one pair, and the gate map; on bad input a message, nothing stale."""
    try:
        r = compare(seed, caption_mode, typed)
    except Exception as e:  # noqa: BLE001 - every failure becomes a message, never a traceback
        return "", problem(e, WHERE), "", None
    base = r["ms"]["teacher"]
    rows = [[name, f"{r['params'][name] / 1e6:.2f} M", f"<b>{r['scores'][name]:.3f}</b>", f"{r['ms'][name]:.2f}",
             f"{base / r['ms'][name]:.2f}x"] for name in MODELS]
    caption = (f"Latency: one image-caption pair through all three encoders, median of {REPEATS} interleaved runs "
               "measured now on this server (batch 1, so small; `labkit eval efficient` measures at batch 250).")
    text = f"Caption scored: *{html.escape(r['caption'])}*  \nTrue caption: {html.escape(r['scene'].caption())}"
    vlms = _VLMS()
    fig = show_gates({k: v.float().numpy() for k, v in gate_map(vlms["pruned"], vlms["student"]).items()},
                     title="pruned model: heads and FFN units kept (1) or pruned (0), per modality")
    return (thumb(data_uri(r["scene"].render()), "the scene", 160), text,
            table(["model", "parameters", "P(match)", "latency (ms)", "speedup"], rows, caption), fig)


INTRO = """## EfficientVLM: distil, then prune with learned L0 gates
The teacher (a 6-layer vision-language model), the student distilled from it (half the layers) and the pruned student
(heads and FFN units removed by hard-concrete gates trained to a sparsity target) score the same image-caption pair.
"""


def build_tab() -> None:
    gr.Markdown(INTRO)
    with gr.Row():
        with gr.Column(scale=1, min_width=260):
            seed = gr.Number(0, precision=0, label="scene seed", elem_id="evlm-seed")
            mode = gr.Radio(list(CAPTIONS), value=CAPTIONS[0], label="Caption", elem_id="evlm-mode")
            typed = gr.Textbox(label="my caption", placeholder="a red circle at the top left", elem_id="evlm-caption")
            btn = gr.Button("Compare", variant="primary", elem_id="evlm-btn")
        with gr.Column(scale=3):
            with gr.Row():
                scene_html = gr.HTML(elem_id="evlm-scene", min_height=180)
                text = gr.Markdown(elem_id="evlm-text")
            scores = gr.HTML(elem_id="evlm-table")
            gates = gr.Plot(show_label=False, elem_id="evlm-gates")
    btn.click(on_compare, [seed, mode, typed], [scene_html, text, scores, gates], api_name="efficientvlm_compare",
              concurrency_limit=CONCURRENCY)
