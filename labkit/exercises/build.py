"""Write the exercise notebooks and their solutions from one spec per method (``labkit/<method>/exercise_notebooks.py``).

``python -m labkit.exercises.build [--out notebooks/exercises]`` writes ``<out>/<name>.ipynb`` (function
stubs that raise ``NotImplementedError``) and ``<out>/solutions/<name>.ipynb`` (the same notebook with the
solutions filled in). Output is deterministic (fixed cell ids, no outputs), so a test can rebuild both
into a temporary folder and require the committed files to be identical: they cannot drift apart.

Per task the notebook holds a markdown explanation, the function cell, a check cell
(``ok_<name> = checks.check_<name>(<name>)``) and a plot cell that runs only once the check passes.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import textwrap
from dataclasses import dataclass
from pathlib import Path

import nbformat

HOW_IT_WORKS = (
    "**How this works.** Each task explains one step of the method and gives you a function to write: replace "
    "`raise NotImplementedError` with your code, run the cell, then run the check below it. The check compares "
    "your function with labkit's reference on several cases (edge cases included) and prints **✅ PASS**, "
    "**❌ FAIL: what failed — hint: ...**, or **⏳ TODO** (not attempted yet). Once a check passes, the plot "
    "under it uses your function. The notebook runs top to bottom before you start, so you can work in any order."
)
STUB_BODY = "    # your code here\n    raise NotImplementedError"
KERNELSPEC = {"display_name": "Python 3", "language": "python", "name": "python3"}


@dataclass(frozen=True)
class Task:
    """One exercise: the student writes ``name``; ``signature`` is its ``def`` line and docstring."""

    name: str
    title: str
    explanation: str
    signature: str
    solution: str
    plot: str

    def function_cell(self, solved: bool) -> str:
        body = textwrap.indent(_clean(self.solution), "    ") if solved else STUB_BODY
        return f"{_clean(self.signature)}\n{body}"

    def check_cell(self) -> str:
        return f"ok_{self.name} = checks.check_{self.name}({self.name})"

    def plot_cell(self) -> str:
        plot = textwrap.indent(_clean(self.plot), "    ")
        return f"if ok_{self.name}:\n{plot}\nelse:\n    print(\"The plot appears once {self.name} passes its check.\")"


@dataclass(frozen=True)
class ExerciseNotebook:
    """A method's exercise notebook: ``imports`` (all the function cells need), ``setup`` (data for the plots)."""

    name: str
    source: str  # the spec module's __name__
    title: str
    intro: str
    imports: str
    setup: str
    tasks: tuple[Task, ...]
    outro: str

    def spec_path(self) -> str:
        return self.source.replace(".", "/") + ".py"


def all_specs() -> list[ExerciseNotebook]:
    """Every method's exercise notebooks, in the order of ``labkit.METHODS``: the ``NOTEBOOKS`` of each
    ``labkit/<method>/exercise_notebooks.py`` (a method without exercises has no such module)."""
    import labkit

    specs = []
    for method in labkit.METHODS:
        name = f"labkit.{method}.exercise_notebooks"
        if importlib.util.find_spec(name) is not None:
            specs.extend(importlib.import_module(name).NOTEBOOKS)
    return specs


def _clean(text: str) -> str:
    return textwrap.dedent(text).strip("\n")


def build_notebook(spec: ExerciseNotebook, solved: bool) -> nbformat.NotebookNode:
    """The student (``solved=False``) or solution notebook of ``spec``; cell ids are fixed for reproducible files."""
    v4 = nbformat.v4
    banner = (f"*{'Solutions (instructor copy). ' if solved else ''}Generated from `{spec.spec_path()}` by "
              "`python -m labkit.exercises.build`: edit the spec, not this file.*")
    title = f"# {'Solutions · ' if solved else ''}{spec.title}"
    cells = [v4.new_markdown_cell(f"{title}\n\n{_clean(spec.intro)}\n\n{HOW_IT_WORKS}\n\n{banner}"),
             v4.new_code_cell(_clean(spec.imports)), v4.new_code_cell(_clean(spec.setup))]
    for number, task in enumerate(spec.tasks, 1):
        cells += [v4.new_markdown_cell(f"## {number} · {task.title}\n\n{_clean(task.explanation)}"),
                  v4.new_code_cell(task.function_cell(solved)), v4.new_code_cell(task.check_cell()),
                  v4.new_code_cell(task.plot_cell())]
    cells.append(v4.new_markdown_cell(_clean(spec.outro)))
    for index, cell in enumerate(cells):
        cell.id = f"{spec.name.replace('_', '-')}-{index:02d}"
    nb = v4.new_notebook(cells=cells, metadata={"kernelspec": KERNELSPEC, "language_info": {"name": "python"}})
    nbformat.validate(nb)
    return nb


def notebook_text(spec: ExerciseNotebook, solved: bool) -> str:
    return nbformat.writes(build_notebook(spec, solved)) + "\n"


def build_all(out: str | Path) -> list[Path]:
    """Write every student notebook into ``out`` and every solution into ``out/solutions``; return the paths."""
    out = Path(out)
    written = []
    for spec in all_specs():
        for folder, solved in ((out, False), (out / "solutions", True)):
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{spec.name}.ipynb"
            path.write_text(notebook_text(spec, solved), encoding="utf-8")
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="notebooks/exercises", help="folder of the student notebooks")
    args = parser.parse_args(argv)
    for path in build_all(args.out):
        print(path)


if __name__ == "__main__":
    main()
