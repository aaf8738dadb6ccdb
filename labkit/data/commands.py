"""``labkit bench toyworld``: how fast ToyWorld renders scenes."""

from __future__ import annotations

from labkit.core.command import Command
from labkit.data.bench import bench_toyworld

COMMANDS = [
    Command("bench", "toyworld", bench_toyworld, "scene rendering throughput", {"n": {"help": "scenes per repeat"}}),
]
