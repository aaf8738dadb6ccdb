"""``labkit``: every command of the lab, gathered from the method packages. Parsing only.

Each package that has commands lists them in its ``commands.py`` as :class:`Command` entries; each
entry is one library function, and its options are that function's parameters, with the function's
defaults. So ``labkit eval clip --n 200`` is exactly ``labkit.clip.commands.eval_clip(n=200)`` and a
notebook or script reproduces any command in one line. A new method package joins the CLI by adding a
``commands.py`` and its name to ``labkit.METHODS``.

Every ``train``, ``eval`` and ``bench`` command takes ``--json`` and then prints one JSON object on its
last line.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import json
import sys

from labkit.core.command import Command

VERBS = {"train": "train a model", "eval": "evaluate a model", "bench": "measure speed"}
PACKAGES = ("data", "clip")  # the shared foundation's commands; the methods follow in labkit.METHODS order


def command_packages() -> list[str]:
    import labkit

    return [*PACKAGES, *labkit.METHODS]


def all_commands() -> dict[str, list[Command]]:
    """``{package: [Command, ...]}`` for every package with a ``commands.py``, plus the web demo's."""
    found = {}
    for package in command_packages():
        name = f"labkit.{package}.commands"
        if importlib.util.find_spec(name) is not None:
            found[package] = importlib.import_module(name).COMMANDS
    found["fetch"] = importlib.import_module("labkit.fetch").COMMANDS
    found["app"] = APP_COMMANDS
    return found


def _add_command(parser: argparse.ArgumentParser, command: Command) -> None:
    for name, settings in command.options.items():
        default = command.default(name)
        flag = "--" + name.replace("_", "-")
        settings = dict(settings)
        if name in command.positional:
            parser.add_argument(name, **settings)
        elif default is inspect.Parameter.empty:
            parser.add_argument(flag, required=True, **settings)
        elif isinstance(default, bool):
            parser.add_argument(flag, action="store_true", default=default, **settings)
        else:
            if default is not None and "type" not in settings and "choices" not in settings:
                settings["type"] = type(default)
            if default is not None:
                settings["help"] = f"{settings.get('help', '')} (default: {default})".strip()
            parser.add_argument(flag, default=default, **settings)
    if command.emits_json:
        parser.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    parser.set_defaults(command=command)


def _epilog(commands: dict[str, list[Command]]) -> str:
    lines = ["commands by package:"]
    for package, entries in commands.items():
        names = ", ".join(" ".join(filter(None, (c.verb, c.name))) for c in entries)
        lines.append(f"  {package:<13} {names}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    commands = all_commands()
    parser = argparse.ArgumentParser(prog="labkit", description=__doc__.split("\n\n")[0], epilog=_epilog(commands),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    top = parser.add_subparsers(dest="verb", required=True)
    verbs = {verb: top.add_parser(verb, help=text).add_subparsers(dest="what", required=True)
             for verb, text in VERBS.items()}
    for entries in commands.values():
        for command in entries:
            group = verbs[command.verb] if command.verb else top
            _add_command(group.add_parser(command.name, help=command.help), command)
    top.add_parser("openclip-train", add_help=False,
                   help="open_clip_train with labkit masking: labkit openclip-train --masking M --mask-ratio R -- ...")
    return parser


def command_arguments(args: argparse.Namespace) -> dict:
    """The keyword arguments ``args`` gives its command's function."""
    command = args.command
    kwargs = {**command.fixed, **{name: getattr(args, name) for name in command.options}}
    if "progress" in inspect.signature(command.function).parameters:
        kwargs["progress"] = not getattr(args, "json", False)
    return kwargs


def _emit(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>28}: {value}")


def main(argv: list[str] | None = None) -> int:
    from labkit.core.checkpoint import set_cli_command

    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["openclip-train"]:  # its own parser; everything after -- goes to open_clip_train
            from labkit.masking.openclip_train import main as openclip_main

            return openclip_main(argv[1:])
        args = build_parser().parse_args(argv)
        set_cli_command(argv)
        result = args.command.function(**command_arguments(args))
    except ValueError as e:  # user errors: a clear message, no traceback
        print(f"labkit: error: {e}", file=sys.stderr)
        return 2
    if result:
        _emit(result, getattr(args, "json", False))
    return 0


# ---------------------------------------------------------------- the web demo (app/ sits above the library)

def app(host: str = "127.0.0.1", port: int = 7860, model: str = "toy") -> dict:
    """Serve the classroom demo (``app.main.launch``)."""
    from app.main import launch

    launch(host=host, port=port, model=model)
    return {}


def bench_app(model: str = "toy", n_requests: int = 200, n_clients: int = 20) -> dict:
    """Concurrent classify requests against a locally launched demo (``app.bench.bench_app``)."""
    from app.bench import bench_app as run
    from labkit.core.train import shorten

    return run(n_requests=shorten(n_requests, 40), n_clients=n_clients, model=model)


APP_COMMANDS = [
    Command(None, "app", app, "the classroom demo (every method, one tab each)",
            {"host": {"help": "address to listen on"}, "port": {"help": "port"},
             "model": {"help": "CLIP of the Tip-Adapter tab"}}, emits_json=False),
    Command("bench", "app", bench_app, "concurrent classify requests against a locally launched web demo",
            {"model": {}, "n_requests": {"help": "requests in all"},
             "n_clients": {"help": "simulated students, each with its own session and cache"}}),
]


if __name__ == "__main__":
    sys.exit(main())
