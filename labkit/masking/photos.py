"""Real photos to mask: scikit-image's bundled sample images (no download), resized for a ViT's patch grid."""

from __future__ import annotations

import torch
import torch.nn.functional as F

PHOTO_NAMES = ("astronaut", "chelsea", "coffee", "rocket")


def photo(name: str, size: int = 224) -> torch.Tensor:
    """One of :data:`PHOTO_NAMES` as float ``[3, size, size]`` in [0, 1] (antialiased resize)."""
    from skimage import data as skdata

    if name not in PHOTO_NAMES:
        raise ValueError(f"unknown photo {name!r}; accepted: {', '.join(PHOTO_NAMES)}")
    x = torch.from_numpy(getattr(skdata, name)()).permute(2, 0, 1)[None].float() / 255
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)[0]


def image_to_float(image, size: int = 224) -> torch.Tensor:
    """An RGB PIL image or uint8 ``[H, W, 3]`` array as float ``[3, size, size]`` (centre square, resized)."""
    import numpy as np

    x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255
    side = min(x.shape[1:])
    top, left = (x.shape[1] - side) // 2, (x.shape[2] - side) // 2
    x = x[:, top: top + side, left: left + side][None]
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)[0]
