"""``make book`` in fast mode into a temporary folder: every notebook 00-05 executed and written as one
self-contained HTML page with its figures embedded, and an index linking them (about 1.5 minutes on 2 cores)."""

import asyncio
import re
import time
from pathlib import Path

import build_book
import pytest
from jupyter_client.manager import start_new_async_kernel


@pytest.fixture(scope="module")
def book(tmp_path_factory):
    out = tmp_path_factory.mktemp("book")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LABKIT_FAST", "1")
        mp.setenv("MPLBACKEND", "Agg")  # as in `make test`: the builder must still give its kernels the inline backend
        pages = build_book.build_book(out, cell_timeout=120)  # fast-mode cells take seconds; a stalled one fails
    return out, pages


@pytest.mark.slow
def test_every_chapter_has_a_page_linked_from_the_index(book):
    out, pages = book
    names = [p.stem for p in build_book.chapters()]
    assert len(names) == 6 and [p["page"] for p in pages] == [f"{n}.html" for n in names]
    index = (out / "index.html").read_text(encoding="utf-8")
    assert re.findall(r'href="([^"]+)"', index) == [p["page"] for p in pages]
    assert "fast mode" in index
    for p in pages:
        assert (out / p["page"]).is_file(), p
        assert f'{p["figures"]} figures, ran in' in index and p["title"] != "untitled", p


@pytest.mark.slow
def test_every_page_embeds_its_figures_as_images(book):
    out, pages = book
    for p in pages:
        body = (out / p["page"]).read_text(encoding="utf-8")
        assert p["figures"] > 0, p
        assert body.count('src="data:image/png;base64,') == p["figures"], p["page"]
        # widget views need a live kernel (and a CDN script): left out, their figures kept
        assert "application/vnd.jupyter.widget-view+json" not in body and "html-manager" not in body, p["page"]


@pytest.mark.slow
def test_the_figures_drawn_by_interactive_widgets_are_on_the_page(book):
    """Notebook 01's mask-ratio slider (``widgets.interactive``) draws its figure inside an Output widget: the page
    shows it under the cell like any other figure."""
    out, pages = book
    flip = next(p for p in pages if p["page"].startswith("01_"))
    nb = build_book.nbformat.read(build_book.NOTEBOOKS / "01_flip.ipynb", as_version=4)
    interactive = [c for c in nb.cells if c.cell_type == "code" and "widgets.interactive(" in c.source]
    assert len(interactive) == 1
    body = (out / flip["page"]).read_text(encoding="utf-8")
    after = body.split("show_random", 1)[1]  # the figure follows the cell that defines and shows the slider
    assert 'src="data:image/png;base64,' in after.split("jp-Cell jp-MarkdownCell", 1)[0]


def small_notebook(folder: Path, *sources: str) -> Path:
    nb = build_book.nbformat.v4.new_notebook(cells=[build_book.nbformat.v4.new_markdown_cell("# A small chapter"),
                                                    *map(build_book.nbformat.v4.new_code_cell, sources)])
    path = folder / "09_small.ipynb"
    build_book.nbformat.write(nb, path)
    return path


def test_a_cell_that_does_not_finish_fails_the_build_naming_the_notebook_and_the_cell(tmp_path):
    notebook = small_notebook(tmp_path, "x = 1", "import time\ntime.sleep(60)")
    with pytest.raises(build_book.BookError, match=r"09_small\.ipynb, cell 2 \('import time'\) did not finish within 3 s"):
        build_book.build_book(tmp_path / "site", [notebook], cell_timeout=3)


def test_a_kernel_that_dies_fails_the_build_naming_the_notebook_and_the_cell(tmp_path):
    notebook = small_notebook(tmp_path, "x = 1", "import os\nos._exit(1)")
    with pytest.raises(build_book.BookError, match=r"09_small\.ipynb, cell 2 \('import os'\): the kernel died"):
        build_book.build_book(tmp_path / "site", [notebook], cell_timeout=30)


def test_an_output_widget_shows_its_last_drawing_and_keeps_what_the_cell_printed(tmp_path):
    """As notebook 05's alpha/beta sliders: print, then draw twice into an Output widget that clears itself."""
    notebook = small_notebook(tmp_path, """\
import ipywidgets as widgets
import matplotlib.pyplot as plt
from IPython.display import display
print("picked alpha=1")
out = widgets.Output()
def draw(n):
    with out:
        out.clear_output(wait=True)
        plt.plot(range(n))
        plt.show()
draw(2)
draw(3)
display(widgets.FloatSlider(), out)""")
    [page] = build_book.build_book(tmp_path / "site", [notebook], cell_timeout=60)
    body = (tmp_path / "site" / page["page"]).read_text(encoding="utf-8")
    assert page["figures"] == 1 and body.count('src="data:image/png;base64,') == 1
    assert "picked alpha=1" in body and page["title"] == "A small chapter"


def test_a_reply_that_lands_while_the_client_sends_on_the_shell_channel_is_still_read():
    """The client waits for a cell's reply in ``poll()`` on the shell socket; if, while the reply lands, the client
    sends on that socket (nbclient's own Output-widget stand-in did, through a plain shadow of the socket), the
    wake-up is used up and an unsliced poll sleeps until its timeout (the whole cell timeout) with the reply
    already in the socket. Polled in slices, the reply is read within a second."""
    async def scenario():
        km, kc = await start_new_async_kernel(kernel_name="python3")
        try:
            get_msg = build_book.poll_in_slices(kc.shell_channel.get_msg)
            msg_id = kc.execute("import time; time.sleep(0.3)")

            async def reply():
                while (await get_msg(timeout=60))["parent_header"].get("msg_id") != msg_id:
                    pass

            waiter = asyncio.ensure_future(reply())
            await asyncio.sleep(0.05)  # the waiter is in poll()
            time.sleep(2.0)  # the loop is busy (as with an iopub message) while the reply lands
            kc.shell_channel.send(kc.session.msg("comm_msg", {"comm_id": "no-such-widget", "data": {}}))
            started = time.monotonic()
            await asyncio.wait_for(waiter, 60)
            return time.monotonic() - started
        finally:
            kc.stop_channels()
            await km.shutdown_kernel(now=True)

    assert asyncio.run(scenario()) < 3


def test_an_unknown_notebook_number_is_refused_naming_the_accepted_ones(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_book.main(["07"])
    assert exit_info.value.code == 2
    assert "no notebook numbered 07; accepted: 00, 01, 02, 03, 04, 05" in capsys.readouterr().err
