"""``labkit fetch NAME``: download exactly the files a real model needs into the Hugging Face cache.

The one command of the lab that touches the network (everything else reads the cache only, and fails
fast when a model is not there). ``NAME`` is an open_clip tag (``openclip:ViT-B-32/laion2b_s34b_b79k``,
as ``load_clip`` takes it) or a BLIP-2 id (``Salesforce/blip2-opt-2.7b``, ``Salesforce/blip2-flan-t5-xl``,
...). Files are written by the hub client, which stores each one complete or not at all; copy the
cache folder (``~/.cache/huggingface``) to an offline machine, or point ``HF_HOME`` at it.

It sits above the method packages (like the CLI): it reads open_clip's registry through
:mod:`labkit.clip.model` and BLIP-2's file list from :mod:`labkit.blip2.hf`.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from labkit.blip2.hf import BLIP2_FILES
from labkit.clip.model import openclip_hub_files
from labkit.core.checkpoint import ModelError
from labkit.core.command import Command

HUB_HOST = "huggingface.co"


def files_for(name: str) -> tuple[str, list[str]]:
    """``(repository, file patterns)`` that ``name`` needs, or :class:`ModelError` for a name the lab cannot use."""
    if name.startswith("openclip:"):
        arch, _, tag = name[len("openclip:"):].partition("/")
        if not arch or not tag:
            raise ModelError(f"bad model name {name!r}: expected openclip:<arch>/<pretrained-tag>")
        repo, candidates = openclip_hub_files(arch, tag)
        if not repo:
            raise ModelError(f"{name} is served by open_clip from a URL, not the Hugging Face hub; fetch it with "
                             f"python -c \"import open_clip; open_clip.create_model_and_transforms('{arch}', "
                             f"pretrained='{tag}')\"")
        return repo, [*candidates, "open_clip_config.json"]
    repo = name.removeprefix("hf:")
    org, _, model = repo.partition("/")
    if org != "Salesforce" or not model.startswith("blip2-"):
        raise ModelError(f"unknown model name {name!r}; labkit fetch takes an open_clip tag "
                         "(openclip:<arch>/<tag>) or a BLIP-2 id (Salesforce/blip2-opt-2.7b, Salesforce/blip2-flan-t5-xl, ...)")
    return repo, list(BLIP2_FILES)


def _check_online(timeout_s: float = 3.0) -> None:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False"):
        raise ModelError("HF_HUB_OFFLINE is set, so labkit fetch cannot download; unset it on a machine with internet")
    try:
        socket.create_connection((HUB_HOST, 443), timeout=timeout_s).close()
    except OSError as e:
        raise ModelError(f"cannot reach {HUB_HOST} ({e}); labkit fetch needs internet. Run it on a machine that has "
                         "it and copy the Hugging Face cache (~/.cache/huggingface) here") from e


def fetch(name: str) -> dict:
    """Download what ``name`` needs into the Hugging Face cache; returns the repository, files and snapshot folder."""
    repo, patterns = files_for(name)  # an unknown name fails before any network access
    _check_online()
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    print(f"labkit fetch: downloading {repo} ({', '.join(patterns)}) into the Hugging Face cache")
    try:
        folder = snapshot_download(repo, allow_patterns=patterns)
    except HfHubHTTPError as e:
        raise ModelError(f"the hub refused {repo}: {e}") from e
    files = sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*") if p.is_file())
    return {"name": name, "repository": repo, "snapshot": folder, "files": files}


COMMANDS = [Command(None, "fetch", fetch, "download a real model's files into the Hugging Face cache (needs internet)",
                    {"name": {"help": "openclip:<arch>/<tag> or a BLIP-2 id such as Salesforce/blip2-opt-2.7b"}},
                    positional=("name",))]
