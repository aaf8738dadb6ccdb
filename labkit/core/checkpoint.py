"""The lab's one checkpoint format, for every model it trains and ships.

A checkpoint is a folder of three files::

    config.json          what to build: the model's config, read by the model's own loader
    model.safetensors    the weights (safetensors: no pickle, safe to load from anywhere)
    metadata.json        how it was made: {"command": "labkit train ...", ...the training record}

``metadata.json`` always holds ``command``, the exact command (or Python call) that produced the
checkpoint, so every shipped model can be reproduced from its own folder. The toy CLIP uses the same
format with open_clip's local-dir names (:data:`OPEN_CLIP`: ``open_clip_config.json`` +
``open_clip_model.safetensors``), so ``open_clip.create_model_and_transforms("local-dir:...")`` still
reads a stock config written by the lab.

Files are written atomically (temporary files in the folder, then renamed), so an interrupted save
never leaves a half-written checkpoint; tensors that share storage (tied embeddings) are stored once
and restored on load. Everything that can go wrong on load raises :class:`ModelError` with what to do.
"""

from __future__ import annotations

import json
import os
import shlex
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

__all__ = ["ModelError", "Layout", "LABKIT", "OPEN_CLIP", "save_checkpoint", "load_checkpoint", "read_metadata",
           "is_checkpoint", "invocation", "write_atomically"]


class ModelError(ValueError):
    """A model name, checkpoint or weights file that cannot be used, with what to do about it."""


@dataclass(frozen=True)
class Layout:
    """The three file names of a checkpoint folder."""

    config: str = "config.json"
    weights: str = "model.safetensors"
    metadata: str = "metadata.json"



LABKIT = Layout()
OPEN_CLIP = Layout(config="open_clip_config.json", weights="open_clip_model.safetensors")
_TIED_KEY = "labkit.tied"  # safetensors header entry: {name: name it shares storage with}
_cli_command: str | None = None


def invocation(function: str, **arguments) -> str:
    """The command that is producing a checkpoint: the ``labkit ...`` command line when run from the CLI,
    else the Python call (``labkit.clip.pretrain.train_toy_clip(steps=2800, ...)``)."""
    if _cli_command is not None:
        return _cli_command
    args = ", ".join(f"{k}={v!r}" for k, v in arguments.items())
    return f"{function}({args})"


def set_cli_command(argv: list[str]) -> None:
    """Called by ``labkit``'s entry point: checkpoints written during this command record it."""
    global _cli_command
    _cli_command = "labkit " + " ".join(shlex.quote(a) for a in argv)


def write_atomically(folder: str | os.PathLike, files: dict[str, callable]) -> Path:
    """Write each ``name -> writer(path)`` into ``folder`` through temporary files, then rename them all."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        for name, write in files.items():
            write(os.path.join(tmp, name))
            os.chmod(os.path.join(tmp, name), 0o644)  # temporary files are private; checkpoints are not
        for name in files:
            os.replace(os.path.join(tmp, name), folder / name)
    return folder


def save_checkpoint(path: str | os.PathLike, state: dict[str, torch.Tensor], config: dict, metadata: dict,
                    layout: Layout = LABKIT, dtype: torch.dtype | None = None) -> Path:
    """Write ``config``, ``state`` and ``metadata`` (which must name its ``command``) as a checkpoint folder.

    ``dtype`` (e.g. ``torch.float16`` to keep shipped files small) converts floating-point tensors;
    :func:`load_checkpoint` returns them as float32 again.
    """
    if "command" not in metadata:
        raise ValueError("checkpoint metadata must record the command that produced it ('command')")
    seen, tensors, tied = {}, {}, {}
    for name, t in state.items():
        key = (t.data_ptr(), tuple(t.shape), t.dtype)
        if t.numel() and key in seen:
            tied[name] = seen[key]
            continue
        seen[key] = name
        t = t.detach().cpu()
        tensors[name] = (t.to(dtype) if dtype is not None and t.is_floating_point() else t).contiguous()
    header = {_TIED_KEY: json.dumps(tied)} if tied else None
    return write_atomically(path, {
        layout.weights: lambda p: save_file(tensors, p, metadata=header),
        layout.config: lambda p: Path(p).write_text(json.dumps(config, indent=1)),
        layout.metadata: lambda p: Path(p).write_text(json.dumps(metadata, indent=1, default=str)),
    })


def is_checkpoint(path: str | os.PathLike, layout: Layout = LABKIT) -> bool:
    path = Path(path)
    return (path / layout.config).is_file() and (path / layout.weights).is_file()


def _read_json(file: Path) -> dict:
    try:
        return json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"corrupt checkpoint file {file}: {e}") from e


def read_metadata(path: str | os.PathLike, layout: Layout = LABKIT) -> dict:
    """A checkpoint's ``metadata.json`` (``{}`` if it has none)."""
    file = Path(path) / layout.metadata
    return _read_json(file) if file.is_file() else {}


def load_checkpoint(path: str | os.PathLike, layout: Layout = LABKIT, what: str = "labkit checkpoint",
                    how_to_make: str = "") -> tuple[dict[str, torch.Tensor], dict, dict]:
    """``(state, config, metadata)`` of a checkpoint folder, floating-point tensors as float32.

    Raises :class:`ModelError` naming the folder, what it lacks and ``how_to_make`` one.
    """
    path = Path(path)
    if not is_checkpoint(path, layout):
        hint = f"; {how_to_make}" if how_to_make else ""
        raise ModelError(f"{path} is not a {what}: it needs {layout.config} and {layout.weights}{hint}")
    config = _read_json(path / layout.config)
    try:
        with safe_open(str(path / layout.weights), "pt") as f:  # its header holds the tied names
            header = f.metadata() or {}
        state = load_file(str(path / layout.weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelError(f"corrupt weights file {path / layout.weights}: {e}") from e
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    for name, source in json.loads(header.get(_TIED_KEY, "{}")).items():
        state[name] = state[source]
    return state, config, read_metadata(path, layout)
