"""Uploads of the demo: decode, check and convert user images, with a clear error for each bad input.

Grayscale, palette, 16-bit and transparent images are converted; corrupt files, non-images and
decompression bombs are rejected with a message naming the file. In a support set, a file over the
per-image limit is skipped and named while the class keeps its valid files; classes with no images,
empty or duplicate names and more shots than images are rejected before any encoding, so a bad
upload never replaces a working cache. The server's own upload cap (``UPLOAD_LIMIT``, checked by
Gradio before a file is sent) is larger than the per-image limit so that one big photo does not make
the browser drop the other files picked with it.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from labkit.tipadapter import cache as tip

MAX_SHOTS = 16
MAX_FILES_PER_CLASS = 32
MAX_FILE_SIZE = "5mb"  # per image, checked here (named in the message)
MAX_FILE_BYTES = 5 * 1024 * 1024
UPLOAD_LIMIT = "25mb"  # per file, checked by Gradio before the upload
MAX_PIXELS = 40_000_000  # bigger decoded images are rejected (decompression bombs)
WORK_SIDE = 512  # larger images are downscaled to this longest side right after decoding


def load_image(path) -> Image.Image:
    """Decode one upload into an RGB PIL image, or raise ValueError saying what is wrong with it.

    Grayscale, palette, 16-bit and RGBA/LA images are converted (alpha composited on white);
    images over ``MAX_PIXELS`` are rejected before decoding; big ones are downscaled to ``WORK_SIDE``.
    """
    name = os.path.basename(str(path))
    try:
        size = os.path.getsize(path)
    except (OSError, TypeError) as e:
        raise ValueError(f"cannot read upload {name!r}") from e
    if size > MAX_FILE_BYTES:
        raise ValueError(f"{name!r} is {size / 2**20:.1f} MB; the upload limit is {MAX_FILE_SIZE}")
    try:
        with Image.open(path) as img:
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise ValueError(f"{name!r} is {w}x{h} pixels; images up to {MAX_PIXELS // 10**6} megapixels "
                                 "are accepted")
            img.draft("RGB", (WORK_SIDE, WORK_SIDE))  # JPEG: decode at reduced size directly
            img.load()
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")
                out = Image.new("RGB", rgba.size, (255, 255, 255))
                out.paste(rgba, mask=rgba.getchannel("A"))
            elif img.mode.startswith("I;16") or img.mode in ("I", "F"):
                arr = np.asarray(img, dtype=np.float32)
                arr = 255 * (arr - arr.min()) / max(float(arr.max() - arr.min()), 1e-6)
                out = Image.fromarray(arr.astype(np.uint8)).convert("RGB")
            else:
                out = img.convert("RGB")
    except ValueError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"{name!r} is not a readable image (corrupt or not an image file)") from e
    if min(out.size) < 1:
        raise ValueError(f"{name!r} is empty")
    out.thumbnail((WORK_SIDE, WORK_SIDE))
    return out


def to_tensor(img: Image.Image, size: int) -> torch.Tensor:
    """Centre-crop to a square, resize to ``size``: uint8 ``[3, size, size]``."""
    square = ImageOps.fit(img, (size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(square, dtype=np.uint8).copy()).permute(2, 0, 1)


def _file_size(path) -> int:
    try:
        return os.path.getsize(path)
    except (OSError, TypeError):
        return 0  # load_image names the unreadable file


def support_from_uploads(names, files, shots: int, size: int) -> tuple[torch.Tensor, torch.Tensor, tuple, list[str]]:
    """Support images ``[N*shots, 3, S, S]``, labels, class names and the names of skipped files.

    Slots with neither a name nor files are ignored; files over ``MAX_FILE_SIZE`` are skipped (and
    returned by name) while the class keeps its other files; every other bad input raises ValueError.
    """
    if not 1 <= int(shots) <= MAX_SHOTS:
        raise ValueError(f"shots must be between 1 and {MAX_SHOTS}, got {shots}")
    classes, skipped = [], []
    for slot, (name, paths) in enumerate(zip(names, files, strict=False), 1):
        name, paths = (name or "").strip(), [p for p in (paths or []) if p]
        if not name and not paths:
            continue
        big = [p for p in paths if _file_size(p) > MAX_FILE_BYTES]
        skipped += [f"{os.path.basename(str(p))} ({_file_size(p) / 2**20:.1f} MB)" for p in big]
        paths = [p for p in paths if p not in big]
        if not name:
            raise ValueError(f"class slot {slot} has images but an empty name; type a class name")
        if not paths:
            raise ValueError(f"class {name!r} has no usable images; upload at least {shots} "
                             f"(up to {MAX_FILE_SIZE} each)" + (f"; skipped: {', '.join(skipped)}" if big else ""))
        if len(paths) > MAX_FILES_PER_CLASS:
            raise ValueError(f"class {name!r} has {len(paths)} images; at most {MAX_FILES_PER_CLASS} per class")
        if len(paths) < shots:
            raise ValueError(f"class {name!r} has {len(paths)} usable image(s), fewer than shots={shots}; "
                             "lower the shots or upload more" + (f" (skipped: {', '.join(skipped)})" if big else ""))
        classes.append((name, paths[: int(shots)]))
    if len(classes) < 2:
        raise ValueError(f"Tip-Adapter needs at least 2 classes with images, got {len(classes)}")
    classnames = tip.check_classnames([c for c, _ in classes])
    images = [to_tensor(load_image(p), size) for _, paths in classes for p in paths]
    labels = torch.arange(len(classes)).repeat_interleave(int(shots))
    return torch.stack(images), labels, classnames, skipped
