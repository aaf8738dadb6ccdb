"""pytest's root configuration: the notebooks run under nbmake (``pytest --nbmake notebooks``) with the lab
book's guards against nbclient's stall, where a cell's reply waits unread until the cell timeout because an
Output widget sent its state on the shell channel while the client awaited that reply (scripts/build_book.py)."""

import build_book  # scripts/ is on pytest's pythonpath (pyproject.toml)

build_book.guard_nbclient()
