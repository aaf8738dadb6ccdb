"""Build the lab book: notebooks 00-05 executed top to bottom and written as HTML pages, figures included.

    make book                                                      # full mode, into build/book/
    LABKIT_FAST=1 python scripts/build_book.py --out /tmp/book     # fast mode (about 2 minutes on 2 CPU cores)
    python scripts/build_book.py 01 05                             # only notebooks 01 and 05

Full mode runs every notebook as a student would: about 17 minutes on a quiet 2-core CPU (25 measured on
one core), most of it in notebooks 01, 02 and 04 (their first cells state their run times).

Each page is ``<notebook>.html`` in the site folder: the executed notebook with its code, printed results
and figures embedded as PNG images, so a page is one self-contained file. ``index.html`` links the pages
with each notebook's title, its number of figures and the time it took to run. The notebooks in the
repository stay without outputs.

The kernel draws with matplotlib's inline backend (``MPLBACKEND`` is removed from its environment), so
every ``plt.show()`` becomes an image on the page. Widgets cannot run on a static page: the figure a
slider or ``interact`` draws stays in the cell's output as the cell left it, and the controls and progress
bars themselves are left out.

Every cell must finish within ``--cell-timeout`` seconds (default 1,200; 300 in fast mode): a cell that
does not fails the build with an error naming the notebook and the cell instead of waiting forever.
"""

from __future__ import annotations

import argparse
import html
import os
import sys
import time
from pathlib import Path
from queue import Empty

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError
from nbclient.output_widget import OutputWidget
from nbconvert import HTMLExporter
from nbformat.v4 import output_from_msg

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
DEFAULT_OUT = ROOT / "build" / "book"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


class BookError(RuntimeError):
    """A notebook failed or stalled while the book was being built."""


def chapters() -> list[Path]:
    """Notebooks 00-05 in order (the exercise notebooks are not part of the book)."""
    return sorted(NOTEBOOKS.glob("0[0-5]_*.ipynb"))


def title(nb) -> str:
    """The first Markdown heading of a notebook."""
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                if line.startswith("#"):
                    return line.lstrip("#").strip()
    return "untitled"


class StaticOutput(OutputWidget):
    """Stands in for an ipywidgets ``Output`` widget (``interact``, ``interactive``, ``with out:``) during the build.

    What the kernel shows inside the widget goes into the cell's own outputs, so the page shows it as a static
    image; the widget's ``clear_output`` only clears what the widget itself showed. Unlike nbclient's own
    stand-in, it never sends the widget's state back to the kernel: that message went out on the shell channel
    while the client was waiting there for the cell's reply, and a reply that landed during the send could go
    unnoticed until the cell timed out (see :func:`poll_in_slices`).
    """

    def __init__(self, comm_id, state, kernel_client, executor):
        super().__init__(comm_id, state, kernel_client, executor)
        self.shown: list = []

    def sync_state(self) -> None:
        """Nothing goes back to the kernel."""

    def _clear(self, outs: list) -> None:
        outs[:] = [o for o in outs if not any(o is s for s in self.shown)]
        self.shown = []

    def clear_output(self, outs, msg, cell_index) -> None:
        if msg["content"].get("wait"):
            self.clear_before_next_output = True
        else:
            self._clear(outs)

    def output(self, outs, msg, display_id, cell_index) -> None:
        if self.clear_before_next_output:
            self._clear(outs)
            self.clear_before_next_output = False
        try:
            out = output_from_msg(msg)
        except ValueError:
            return
        outs.append(out)
        self.shown.append(out)


def kernel_env() -> dict:
    """The kernel's environment: this one, without ``MPLBACKEND`` (the inline backend embeds figures)."""
    return {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}


def _first_line(source: str) -> str:
    lines = [line for line in source.splitlines() if line.strip()]
    return lines[0][:80] if lines else ""


