"""The model zoo: one ``load_clip(name)`` for the shipped toy CLIP, open_clip tags and local dirs.

Accepted names
    toy                              the checkpoint shipped in ``labkit/assets/toy_clip``
    local-dir:<path>                 a folder in open_clip's local-dir layout
                                     (``open_clip_config.json`` + ``open_clip_model.safetensors``)
    openclip:<arch>/<pretrained-tag> open_clip's pretrained weights, when already cached

The toy CLIP is an open_clip ``CLIP`` built from ``model_cfg`` with two declared extras in the
config's ``labkit`` section: a convolutional stem in place of the patchify conv (the measured fix
that lets a tiny ViT learn shape, docs/design.md) and a word-level tokenizer (see
:mod:`labkit.data.tokenizer`). Stock configs without that section load with plain open_clip too.
"""

from __future__ import annotations

import os
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from labkit.core.assets import asset_dir
from labkit.core.checkpoint import OPEN_CLIP, ModelError, invocation, load_checkpoint, read_metadata, save_checkpoint
from labkit.core.device import autocast, get_device
from labkit.data.tokenizer import WordTokenizer

ACCEPTED_NAMES = "'toy', 'local-dir:<path>' or 'openclip:<arch>/<pretrained-tag>' (e.g. openclip:ViT-B-32/laion2b_s34b_b79k)"


class ConvStem(nn.Module):
    """Three 3x3 stride-2 conv + BatchNorm + ReLU, then a 1x1 conv to the ViT width.

    Replaces the ViT's patchify conv (``visual.conv1``) with the same output grid (image/8), so
    the rest of open_clip's VisionTransformer, PatchDropout included, is unchanged.
    """

    def __init__(self, width: int, channels: tuple[int, ...] = (24, 48, 96)):
        super().__init__()
        layers, c_in = [], 3
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
            c_in = c
        layers.append(nn.Conv2d(c_in, width, 1))
        self.net = nn.Sequential(*layers)
        self.stride = 2 ** len(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build_clip(config: dict) -> nn.Module:
    """An open_clip ``CLIP`` from an ``open_clip_config.json`` dict, with labkit's declared extras."""
    model_cfg = config["model_cfg"]
    vision = model_cfg["vision_cfg"]
    if vision["image_size"] % vision["patch_size"]:
        raise ModelError(f"image_size {vision['image_size']} is not divisible by patch_size {vision['patch_size']}")
    model = open_clip.CLIP(**model_cfg)
    stem = config.get("labkit", {}).get("stem")
    if stem:
        if stem.get("type") != "conv":
            raise ModelError(f"unknown stem type {stem.get('type')!r}; accepted: 'conv'")
        model.visual.conv1 = ConvStem(vision["width"], tuple(stem["channels"]))
        if model.visual.conv1.stride != vision["patch_size"]:
            raise ModelError(f"conv stem stride {model.visual.conv1.stride} must equal patch_size {vision['patch_size']}")
    return model


class ClipModel:
    """One interface over every CLIP in the lab: ``encode_image``, ``encode_text``, ``tokenize``,
    ``preprocess`` (PIL image -> tensor) and ``device``.

    ``encode_image`` takes preprocessed float images, or uint8 ``[B, 3, H, W]`` images (ToyWorld's
    native format), which it scales, resizes and normalises on the device in one batch.
    """

    def __init__(self, name: str, model: nn.Module, tokenizer, image_size: int, mean, std,
                 device: torch.device | str | None = None, config: dict | None = None):
        self.name, self.config, self.tokenizer, self.image_size = name, config, tokenizer, image_size
        self.device = torch.device(device) if device is not None else get_device()
        self.model = model.to(self.device).eval()
        self.mean = torch.tensor(mean).view(1, 3, 1, 1).to(self.device)
        self.std = torch.tensor(std).view(1, 3, 1, 1).to(self.device)
        self.preprocess = open_clip.image_transform(image_size, is_train=False, mean=mean, std=std)

    @property
    def embed_dim(self) -> int:
        return self.model.text_projection.shape[1]

    def tokenize(self, texts: str | list[str]) -> torch.Tensor:
        return self.tokenizer(texts)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``[B, 3, H, W]`` -> normalised float at the model's resolution; float passes through."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got shape {tuple(images.shape)}")
        images = images.to(self.device, non_blocking=True)
        if images.dtype != torch.uint8:
            if tuple(images.shape[-2:]) != (self.image_size, self.image_size):
                raise ValueError(f"{self.name} takes {self.image_size}x{self.image_size} float images, got "
                                 f"{tuple(images.shape[-2:])}; pass uint8 images (resized for you) or use .preprocess")
            return images
        x = images.float() / 255.0
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True, align_corners=False)
        return (x - self.mean) / self.std

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor, normalize: bool = True, batch_size: int = 256) -> torch.Tensor:
        feats = []
        for chunk in images.split(batch_size):
            with autocast(self.device):
                feats.append(self.model.encode_image(self.prepare(chunk)).float())
        out = torch.cat(feats) if feats else torch.empty(0, self.embed_dim, device=self.device)
        return F.normalize(out, dim=-1) if normalize else out

    @torch.no_grad()
    def encode_text(self, texts: str | list[str] | torch.Tensor, normalize: bool = True, batch_size: int = 256) -> torch.Tensor:
        tokens = texts if isinstance(texts, torch.Tensor) else self.tokenize(texts)
        feats = []
        for chunk in tokens.split(batch_size):
            with autocast(self.device):
                feats.append(self.model.encode_text(chunk.to(self.device)).float())
        out = torch.cat(feats)
        return F.normalize(out, dim=-1) if normalize else out


