"""The BLIP-2 tab: the shipped Q-Former pipeline (Li et al., ICML 2023) answering a typed question about a scene.

A student draws a random ToyWorld scene or builds one from chosen objects, types a question, and sees the
frozen LM's answer and caption from the Q-Former's soft prompts, next to the truth when the scene knows it,
and where the text-conditioned queries look for that question (cross-attention averaged over heads and
cross-attention layers, per query and on average). All method logic is :mod:`labkit.blip2`; the figure is
:func:`labkit.blip2.viz.show_query_attention`.
"""

from __future__ import annotations

import gradio as gr
import torch

from labkit.blip2.data import TEXT_LEN, caption_text, load_encoder, qa_text, render, tokenizer
from labkit.blip2.eval import query_cross_attention
from labkit.blip2.lm import TextBatch
from labkit.blip2.train import checkpoint_dir, load_stage2, load_text_lm
from labkit.blip2.viz import show_query_attention
from labkit.data import toyworld as tw
from labkit.data.tokenizer import EOT

from .common import CONCURRENCY, Lazy, data_uri, problem, thumb

LMS = {"T5 (encoder-decoder)": "t5", "OPT (decoder-only)": "opt"}
NONE = "(none)"
N_OBJECT_ROWS = 3
WHERE = "BLIP-2 tab"
ENCODER = Lazy(lambda: load_encoder("toy"))
_PIPELINES = {kind: Lazy(lambda kind=kind: load_stage2(checkpoint_dir(f"stage2_{kind}"),
                                                       load_text_lm(checkpoint_dir(f"lm_{kind}"))))
              for kind in LMS.values()}


def check_question(question: str) -> str:
    """The question, stripped; ValueError if it is empty or uses a word the toy LM has never seen."""
    question = (question or "").strip().lower()
    if not question:
        raise ValueError("type a question, e.g. 'what color is the circle?'")
    unknown = tokenizer().unknown_words(question)
    if unknown:
        raise ValueError(f"the toy LM does not know {', '.join(repr(w) for w in unknown)}; it knows "
                         f"shapes ({', '.join(tw.BASE_SHAPES)}), colours, positions and the question words "
                         "what / where / how many / color / shape / size / object")
    return question if question.endswith("?") else question + "?"


def object_rows(fields) -> list[tuple[str, str, str, str]]:
    """The object rows' flat (shape, colour, size, position, shape, ...) field values as one tuple per object."""
    return [tuple(fields[i: i + 4]) for i in range(0, len(fields), 4)]


def make_scene(mode: str, seed, rows: list[tuple[str, str, str, str]]) -> tw.Scene:
    """A random test scene (``seed``) or one built from the object rows (rows with shape '(none)' are skipped)."""
    if mode == "random scene":
        seed = int(seed)
        if seed < 0:
            raise ValueError(f"the scene seed must be 0 or more, got {seed}")
        return tw.ToyWorld("test", seed=0, size=seed + 1).scene(seed)
    objects = [r for r in rows if r[0] != NONE]
    if not objects:
        raise ValueError("choose at least one object (a shape other than '(none)')")
    return tw.compose_scene(objects)


@torch.no_grad()
def ask(kind: str, scene: tw.Scene, question: str) -> dict:
    """The pipeline's answer and caption for one scene, the true answer (if the scene has one) and the attention."""
    model, encoder, tok = _PIPELINES[kind](), ENCODER(), tokenizer()
    feats = encoder(render([scene]))
    eos = tok.ids[EOT]
    asked = TextBatch.from_lists([qa_text(tok, question)[0]], [[]])
    out = {}
    for name, text, max_new in (("answer", asked, 4), ("caption", TextBatch.from_lists([caption_text(tok)[0]], [[]]), TEXT_LEN)):
        ids = model.generate(feats, text.prefix_ids, text.prefix_mask, max_new, eos)[0].tolist()
        out[name] = tok.decode(ids[: ids.index(eos)] if eos in ids else ids)
    out["maps"] = query_cross_attention(model.qformer, feats, text_ids=asked.prefix_ids, text_mask=asked.prefix_mask)[0]
    out["truth"] = dict(scene.questions()).get(question)
    return out


