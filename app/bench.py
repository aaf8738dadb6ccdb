"""``labkit bench app``: a class of students hitting the demo's Tip-Adapter tab at once.

The app runs in its own process (``python -m app.main``) on 127.0.0.1, exactly as ``labkit app`` serves
it; the load generator (:mod:`app.loadgen`, light simulated browser sessions) runs in this process on
the same machine. ``n_clients`` students each build a cache from a built-in task (their own session
state), then all ``n_requests`` classify requests are submitted at once, each uploading its query
image, and their latencies are measured from submission (upload included) to result. A request counts
as an error if it fails or if the app answers with a message instead of a prediction. Two more
measurements show what batching buys: ``BATCH_PROBE`` requests one after another (each waits for the
previous) versus the same number at once (medians of ``PROBE_REPEATS``). The server's and the load
generator's CPU time per request during the main burst say where the machine's time went.
"""

from __future__ import annotations

import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BATCH_PROBE = 32
PROBE_REPEATS = 3


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


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of process ``pid`` (Linux ``/proc``; None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def server_stack() -> dict:
    """The HTTP parser and event loop uvicorn picks for the served app (its "auto" choice, same interpreter)."""
    from uvicorn.loops.auto import auto_loop_factory
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    return {"http": AutoHTTPProtocol.__name__, "event_loop": auto_loop_factory().__module__.split(".")[0]}


def _percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def _query_images(directory: Path) -> list[str]:
    from PIL import Image

    from labkit.tipadapter.eval import task_data

    images = task_data("novel", "test", 8)[0]
    paths = []
    for i, img in enumerate(images):
        paths.append(str(directory / f"query_{i}.png"))
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(paths[-1])
    return paths


async def _load(url: str, server_pid: int, queries: list[str], n_requests: int, n_clients: int, model: str, task: str,
                shots: int, timeout_s: float) -> dict:
    from .loadgen import Student
    from .tipadapter_tab import SOURCES

    students = [await Student.connect(url) for _ in range(n_clients)]
    try:
        build_s = []
        for s in students:  # every student builds a cache (its own session state)
            t0 = time.perf_counter()
            out = await s.call("build_cache", None, model, SOURCES[0], task, shots, *[""] * 6, *[None] * 6)
            build_s.append(time.perf_counter() - t0)
            if "Cache built" not in str(out[1]):
                raise RuntimeError(f"building a cache failed: {out[1]}")
        log_alpha, beta = out[4], out[5]  # the validation search's choice, as the page sets it

        async def classify(s, path) -> tuple[float, str | None]:
            t0 = time.perf_counter()
            try:
                out = await s.call("classify", None, await s.upload(path), log_alpha, beta)
                err = None if str(out[3]).startswith("Prediction") else f"app message: {out[3]}"
            except Exception as e:  # noqa: BLE001 - every failure is counted and reported
                err = f"{type(e).__name__}: {e}"
            return time.perf_counter() - t0, err

        await classify(students[0], queries[0])  # warm-up
        sequential, burst = [], []
        for _ in range(PROBE_REPEATS):  # medians of a few repeats: one probe lasts well under a second
            t0 = time.perf_counter()
            for i in range(BATCH_PROBE):
                await classify(students[0], queries[i % len(queries)])
            sequential.append(BATCH_PROBE / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            await asyncio.gather(*[classify(students[i % n_clients], queries[i % len(queries)])
                                   for i in range(BATCH_PROBE)])
            burst.append(BATCH_PROBE / (time.perf_counter() - t0))
        sequential_rps, burst_rps = statistics.median(sequential), statistics.median(burst)

        server_cpu, client_cpu = _cpu_seconds(server_pid), time.process_time()
        t_burst = time.perf_counter()
        jobs = [classify(students[i % n_clients], queries[i % len(queries)]) for i in range(n_requests)]
        try:
            results = await asyncio.wait_for(asyncio.gather(*jobs), timeout_s)
        except asyncio.TimeoutError:
            results = [(timeout_s, f"timed out after {timeout_s:.0f} s")] * n_requests
        wall = time.perf_counter() - t_burst
        client_cpu = time.process_time() - client_cpu
        server_cpu = None if server_cpu is None else _cpu_seconds(server_pid) - server_cpu
    finally:
        for s in students:
            await s.close()
    latencies = [t for t, _ in results]
    failures = [e for _, e in results if e]
    return {"errors": len(failures), "error_examples": sorted(set(failures))[:3],
            "p50_latency_s": round(statistics.median(latencies), 3),
            "p95_latency_s": round(_percentile(latencies, 0.95), 3), "max_latency_s": round(max(latencies), 3),
            "throughput_rps": round(n_requests / wall, 1), "burst_wall_s": round(wall, 2),
            "sequential_rps": round(sequential_rps, 1), f"burst{BATCH_PROBE}_rps": round(burst_rps, 1),
            "batching_gain": round(burst_rps / sequential_rps, 2),
            "server_cpu_ms_per_request": None if server_cpu is None else round(1000 * server_cpu / n_requests, 1),
            "load_generator_cpu_ms_per_request": round(1000 * client_cpu / n_requests, 1),
            "build_cache_median_s": round(statistics.median(build_s), 3)}


def bench_app(n_requests: int = 200, n_clients: int = 20, model: str = "toy", task: str = "ToyWorld novel shapes",
              shots: int = 4, host: str = "127.0.0.1", timeout_s: float = 300.0) -> dict:
    """Launch the app, fire ``n_requests`` concurrent classify requests from ``n_clients`` students, report
    latency, errors and what batching buys."""
    from .common import CONCURRENCY, MAX_BATCH, QUEUE_SIZE

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
        result = asyncio.run(_load(url, proc.pid, _query_images(Path(tmp.name)), n_requests, n_clients, model, task, shots,
                                   timeout_s))
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        tmp.cleanup()
    return {"model": model, "task": task, "n_requests": n_requests, "n_clients": n_clients, **result,
            "startup_s": round(startup_s, 1), "cpu_count": os.cpu_count(),
            "server": {"queue_max_size": QUEUE_SIZE, "concurrency_limit": CONCURRENCY, "max_batch_size": MAX_BATCH,
                       **server_stack()}}
