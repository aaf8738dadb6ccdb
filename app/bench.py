"""``labkit bench app``: a class of students hitting the Tip-Adapter demo at once.

The app runs in its own process (``python -m app.main``) on 127.0.0.1, exactly as ``labkit app``
serves it. ``n_clients`` gradio_client sessions (one per simulated student) each build a cache from a
built-in task, then all ``n_requests`` classify requests are submitted at once (each uploads its query
image) and their latencies are measured from submission to result. A request counts as an error if
it raises or if the app answers with a message instead of a prediction.
"""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_until_up(url: str, proc: subprocess.Popen | None = None, timeout: float = 180.0, log_path=None) -> None:
    """Poll ``url`` until it answers; raise RuntimeError (with the server log's tail) if it dies or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = Path(log_path).read_text()[-2000:] if log_path else ""
            raise RuntimeError(f"the app exited with code {proc.returncode} before serving:\n{tail}")
        try:
            with urllib.request.urlopen(url + "config", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"the app at {url} did not come up within {timeout:.0f} s")


def _percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def bench_app(n_requests: int = 200, n_clients: int = 20, model: str = "toy", task: str = "ToyWorld shapes",
              shots: int = 4, alpha: float = 5.0, beta: float = 5.0, host: str = "127.0.0.1",
              timeout_s: float = 300.0) -> dict:
    """Launch the app, fire ``n_requests`` concurrent classify requests, report latency and errors."""
    from gradio_client import Client, handle_file
    from PIL import Image

    from labkit.data import toyworld as tw

    from .main import CONCURRENCY, MAX_BATCH, QUEUE_SIZE, SOURCES

    if n_requests < 1 or n_clients < 1:
        raise ValueError(f"n_requests and n_clients must be positive, got {n_requests}, {n_clients}")
    port = free_port(host)
    url = f"http://{host}:{port}/"
    tmp = tempfile.TemporaryDirectory(prefix="labkit-bench-app-")
    log_path = Path(tmp.name) / "server.log"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONPATH": os.pathsep.join(
        [str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "app.main", "--host", host, "--port", str(port),
                                 "--model", model], cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        t_start = time.perf_counter()
        wait_until_up(url, proc, log_path=log_path)
        startup_s = time.perf_counter() - t_start
        data = tw.TaskDataset("shape", "test", seed=3, size=8)
        queries = []
        for i in range(len(data)):
            path = Path(tmp.name) / f"query_{i}.png"
            Image.fromarray(data[i][0].permute(1, 2, 0).numpy()).save(path)
            queries.append(str(path))
        clients = [Client(url, verbose=False, download_files=False, analytics_enabled=False) for _ in range(n_clients)]
        build_s = []
        for c in clients:  # every student builds a cache (its own session state)
            t0 = time.perf_counter()
            status = c.predict(model, SOURCES[0], task, shots, *[""] * 6, *[None] * 6, api_name="/build_cache")[0]
            build_s.append(time.perf_counter() - t0)
            if "Cache built" not in status:
                raise RuntimeError(f"building a cache failed: {status}")
        clients[0].predict(handle_file(queries[0]), alpha, beta, api_name="/classify")  # warm-up

        latencies, failures, lock, done = [], [], threading.Lock(), threading.Event()

        def finished(job, t0):
            try:
                out = job.result()
                ok = isinstance(out, (list, tuple)) and str(out[5]).startswith("Prediction")
                err = None if ok else f"app message: {out[5] if isinstance(out, (list, tuple)) else out}"
            except Exception as e:  # noqa: BLE001 - every failure is counted and reported
                err = f"{type(e).__name__}: {e}"
            with lock:
                latencies.append(time.perf_counter() - t0)
                if err:
                    failures.append(err)
                if len(latencies) == n_requests:
                    done.set()

        t_burst = time.perf_counter()
        for i in range(n_requests):
            t0 = time.perf_counter()
            job = clients[i % n_clients].submit(handle_file(queries[i % len(queries)]), alpha, beta,
                                                api_name="/classify")
            job.add_done_callback(lambda j, t0=t0: finished(j, t0))
        if not done.wait(timeout_s):
            failures.append(f"timed out: {n_requests - len(latencies)} requests unanswered after {timeout_s:.0f} s")
        wall = time.perf_counter() - t_burst
        for c in clients:
            c.close()
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        tmp.cleanup()
    return {"model": model, "n_requests": n_requests, "n_clients": n_clients, "errors": len(failures),
            "error_examples": sorted(set(failures))[:3],
            "p50_latency_s": round(statistics.median(latencies), 3) if latencies else None,
            "p95_latency_s": round(_percentile(latencies, 0.95), 3) if latencies else None,
            "max_latency_s": round(max(latencies), 3) if latencies else None,
            "throughput_rps": round(len(latencies) / wall, 1), "burst_wall_s": round(wall, 2),
            "build_cache_median_s": round(statistics.median(build_s), 3), "startup_s": round(startup_s, 1),
            "server": {"queue_max_size": QUEUE_SIZE, "concurrency_limit": CONCURRENCY, "max_batch_size": MAX_BATCH}}