def poll_in_slices(get_msg, step: float = 1.0):
    """``get_msg`` that polls its socket afresh every ``step`` seconds until its own timeout runs out.

    A zmq.asyncio socket wakes whoever awaits it through an edge-triggered file descriptor; a send on the same
    socket that bypasses the asyncio wrapper (jupyter_client's ``Session.send`` sends through a plain shadow of
    it) can use up that edge, and a reply already in the socket then waits until the next poll starts. Short
    polls bound that wait to ``step``.
    """
    async def sliced(timeout=None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            try:
                return await get_msg(timeout=step if left is None else max(0.0, min(step, left)))
            except Empty:
                if left is not None and left <= step:
                    raise

    return sliced


def guard_nbclient() -> None:
    """Give every nbclient ``NotebookClient`` in this process both guards (the test suite's notebook runs under
    nbmake use it): Output widgets never send their state back to the kernel, and the shell channel is polled in
    slices (:func:`poll_in_slices`)."""
    OutputWidget.sync_state = StaticOutput.sync_state
    start = NotebookClient.async_start_new_kernel_client
    if getattr(start, "guarded", False):
        return

    async def guarded_start(self):
        kc = await start(self)
        kc.shell_channel.get_msg = poll_in_slices(kc.shell_channel.get_msg)
        return kc

    guarded_start.guarded = True
    NotebookClient.async_start_new_kernel_client = guarded_start


class BookClient(NotebookClient):
    """nbclient's NotebookClient with :class:`StaticOutput` for Output widgets (the shell channel is polled in
    slices by :func:`guard_nbclient`, applied once per build)."""

    def __init__(self, nb, **kwargs):
        super().__init__(nb, **kwargs)
        self.widget_registry = {"@jupyter-widgets/output": {"OutputModel": StaticOutput}}


def execute(notebook: Path, cell_timeout: int):
    """Run ``notebook`` top to bottom in a fresh kernel started in its own folder; returns the executed notebook."""
    nb = nbformat.read(notebook, as_version=4)
    running = {}
    client = BookClient(nb, timeout=cell_timeout, kernel_name="python3", store_widget_state=False,
                        resources={"metadata": {"path": str(notebook.parent)}},
                        on_cell_execute=lambda cell, cell_index: running.update(cell=cell, index=cell_index))
    try:
        client.execute(env=kernel_env())
    except (CellTimeoutError, CellExecutionError, DeadKernelError) as err:
        where = notebook.name
        if running:
            where += f", cell {running['index']} ({_first_line(running['cell'].source)!r})"
        if isinstance(err, CellTimeoutError):
            raise BookError(f"{where} did not finish within {cell_timeout} s; the kernel was stopped "
                            "(raise --cell-timeout if the cell is only slow)") from err
        if isinstance(err, DeadKernelError):
            raise BookError(f"{where}: the kernel died (killed from outside, or out of memory)") from err
        raise BookError(f"{where} raised an error:\n{err}") from err
    return nb


def static_page(nb) -> None:
    """Drop the widget views (sliders, progress bars): they need a running kernel; their figures stay."""
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.outputs if WIDGET_VIEW not in o.get("data", {})]


def count_figures(nb) -> int:
    return sum(1 for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
               if "image/png" in o.get("data", {}))


def build_page(notebook: Path, out: Path, cell_timeout: int) -> dict:
    """Execute ``notebook`` and write ``out/<name>.html``; returns the page's index record."""
    started = time.perf_counter()
    nb = execute(notebook, cell_timeout)
    seconds = time.perf_counter() - started
    static_page(nb)
    body, _ = HTMLExporter(template_name="lab").from_notebook_node(nb)
    page = out / f"{notebook.stem}.html"
    page.write_text(body, encoding="utf-8")
    return {"page": page.name, "title": title(nb), "seconds": round(seconds, 1), "figures": count_figures(nb)}


def write_index(out: Path, pages: list[dict], fast: bool) -> Path:
    mode = "fast mode (LABKIT_FAST=1: shortened runs)" if fast else "full mode"
    items = "".join(f'<li><a href="{p["page"]}">{html.escape(p["title"])}</a> — {p["figures"]} figures, '
                    f'ran in {p["seconds"]:.0f} s</li>' for p in pages)
    index = out / "index.html"
    index.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>VLM Efficiency Lab — the lab book"
                     f"</title></head><body><h1>VLM Efficiency Lab — the lab book</h1><p>Notebooks executed "
                     f"top to bottom in {mode}.</p><ol>{items}</ol></body></html>", encoding="utf-8")
    return index


def build_book(out: Path = DEFAULT_OUT, notebooks: list[Path] | None = None, cell_timeout: int | None = None) -> list[dict]:
    """Execute every chapter and write its page plus an index into ``out``; returns one record per page."""
    from labkit.core.train import fast_mode  # here, not at import: the test suite's conftest sets torch's threads first

    guard_nbclient()
    cell_timeout = cell_timeout or (300 if fast_mode() else 1200)
    out.mkdir(parents=True, exist_ok=True)
    pages = []
    for notebook in notebooks or chapters():
        print(f"running {notebook.name} ...", flush=True)
        pages.append(build_page(notebook, out, cell_timeout))
        print(f"  {pages[-1]['page']}: {pages[-1]['figures']} figures, {pages[-1]['seconds']} s", flush=True)
    write_index(out, pages, fast_mode())
    return pages


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="execute notebooks 00-05 and write them as an HTML lab book")
    parser.add_argument("only", nargs="*", help="notebook numbers to build (e.g. 01 05); default: all of 00-05")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"site folder (default {DEFAULT_OUT.relative_to(ROOT)})")
    parser.add_argument("--cell-timeout", type=int, default=None,
                        help="seconds one cell may run before the build fails (default 1200; 300 in fast mode)")
    args = parser.parse_args(argv)
    notebooks = chapters()
    if args.only:
        notebooks = [n for n in notebooks if n.name[:2] in args.only]
        unknown = sorted(set(args.only) - {n.name[:2] for n in notebooks})
        if unknown:
            parser.error(f"no notebook numbered {', '.join(unknown)}; accepted: {', '.join(n.name[:2] for n in chapters())}")
    try:
        build_book(args.out, notebooks, args.cell_timeout)
    except BookError as err:
        print(f"build_book: error: {err}", file=sys.stderr)
        return 1
    print(f"open {args.out / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
