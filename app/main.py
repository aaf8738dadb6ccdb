"""The classroom demo (Gradio Blocks): every method of the lab in one app, one tab each.

Tabs: Tip-Adapter (few-shot CLIP without training, :mod:`app.tipadapter_tab`), masking (random versus
cluster masks, :mod:`app.masking_tab`), BLIP-2 (the Q-Former pipeline answering a question,
:mod:`app.blip2_tab`) and EfficientVLM (teacher, student and pruned model side by side,
:mod:`app.efficientvlm_tab`); FLIP and Cluster Masking share the masking tab. Each tab is a thin face
over its method's package.

Classroom settings (:mod:`app.common`): a queue with a concurrency limit and a maximum size, Tip-Adapter's
classify requests batched (one encoder pass for up to ``MAX_BATCH`` queries from different students),
bounded work per request (caps on classes, images, pixels and a time budget for building a cache), an
upload limit, and no ``allowed_paths``: the server reads only files uploaded to it. Every error a student
can cause is shown as a message, logged at INFO, and loses nothing.
"""

from __future__ import annotations

import argparse
import logging
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # the lab runs offline
os.environ.setdefault("MPLBACKEND", "Agg")  # figures are drawn in server threads
# Gradio rebuilds its per-endpoint latency summary (a pandas DataFrame of up to 10,000 past events) after every
# event by default: 6 ms of server time per request after 700 requests, 16 ms after 10,000 (2-core CPU), so a
# class would slow down as the lesson goes on. Every 1,000 events is plenty for that summary.
os.environ.setdefault("GRADIO_ANALYTICS_CACHE_FREQUENCY", "1000")

import gradio as gr  # noqa: E402

from labkit.core.checkpoint import ModelError  # noqa: E402

from . import blip2_tab, efficientvlm_tab, masking_tab, tipadapter_tab  # noqa: E402
from .common import CONCURRENCY, QUEUE_SIZE  # noqa: E402
from .uploads import UPLOAD_LIMIT  # noqa: E402

TITLE = "VLM Efficiency Lab · classroom demo"
CSS = ".lab-thumb img { background: #eee; }"


def build_demo(model: str = "toy", queue_size: int = QUEUE_SIZE, concurrency: int = CONCURRENCY) -> gr.Blocks:
    """The app. Loads ``model`` (the Tip-Adapter tab's CLIP) up front: fails fast with ModelError if it cannot be used."""
    tipadapter_tab.get_model(model)
    with gr.Blocks(title=TITLE, analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        gr.Markdown("# VLM Efficiency Lab — every method, live")
        with gr.Tabs():
            with gr.Tab("Tip-Adapter", id="tipadapter"):
                tipadapter_tab.build_tab(model)
            with gr.Tab("Masking", id="masking"):
                masking_tab.build_tab()
            with gr.Tab("BLIP-2", id="blip2"):
                blip2_tab.build_tab()
            with gr.Tab("EfficientVLM", id="efficientvlm"):
                efficientvlm_tab.build_tab()
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
    return demo.launch(server_name=host, server_port=port, max_file_size=UPLOAD_LIMIT, show_error=False,
                       theme=theme(), css=CSS, footer_links=["api"], prevent_thread_lock=not block, quiet=not block, **kwargs)


def launch(host: str = "127.0.0.1", port: int = 7860, model: str = "toy", **kwargs):
    """Build and serve the app (``labkit app``, ``make app``); blocks. Student errors are logged at INFO."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("labkit.app").setLevel(logging.INFO)
    return serve(build_demo(model), host, port, **kwargs)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="the classroom demo: every method of the lab, one tab each")
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
