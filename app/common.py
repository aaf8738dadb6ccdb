"""What every tab of the demo shares: the classroom limits, user-facing error messages and the HTML the tabs draw.

Errors a student can cause (``ValueError``, ``TimeoutError``, ``ModelError``) become a message on the page and
a line in the server log at INFO (the message only, never the student's data); anything else is logged with
its traceback and shown as a generic message. Results are HTML built from strings (bars, thumbnails as inline
PNGs encoded once per image): a classify response then costs a few kilobytes of text, not a chart spec and a
handful of image files written to the cache and fetched back (measured in ``docs/instructor_guide.md``).
"""

from __future__ import annotations

import base64
import html
import io
import logging
import threading
from collections.abc import Callable, Sequence

import gradio as gr
import numpy as np
import torch
from PIL import Image

from labkit.core.checkpoint import ModelError

log = logging.getLogger("labkit.app")

QUEUE_SIZE = 256  # requests waiting per server; more get "queue full"
CONCURRENCY = 2  # worker threads per event (2 cores)
MAX_BATCH = 32  # classify requests of different students sharing one encoder pass
USER_ERRORS = (ValueError, TimeoutError, ModelError)


def message(e: Exception, where: str) -> str:
    """The text a student sees for ``e``; logged at INFO (user errors) or with the traceback (server bugs)."""
    if isinstance(e, USER_ERRORS):
        log.info("%s: %s", where, e)
        return str(e)
    log.exception("%s: unexpected error", where)
    return "something went wrong on the server (logged); nothing you had was lost"


def problem(e: Exception, where: str) -> str:
    """A Markdown problem line for ``e`` (see :func:`message`)."""
    return f"**Problem:** {message(e, where)}"


def warn(e: Exception, where: str) -> str:
    """Show ``e`` as a warning toast too; returns its Markdown problem line (see :func:`message`)."""
    text = message(e, where)
    gr.Warning(text)
    return f"**Problem:** {text}"


class Lazy:
    """A value built once per process on first use, thread-safe (the shipped models of a tab)."""

    def __init__(self, build: Callable[[], object]):
        self._build, self._value, self._lock = build, None, threading.Lock()

    def __call__(self):
        with self._lock:
            if self._value is None:
                self._value = self._build()
            return self._value


def as_hwc(image) -> np.ndarray:
    """uint8 ``[H, W, 3]`` from a uint8/float ``[3, H, W]`` tensor or an ``[H, W, 3]`` array."""
    if isinstance(image, torch.Tensor):
        x = image.detach().cpu()
        if x.is_floating_point():
            x = (x.clamp(0, 1) * 255).round()
        image = x.to(torch.uint8).permute(1, 2, 0).numpy()
    return np.ascontiguousarray(image, dtype=np.uint8)


def data_uri(image, max_side: int = 256) -> str:
    """An image as an inline PNG (``data:image/png;base64,...``) at its own resolution (at most ``max_side``);
    the page scales it up (64 px ToyWorld images stay a few kilobytes)."""
    img = Image.fromarray(as_hwc(image))
    img.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def thumb(uri: str, caption: str, side: int = 96) -> str:
    """One image with its caption under it (HTML)."""
    return (f'<figure class="lab-thumb" style="margin:0;display:inline-block;text-align:center;width:{side + 8}px">'
            f'<img src="{uri}" width="{side}" height="{side}" style="image-rendering:pixelated;border-radius:4px" '
            f'alt="{html.escape(caption)}"><figcaption style="font-size:12px;line-height:1.2">'
            f'{html.escape(caption)}</figcaption></figure>')


def thumb_rows(rows: Sequence[tuple[str, Sequence[tuple[str, str]]]], side: int = 96) -> str:
    """Rows of captioned thumbnails, each row headed by a label (one row per class): wraps, never scrolls sideways."""
    out = []
    for label, items in rows:
        cells = "".join(thumb(uri, cap, side) for uri, cap in items)
        out.append(f'<div style="display:flex;flex-wrap:wrap;align-items:flex-start;gap:6px;margin:4px 0">'
                   f'<div style="min-width:90px;font-weight:600;align-self:center">{html.escape(label)}</div>'
                   f'{cells}</div>')
    return "".join(out)


def bar(value: float, scale: float, color: str) -> str:
    """A horizontal bar ``value / scale`` of the cell wide (HTML)."""
    width = 0.0 if scale <= 0 else max(0.0, min(1.0, value / scale)) * 100
    return f'<span style="display:inline-block;height:14px;width:{width:.1f}%;background:{color}"></span>'


def table(header: Sequence[str], rows: Sequence[Sequence[str]], caption: str = "",
          widths: Sequence[str] | None = None) -> str:
    """A plain HTML table that fits any width (fixed layout, cells wrap); cells are HTML already (escape text
    with :func:`html.escape`); ``widths`` are CSS widths of the columns."""
    widths = widths or [""] * len(header)
    head = "".join(f'<th style="text-align:left;padding:2px 6px;{"width:" + w if w else ""}">{h}</th>'
                   for h, w in zip(header, widths, strict=True))
    cell = 'style="padding:2px 6px;vertical-align:middle;overflow-wrap:anywhere"'
    body = "".join("<tr>" + "".join(f"<td {cell}>{c}</td>" for c in r) + "</tr>" for r in rows)
    cap = f'<caption style="caption-side:bottom;font-size:12px;text-align:left">{caption}</caption>' if caption else ""
    return (f'<table style="width:100%;border-collapse:collapse;table-layout:fixed;font-size:14px">{cap}'
            f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