def save_local_dir(model: nn.Module, config: dict, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write a CLIP as a checkpoint in open_clip's local-dir layout (:data:`labkit.core.checkpoint.OPEN_CLIP`);
    ``metadata`` defaults to a record of this call."""
    metadata = metadata or {"command": invocation("labkit.clip.model.save_local_dir", path=str(path))}
    return save_checkpoint(path, model.state_dict(), config, metadata, layout=OPEN_CLIP)


def read_local_dir(path: str | os.PathLike) -> tuple[nn.Module, dict]:
    """Build the model a local dir describes and load its weights, or raise :class:`ModelError`."""
    state, config, _ = load_checkpoint(path, OPEN_CLIP, what="labkit/open_clip local dir")
    try:
        model = build_clip(config)
    except (KeyError, TypeError) as e:
        raise ModelError(f"unsupported config {Path(path) / OPEN_CLIP.config}: {e}") from e
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelError(f"weights in {Path(path) / OPEN_CLIP.weights} do not match its config: {e}") from e
    return model, config


def _load_local_dir(name: str, path: str, device) -> ClipModel:
    model, config = read_local_dir(path)
    tok_cfg = config.get("labkit", {}).get("tokenizer")
    context = config["model_cfg"]["text_cfg"]["context_length"]
    tokenizer = (WordTokenizer(tok_cfg["vocab"], context) if tok_cfg
                 else open_clip.get_tokenizer(f"local-dir:{path}"))
    pre = config.get("preprocess_cfg", {})
    mean = pre.get("mean", open_clip.OPENAI_DATASET_MEAN)
    std = pre.get("std", open_clip.OPENAI_DATASET_STD)
    clip = ClipModel(name, model, tokenizer, config["model_cfg"]["vision_cfg"]["image_size"], mean, std, device, config)
    clip.metadata = read_metadata(path, OPEN_CLIP)  # how it was trained: command, steps, metrics, curve
    return clip


def openclip_hub_files(arch: str, tag: str) -> tuple[str, list[str]]:
    """``(Hugging Face repository, weight file names in order of preference)`` of open_clip's ``arch``/``tag``
    (safetensors first); ``("", [])`` for weights that open_clip serves only from a URL.

    Raises :class:`ModelError` for an unknown pair.
    """
    cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not cfg:
        known = ", ".join(t for a, t in open_clip.list_pretrained() if a == arch) or "none (unknown architecture)"
        raise ModelError(f"open_clip has no pretrained tag {tag!r} for {arch!r}; tags for {arch}: {known}")
    hub = cfg.get("hf_hub", "")
    if not hub:
        return "", []
    from open_clip.pretrained import HF_WEIGHTS_NAME, _get_safe_alternatives

    repo, filename = os.path.split(hub)  # open_clip's 'org/model/file' or 'org/model/'
    filename = filename or HF_WEIGHTS_NAME
    return repo, [*_get_safe_alternatives(filename), filename]


def cached_openclip_weights(arch: str, tag: str) -> str:
    """Path of the cached weights of ``arch``/``tag``; never touches the network.

    Raises :class:`ModelError` for an unknown pair or weights that are not cached.
    """
    repo, candidates = openclip_hub_files(arch, tag)
    if repo:
        from huggingface_hub import try_to_load_from_cache

        for candidate in candidates:
            hit = try_to_load_from_cache(repo, candidate)
            if isinstance(hit, str):
                return hit
    url = open_clip.get_pretrained_cfg(arch, tag).get("url", "")
    if url:
        local = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
        if local.is_file():
            return str(local)
    raise ModelError(
        f"weights for openclip:{arch}/{tag} are not cached on this machine and the lab never downloads at run time. "
        f"On a machine with internet run `labkit fetch openclip:{arch}/{tag}` and copy the Hugging Face cache "
        "(~/.cache/huggingface) here, or set HF_HOME to it.")


def _load_openclip(name: str, spec: str, device) -> ClipModel:
    arch, _, tag = spec.partition("/")
    if not arch or not tag:
        raise ModelError(f"bad model name {name!r}: expected openclip:<arch>/<pretrained-tag>")
    if arch not in open_clip.list_models():
        raise ModelError(f"unknown open_clip architecture {arch!r}; see open_clip.list_models()")
    weights = cached_openclip_weights(arch, tag)
    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=weights)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    mean = getattr(model.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
    std = getattr(model.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
    return ClipModel(name, model, open_clip.get_tokenizer(arch), size, mean, std, device)


def load_clip(name: str = "toy", device: torch.device | str | None = None) -> ClipModel:
    """Load a CLIP by name (see the module docstring for the accepted forms)."""
    if name == "toy":
        return _load_local_dir(name, str(asset_dir("toy_clip")), device)
    if name.startswith("local-dir:"):
        return _load_local_dir(name, name[len("local-dir:"):], device)
    if name.startswith("openclip:"):
        return _load_openclip(name, name[len("openclip:"):], device)
    raise ModelError(f"unknown model name {name!r}; accepted: {ACCEPTED_NAMES}")
