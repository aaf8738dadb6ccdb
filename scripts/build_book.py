"""Build the lab book: notebooks 00-05 executed top to bottom and written as HTML pages, figures included.

    make book                                  # full mode (what a student sees; about 40 minutes on 2 CPU cores)
    LABKIT_FAST=1 python scripts/build_book.py --out /tmp/book    # fast mode, a minute or two

Each page is the executed notebook (code, printed results and figures embedded as images, so a page is
one self-contained file); ``index.html`` links them with each notebook's title and the time it took to run.
The notebooks themselves stay without outputs in the repository.
"""

from __future__ import annotations

import argparse
import html
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbconvert import HTMLExporter

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
DEFAULT_OUT = ROOT / "build" / "book"


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


def build_page(notebook: Path, out: Path, timeout: int = 1800) -> dict:
    """Execute ``notebook`` (in its own folder, inline figures) and write ``out/<name>.html``."""
    nb = nbformat.read(notebook, as_version=4)
    started = time.perf_counter()
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(notebook.parent)}}).execute()
    seconds = time.perf_counter() - started
    body, _ = HTMLExporter(template_name="lab").from_notebook_node(nb)
    page = out / f"{notebook.stem}.html"
    page.write_text(body, encoding="utf-8")
    figures = sum(1 for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                  if "image/png" in o.get("data", {}))
    return {"page": page.name, "title": title(nb), "seconds": round(seconds, 1), "figures": figures}


def write_index(out: Path, pages: list[dict], fast: bool) -> Path:
    mode = "fast mode (LABKIT_FAST=1: shortened runs)" if fast else "full mode"
    items = "".join(f'<li><a href="{p["page"]}">{html.escape(p["title"])}</a> — {p["figures"]} figures, '
                    f'ran in {p["seconds"]:.0f} s</li>' for p in pages)
    index = out / "index.html"
    index.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>VLM Efficiency Lab — the lab book"
                     f"</title></head><body><h1>VLM Efficiency Lab — the lab book</h1><p>Notebooks 00-05 executed "
                     f"top to bottom in {mode}.</p><ol>{items}</ol></body></html>", encoding="utf-8")
    return index


def build_book(out: Path = DEFAULT_OUT, notebooks: list[Path] | None = None) -> list[dict]:
    """Execute every chapter and write its page plus an index into ``out``; returns one record per page."""
    os.environ.pop("MPLBACKEND", None)  # the kernel's inline backend turns plt.show() into an embedded image
    out.mkdir(parents=True, exist_ok=True)
    pages = []
    for notebook in notebooks or chapters():
        print(f"running {notebook.name} ...", flush=True)
        pages.append(build_page(notebook, out))
        print(f"  {pages[-1]['page']}: {pages[-1]['figures']} figures, {pages[-1]['seconds']} s", flush=True)
    write_index(out, pages, os.environ.get("LABKIT_FAST") == "1")
    return pages


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="execute notebooks 00-05 and write them as an HTML lab book")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"site folder (default {DEFAULT_OUT.relative_to(ROOT)})")
    args = parser.parse_args(argv)
    build_book(args.out)
    print(f"open {args.out / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
