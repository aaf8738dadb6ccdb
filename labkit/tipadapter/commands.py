"""``labkit eval tip``: zero-shot vs Tip-Adapter vs Tip-Adapter-F vs a linear probe at 1-16 shots."""

from __future__ import annotations

from labkit.clip.model import load_clip
from labkit.core.command import Command
from labkit.core.train import shorten
from labkit.tipadapter.eval import EVAL_TASKS, evaluate_tip


def eval_tip(model: str = "toy", tasks: str = "", shots: str = "1,2,4,8,16", n_val: int = 1000, n_test: int = 1000,
             views: int = 10, epochs: int = 20, repeats: int = 3, progress: bool = True) -> dict:
    """:func:`labkit.tipadapter.eval.evaluate_tip` for ``model`` on comma-separated ``tasks`` (default: all) and
    ``shots``. In fast mode: the same tasks and shot counts, fewer images, views, epochs and draws."""
    task_list = tuple(t.strip() for t in tasks.split(",") if t.strip()) or EVAL_TASKS
    shot_list = tuple(int(s) for s in shots.split(","))
    return evaluate_tip(load_clip(model), task_list, shot_list, shorten(n_val, 60), shorten(n_test, 100), shorten(views, 2),
                        shorten(epochs, 2), shorten(repeats, 1), progress=progress)


COMMANDS = [
    Command("eval", "tip", eval_tip, "zero-shot vs Tip-Adapter(-F) vs linear probe at 1-16 shots", {
        "model": {"help": "toy, local-dir:<path> or openclip:<arch>/<tag>"},
        "tasks": {"help": "comma-separated subset of shape,color,novel,shifted,mnist (default: all)"},
        "shots": {}, "n_val": {"help": "validation images per task (alpha/beta search)"},
        "n_test": {"help": "test images per task"}, "views": {"help": "augmented views averaged per support image"},
        "epochs": {"help": "Tip-Adapter-F epochs"}, "repeats": {"help": "support draws averaged per shot count"}}),
]
