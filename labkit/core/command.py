"""One ``labkit`` command as data: the library function it calls and the options it exposes.

Each package lists its commands in its ``commands.py`` (``COMMANDS = [Command(...), ...]``); ``labkit.cli``
builds the parser from them. Keeping this description in the core lets a method package declare its
commands without importing the CLI, which sits above the library.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


@dataclass(frozen=True)
class Command:
    """``labkit <verb> <name>`` (or ``labkit <name>`` when ``verb`` is None) calls ``function(**options)``.

    ``options`` maps each of ``function``'s parameters that the command exposes to its ``argparse``
    settings (``help``, and ``type``/``choices`` where the default does not say it). An option's default
    is the function's own, or the command's ``defaults`` (a shipped recipe); ``fixed`` arguments are
    passed as they are (``labkit train teacher`` is ``train_vlm(what="teacher", ...)``).
    """

    verb: str | None
    name: str
    function: Callable[..., dict]
    help: str
    options: dict[str, dict] = field(default_factory=dict)
    emits_json: bool = True
    fixed: dict = field(default_factory=dict)
    positional: tuple[str, ...] = ()  # options given without a flag (``labkit fetch NAME``)
    defaults: dict = field(default_factory=dict)

    def default(self, name: str):
        if name in self.defaults:
            return self.defaults[name]
        return inspect.signature(self.function).parameters[name].default


def save_json(result: dict, path: str | None) -> dict:
    """Also write a command's result to ``path`` (its ``--save`` option), creating folders; returns ``result``."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=1))
    return result
