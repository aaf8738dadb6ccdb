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
