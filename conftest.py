"""pytest's root configuration: the notebooks run under nbmake (``pytest --nbmake notebooks``) with the lab
book's guards against nbclient's stall, where a cell's reply waits unread until the cell timeout because an
Output widget sent its state on the shell channel while the client awaited that reply (scripts/build_book.py)."""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("build_book", Path(__file__).parent / "scripts" / "build_book.py")
_build_book = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_build_book)
_build_book.guard_nbclient()
