"""ToyWorld: a deterministic, index-addressable world of scenes, captions and questions.

Every scene is a pure function of ``(split, seed, index)``: a background (plain, or a
texture in the ``shifted`` split) and 1-3 non-overlapping objects, each a shape x colour
x size at one cell of a 3x3 grid. Because each image comes with its ground truth, every
evaluation in the lab is exact (attribute accuracy, VQA accuracy, retrieval recall).

Splits
    train, val, test  base shapes on plain backgrounds (different scene streams)
    novel             shapes never named in pretraining captions (hexagon, ring, arrow)
    shifted           base shapes on textured backgrounds (a domain shift)
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageDraw

BASE_SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star")
NOVEL_SHAPES = ("hexagon", "ring", "arrow")
COLORS = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (235, 215, 25),
    "green": (35, 165, 55),
    "cyan": (40, 205, 215),
    "blue": (35, 65, 220),
    "purple": (135, 45, 195),
    "pink": (245, 135, 195),
}


SIZES = {"small": 6, "large": 9}  # radius in pixels at 64 px (objects 12 and 18 px wide)
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
POSITIONS = tuple(
    "center" if (r, c) == ("middle", "center")
    else r if c == "center" else c if r == "middle" else f"{r} {c}"
    for r in ROWS for c in COLS
)  # top left, top, top right, left, center, right, bottom left, bottom, bottom right


COUNT_WORDS = ("one", "two", "three")
SPLITS = {"train": 0, "val": 1, "test": 2, "novel": 3, "shifted": 4}
IMAGE_SIZE = 64
_SYNONYMS = {
    "large": ("large", "big"),
    "small": ("small", "little", "tiny"),
    "top": ("top", "upper"),
    "bottom": ("bottom", "lower"),
    "center": ("center", "middle"),
}


_SCENE_TEMPLATES = ("{}", "a picture of {}", "there is {}", "an image of {}", "{n}: {}", "a scene with {}")
_POSITION_TEMPLATES = ("at the {}", "in the {}", "on the {}")


@dataclass(frozen=True)
class ToyObject:
    shape: str
    color: str
    size: str
    position: str  # one of POSITIONS
    cx: float
    cy: float


@dataclass(frozen=True)
class Scene:
    objects: tuple[ToyObject, ...]
    background: tuple[int, int, int]
    texture: str  # "plain", "stripes", "checker" or "blobs"
    texture_seed: int

    def render(self, image_size: int = IMAGE_SIZE) -> np.ndarray:
        """The scene as an ``(H, W, 3)`` uint8 array."""
        return render_scene(self, image_size)

    def caption(self, rng: np.random.Generator | None = None, drop_prob: float = 0.0) -> str:
        """A caption; ``rng`` picks template and synonyms, ``drop_prob`` drops size/colour/position words."""
        return describe(self, rng, drop_prob)

    def questions(self) -> list[tuple[str, str]]:
        return questions_for(self)


def _word(word: str, rng: np.random.Generator | None) -> str:
    choices = _SYNONYMS.get(word, (word,))
    return choices[0] if rng is None else choices[rng.integers(len(choices))]


def _position_phrase(position: str, rng: np.random.Generator | None) -> str:
    words = " ".join(_word(w, rng) for w in position.split())
    template = _POSITION_TEMPLATES[0] if rng is None else _POSITION_TEMPLATES[rng.integers(3)]
    return template.format(words)


def describe_object(obj: ToyObject, rng: np.random.Generator | None = None, drop_prob: float = 0.0) -> str:
    keep = (lambda: True) if rng is None else (lambda: rng.random() >= drop_prob)
    words = ["a"]
    if keep():
        words.append(_word(obj.size, rng))
    if keep():
        words.append(obj.color)
    words.append(obj.shape)
    if keep():
        words.append(_position_phrase(obj.position, rng))
    return " ".join(words)


def describe(scene: Scene, rng: np.random.Generator | None = None, drop_prob: float = 0.0) -> str:
    """Caption a scene. Without ``rng`` the caption is canonical (objects in reading order)."""
    objects = list(scene.objects)
    if rng is not None:
        objects = [objects[i] for i in rng.permutation(len(objects))]
    phrases = [describe_object(o, rng, drop_prob) for o in objects]
    body = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    template = _SCENE_TEMPLATES[0] if rng is None else _SCENE_TEMPLATES[rng.integers(len(_SCENE_TEMPLATES))]
    n = len(objects)
    return template.format(body, n=f"{COUNT_WORDS[n - 1]} object{'s' if n > 1 else ''}")


def questions_for(scene: Scene) -> list[tuple[str, str]]:
    """Question/answer pairs that have exactly one correct answer in this scene."""
    qa = [("how many objects are there?", COUNT_WORDS[len(scene.objects) - 1])]
    shapes = [o.shape for o in scene.objects]
    colors = [o.color for o in scene.objects]
    for o in scene.objects:
        if shapes.count(o.shape) == 1:
            qa.append((f"what color is the {o.shape}?", o.color))
            qa.append((f"where is the {o.shape}?", o.position))
            qa.append((f"what size is the {o.shape}?", o.size))
        if colors.count(o.color) == 1:
            qa.append((f"what shape is the {o.color} object?", o.shape))
    return qa


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    def ring(n: int, radius: np.ndarray, phase: float) -> list[tuple[float, float]]:
        angles = phase + 2 * np.pi * np.arange(n) / n
        return list(zip(cx + radius * np.cos(angles), cy + radius * np.sin(angles)))

    if shape == "square":
        s = 0.82 * r
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return ring(3, np.full(3, r * 1.05), -np.pi / 2)
    if shape == "diamond":
        return ring(4, np.full(4, r), -np.pi / 2)
    if shape == "star":
        return ring(10, np.where(np.arange(10) % 2 == 0, r * 1.1, r * 0.45), -np.pi / 2)
    if shape == "hexagon":
        return ring(6, np.full(6, r), 0.0)
    if shape == "cross":
        a, t = r, 0.36 * r
        pts = [(t, a), (t, t), (a, t), (a, -t), (t, -t), (t, -a), (-t, -a), (-t, -t), (-a, -t), (-a, t), (-t, t), (-t, a)]
        return [(cx + x, cy + y) for x, y in pts]
    if shape == "arrow":
        t, h = 0.3 * r, 0.75 * r
        pts = [(-r, -t), (0.1 * r, -t), (0.1 * r, -h), (r, 0), (0.1 * r, h), (0.1 * r, t), (-r, t)]
        return [(cx + x, cy + y) for x, y in pts]
    raise ValueError(f"unknown shape {shape!r}")


def _texture(kind: str, seed: int, base: tuple[int, int, int], size: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    other = np.clip(np.array(base) + rng.integers(-70, 71, 3), 0, 255)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    if kind == "stripes":
        angle, period = rng.uniform(0, np.pi), rng.uniform(4, 10)
        t = (np.cos(angle) * xx + np.sin(angle) * yy) / period
        w = (np.floor(t) % 2)[..., None]
    elif kind == "checker":
        cell = rng.integers(4, 9)
        w = ((xx // cell + yy // cell) % 2)[..., None]
    else:  # blobs: smooth noise upsampled from a coarse grid
        coarse = rng.random((6, 6)).astype(np.float32)
        w = np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((size, size), Image.BILINEAR))
        w = (w / 255.0)[..., None]
    return (np.array(base) * (1 - w) + other * w).astype(np.uint8)


def render_scene(scene: Scene, image_size: int = IMAGE_SIZE) -> np.ndarray:
    scale = image_size / IMAGE_SIZE
    if scene.texture == "plain":
        img = Image.new("RGB", (image_size, image_size), scene.background)
    else:
        img = Image.fromarray(_texture(scene.texture, scene.texture_seed, scene.background, image_size))
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        cx, cy, r = o.cx * scale, o.cy * scale, SIZES[o.size] * scale
        fill = COLORS[o.color]
        if o.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif o.shape == "ring":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=fill, width=max(2, round(0.4 * r)))
        else:
            draw.polygon(_polygon(o.shape, cx, cy, r), fill=fill)
    return np.asarray(img)


def check_varied_attribute(vary: str) -> None:
    """What a hard-negative group may vary: ``"shape"`` or ``"color"``."""
    if vary not in ("shape", "color"):
        raise ValueError(f"vary must be 'shape' or 'color', got {vary!r}")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown ToyWorld split {split!r}; accepted: {', '.join(SPLITS)}")


def compose_scene(objects, background: tuple[int, int, int] = (120, 120, 120)) -> Scene:
    """A scene from chosen ``(shape, color, size, position)`` objects, each centred in its grid cell.

    Raises ValueError naming what is unknown, or when two objects share a position.
    """
    if not 1 <= len(objects) <= len(POSITIONS):
        raise ValueError(f"a scene holds 1 to {len(POSITIONS)} objects, got {len(objects)}")
    cell, built = IMAGE_SIZE / 3, []
    for shape, color, size, position in objects:
        for value, accepted, what in ((shape, BASE_SHAPES + NOVEL_SHAPES, "shape"), (color, tuple(COLORS), "colour"),
                                      (size, tuple(SIZES), "size"), (position, POSITIONS, "position")):
            if value not in accepted:
                raise ValueError(f"unknown {what} {value!r}; accepted: {', '.join(accepted)}")
        row, col = divmod(POSITIONS.index(position), 3)
        built.append(ToyObject(shape, color, size, position, cx=cell * (col + 0.5), cy=cell * (row + 0.5)))
    positions = [o.position for o in built]
    if len(set(positions)) != len(positions):
        raise ValueError("two objects share a position; give each object its own place")
    return Scene(tuple(sorted(built, key=lambda o: POSITIONS.index(o.position))), background, "plain", 0)


def sample_scene(rng: np.random.Generator, split: str, n_objects: int) -> Scene:
    """Draw one scene of ``split`` with ``n_objects`` objects."""
    pool = NOVEL_SHAPES if split == "novel" else BASE_SHAPES
    cells = rng.choice(9, size=n_objects, replace=False)
    cell = IMAGE_SIZE / 3
    objects = []
    for c in sorted(cells):
        row, col = divmod(int(c), 3)
        objects.append(ToyObject(
            shape=pool[rng.integers(len(pool))],
            color=list(COLORS)[rng.integers(len(COLORS))],
            size=list(SIZES)[rng.integers(len(SIZES))],
            position=POSITIONS[int(c)],
            cx=float(cell * (col + 0.5) + rng.uniform(-1, 1)),
            cy=float(cell * (row + 0.5) + rng.uniform(-1, 1)),
        ))
    gray = int(rng.integers(60, 180))
    background = tuple(int(np.clip(gray + d, 0, 255)) for d in rng.integers(-12, 13, 3))
    texture = ("stripes", "checker", "blobs")[rng.integers(3)] if split == "shifted" else "plain"
    return Scene(tuple(objects), background, texture, int(rng.integers(2**31)))


class ToyWorld(torch.utils.data.Dataset):
    """``ToyWorld(split, seed, size)[i]`` -> ``{"image": uint8 [3, H, W], "caption": str, "scene": Scene}``.

    Deterministic in ``(split, seed, i)``. ``caption_drop`` drops size/colour/position words
    (a pretraining augmentation: attribute words dropped with this probability).
    """

    def __init__(self, split: str = "train", seed: int = 0, size: int = 10_000, objects: tuple[int, int] = (1, 3),
                 image_size: int = IMAGE_SIZE, caption_drop: float = 0.0, canonical_captions: bool = False):
        _check_split(split)
        lo, hi = objects
        if not 1 <= lo <= hi <= 3:
            raise ValueError(f"objects must satisfy 1 <= min <= max <= 3, got {objects}")
        if image_size < 16:
            raise ValueError(f"image_size must be at least 16 pixels, got {image_size}")
        self.split, self.seed, self.size, self.objects = split, seed, size, (lo, hi)
        self.image_size, self.caption_drop, self.canonical = image_size, caption_drop, canonical_captions

    def __len__(self) -> int:
        return self.size

    def rng(self, index: int, stream: int = 0) -> np.random.Generator:
        return np.random.default_rng([SPLITS[self.split], self.seed, index, stream])

    def scene(self, index: int) -> Scene:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for a ToyWorld of size {self.size}")
        rng = self.rng(index)
        n = int(rng.integers(self.objects[0], self.objects[1] + 1))
        return sample_scene(rng, self.split, n)

    def caption(self, index: int, scene: Scene | None = None) -> str:
        scene = scene or self.scene(index)
        return scene.caption() if self.canonical else scene.caption(self.rng(index, 1), self.caption_drop)

    def __getitem__(self, index: int) -> dict:
        scene = self.scene(index)
        image = torch.from_numpy(scene.render(self.image_size).copy()).permute(2, 0, 1)
        return {"image": image, "caption": self.caption(index, scene), "scene": scene}

    def hard_negative_group(self, index: int, n: int = 4, vary: str = "shape") -> list[Scene]:
        """``n`` scenes identical in everything (colours, sizes, positions, background) but ``vary``.

        ``vary="shape"``: in random batches captions can be told apart by colour, position and size
        alone; such groups make the contrastive loss need the shape words (docs/design.md, measured facts).
        ``vary="color"``: the same for colour words (colours drawn afresh per object, so the set of
        colours usually changes too: these groups need the colour words, not yet their binding).
        """
        check_varied_attribute(vary)
        base = self.scene(index)
        rng = self.rng(index, 2)
        pool = (NOVEL_SHAPES if self.split == "novel" else BASE_SHAPES) if vary == "shape" else tuple(COLORS)
        group = [base]
        seen = {tuple(getattr(o, vary) for o in base.objects)}
        while len(group) < n:
            values = tuple(pool[i] for i in rng.integers(len(pool), size=len(base.objects)))
            if values in seen:
                continue
            seen.add(values)
            objs = tuple(replace(o, **{vary: v}) for v, o in zip(values, base.objects))
            group.append(Scene(objs, base.background, base.texture, base.texture_seed))
        return group


@dataclass(frozen=True)
class ClassTask:
    """A classification task over ToyWorld scenes, with zero-shot prompt templates."""

    name: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    objects: tuple[int, int]
    label: Callable[[Scene], int]


def class_task(name: str, split: str = "test") -> ClassTask:
    """The ``shape``, ``color``, ``count`` or ``position`` task (shape classes follow the split)."""
    _check_split(split)
    shapes = NOVEL_SHAPES if split == "novel" else BASE_SHAPES
    if name == "shape":
        templates = ("a {}", "a picture of a {}", "there is a {}", "a small {}", "a large {}")
        return ClassTask(name, shapes, templates, (1, 1), lambda s: shapes.index(s.objects[0].shape))
    if name == "color":
        templates = tuple(f"a {{}} {shape}" for shape in BASE_SHAPES)  # an ensemble over shapes
        return ClassTask(name, tuple(COLORS), templates, (1, 1), lambda s: list(COLORS).index(s.objects[0].color))
    if name == "position":
        templates = tuple(f"a {shape} at the {{}}" for shape in BASE_SHAPES)
        return ClassTask(name, POSITIONS, templates, (1, 1), lambda s: POSITIONS.index(s.objects[0].position))
    if name == "count":
        names = ("one object", "two objects", "three objects")
        return ClassTask(name, names, ("{}", "a picture of {}", "{}: a shape"), (1, 3), lambda s: len(s.objects) - 1)
    raise ValueError(f"unknown ToyWorld task {name!r}; accepted: shape, color, count, position")


class TaskDataset(torch.utils.data.Dataset):
    """``(image uint8 [3, H, W], label)`` pairs of a :class:`ClassTask` on one split."""

    def __init__(self, task: str, split: str = "test", seed: int = 0, size: int = 1000, image_size: int = IMAGE_SIZE):
        self.task = class_task(task, split)
        self.world = ToyWorld(split, seed, size, self.task.objects, image_size)

    def __len__(self) -> int:
        return len(self.world)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        scene = self.world.scene(index)
        image = torch.from_numpy(scene.render(self.world.image_size).copy()).permute(2, 0, 1)
        return image, self.task.label(scene)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All images ``[N, 3, H, W]`` uint8 and labels ``[N]``."""
        images, labels = zip(*(self[i] for i in range(len(self))))
        return torch.stack(images), torch.tensor(labels)
