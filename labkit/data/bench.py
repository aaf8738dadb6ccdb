"""``labkit bench toyworld``: how fast ToyWorld renders scenes, timed inside one process, warm-up first,
median of repeats.
"""

from __future__ import annotations

import statistics
import time

from labkit.data import toyworld as tw


def bench_toyworld(n: int = 3000, repeats: int = 3, consumed_per_s: float = 300.0) -> dict:
    """Scenes rendered (1-3 objects, 64 px, scene + caption) per second in one process.

    ``consumed_per_s`` is the toy CLIP's training throughput on 2 CPU cores (images/s), so the
    ratio says how far rendering outpaces training.
    """
    world = tw.ToyWorld("train", seed=0, size=n * (repeats + 1), caption_drop=0.2)
    for i in range(min(n, 200)):  # warm-up
        world[i]
    rates = []
    for r in range(repeats):
        start = time.perf_counter()
        for i in range(n * (r + 1), n * (r + 2)):
            world[i]
        rates.append(n / (time.perf_counter() - start))
    textured = tw.ToyWorld("shifted", seed=0, size=n)
    start = time.perf_counter()
    for i in range(n):
        textured[i]
    rate = statistics.median(rates)
    return {"images_per_s": round(rate, 1), "shifted_images_per_s": round(n / (time.perf_counter() - start), 1),
            "ms_per_image": round(1000 / rate, 4), "training_images_per_s": consumed_per_s,
            "times_faster_than_training": round(rate / consumed_per_s, 1)}