def on_ask(lm_label, mode, seed, question, *object_fields):
    """Ask button: scene, answer, caption and attention; on bad input a message and no stale result."""
    try:
        if lm_label not in LMS:
            raise ValueError(f"unknown language model {lm_label!r}; pick one of {list(LMS)}")
        scene = make_scene(mode, seed, object_rows(object_fields))
        question = check_question(question)
        out = ask(LMS[lm_label], scene, question)
    except Exception as e:  # noqa: BLE001 - every failure becomes a message, never a traceback
        return "", problem(e, WHERE), None
    truth = f" (true answer: **{out['truth']}**)" if out["truth"] else " (the scene has no single true answer)"
    hits = sum(w in out["caption"].split() for o in scene.objects for w in (o.shape, o.color))
    text = (f"**Q:** {question}  \n**A:** {out['answer'] or '(empty)'}{truth}  \n**Caption:** {out['caption']}  \n"
            f"True caption: {scene.caption()} · shape and colour words of the scene named in the caption: "
            f"{hits}/{2 * len(scene.objects)}")
    maps = out["maps"]
    fig = show_query_attention(scene.render(), torch.cat([maps.mean(0, keepdim=True), maps]),
                               title=f"where the queries look for '{question}'",
                               labels=["mean of queries", *[f"query {q}" for q in range(len(maps))]], size=1.3)
    return thumb(data_uri(scene.render()), "the scene", 192), text, fig


def example_questions(mode, seed, *object_fields):
    """The scene's own questions (each with one true answer), as examples to pick from."""
    try:
        qs = [q for q, _ in make_scene(mode, seed, object_rows(object_fields)).questions()]
    except Exception:  # noqa: BLE001 - examples are optional; on_ask reports the problem
        return gr.update()
    return gr.update(choices=qs, value=None)


INTRO = """## BLIP-2: a Q-Former between a frozen image encoder and a frozen language model
The shipped pipeline: the toy CLIP's patch tokens (frozen) → 16 learned queries in the Q-Former, which here also read
the question → a linear projection into soft prompts → a frozen word-level LM (T5 or OPT) answers or captions.
"""


def build_tab() -> None:
    gr.Markdown(INTRO)
    with gr.Row():
        with gr.Column(scale=2, min_width=300):
            lm = gr.Radio(list(LMS), value=next(iter(LMS)), label="Frozen language model", elem_id="blip2-lm")
            mode = gr.Radio(["random scene", "my objects"], value="random scene", label="Scene", elem_id="blip2-mode")
            seed = gr.Number(0, precision=0, label="scene seed (random scene)", elem_id="blip2-seed")
            fields = []
            with gr.Accordion("My objects (scene = 'my objects')", open=False):
                for r in range(N_OBJECT_ROWS):
                    with gr.Row():
                        fields += [gr.Dropdown([NONE, *tw.BASE_SHAPES], value=("circle", "square", NONE)[r],
                                               label="shape", min_width=90, elem_id=f"blip2-shape-{r}"),
                                   gr.Dropdown(list(tw.COLORS), value=("red", "blue", "green")[r], label="colour",
                                               min_width=90),
                                   gr.Dropdown(list(tw.SIZES), value="large", label="size", min_width=80),
                                   gr.Dropdown(list(tw.POSITIONS), value=("top left", "bottom right", "center")[r],
                                               label="position", min_width=110)]
            examples = gr.Dropdown([], label="questions this scene can answer", elem_id="blip2-examples",
                                   allow_custom_value=False)
            question = gr.Textbox("how many objects are there?", label="Question", elem_id="blip2-question")
            btn = gr.Button("Ask", variant="primary", elem_id="blip2-btn")
        with gr.Column(scale=3):
            with gr.Row():
                scene_html = gr.HTML(elem_id="blip2-scene", min_height=210)
                answer = gr.Markdown(elem_id="blip2-answer")
            attention = gr.Plot(show_label=False, elem_id="blip2-attention")
    btn.click(on_ask, [lm, mode, seed, question, *fields], [scene_html, answer, attention], api_name="blip2_ask",
              concurrency_limit=CONCURRENCY)
    for trigger in (mode.change, seed.change):
        trigger(example_questions, [mode, seed, *fields], examples, api_name=False, show_progress="hidden")
    examples.input(lambda q: q or gr.update(), examples, question, api_name=False, show_progress="hidden")
