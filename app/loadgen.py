"""A light load generator for the demo: simulated students speaking Gradio's queue protocol like a browser does.

Each :class:`Student` is one browser tab: its own ``session_hash`` (so its own server-side state, e.g. a
Tip-Adapter cache), one keep-alive HTTP connection, uploads to ``/gradio_api/upload``, events joined with
``/gradio_api/queue/join`` and their results read from the session's event stream
(``/gradio_api/queue/data``), reopened whenever the server closes it with events still pending.

Why not ``gradio_client``: it opens a fresh HTTP client (and TLS context) per call and a thread per job;
measured on a 2-core machine it spends about 100-140 ms of CPU per request on the load-generating side,
several times what the server spends, so 40 simulated students would measure the load generator instead
of the app. The functional tests use ``gradio_client``; the bench uses this.
"""

from __future__ import annotations

import asyncio
import json
import uuid

import httpx


class AppError(RuntimeError):
    """The server answered an event with an error (``success: false``)."""


class Student:
    """One simulated browser session against a served demo at ``url`` (ending with ``/``)."""

    def __init__(self, url: str, config: dict, http: httpx.AsyncClient):
        self.url, self.http = url, http
        self.api = url + config.get("api_prefix", "/gradio_api").strip("/") + "/"
        self.fn = {d["api_name"]: d["id"] for d in config["dependencies"] if d.get("api_name")}
        self.session = uuid.uuid4().hex[:11]
        self.pending: dict[str, asyncio.Future] = {}
        self.reader: asyncio.Task | None = None

    @classmethod
    async def connect(cls, url: str, config: dict | None = None) -> Student:
        http = httpx.AsyncClient(timeout=httpx.Timeout(300.0), limits=httpx.Limits(max_connections=4))
        if config is None:
            config = (await http.get(url + "config")).raise_for_status().json()
        return cls(url, config, http)

    async def upload(self, path: str) -> dict:
        with open(path, "rb") as f:
            r = await self.http.post(self.api + "upload", files=[("files", (path.rsplit("/", 1)[-1], f))])
        return {"path": r.raise_for_status().json()[0], "orig_name": path.rsplit("/", 1)[-1],
                "meta": {"_type": "gradio.FileData"}}

    async def call(self, api_name: str, *data) -> list:
        """Join the queue with one event and wait for its output data (raises AppError on a server error)."""
        if api_name not in self.fn:
            raise ValueError(f"the app has no endpoint {api_name!r}; it has {sorted(self.fn)}")
        body = {"data": list(data), "fn_index": self.fn[api_name], "session_hash": self.session,
                "event_data": None, "trigger_id": None}
        r = await self.http.post(self.api + "queue/join", json=body)
        if r.status_code == 503:
            raise AppError("queue full")
        event = r.raise_for_status().json()["event_id"]
        done = self.pending.setdefault(event, asyncio.get_running_loop().create_future())
        if self.reader is None or self.reader.done():
            self.reader = asyncio.create_task(self._read())
        return await done

    async def _read(self) -> None:
        """Read the session's event stream until nothing is pending (reopening it if the server closed it)."""
        while any(not f.done() for f in self.pending.values()):
            async with self.http.stream("GET", self.api + "queue/data", params={"session_hash": self.session}) as r:
                async for line in r.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    msg = json.loads(line[5:])
                    if msg.get("msg") == "close_stream":
                        break
                    if msg.get("msg") != "process_completed":
                        continue
                    future = self.pending.setdefault(msg["event_id"], asyncio.get_running_loop().create_future())
                    if future.done():
                        continue
                    if msg.get("success"):
                        future.set_result(msg["output"]["data"])
                    else:
                        future.set_exception(AppError(str(msg.get("output", {}).get("error") or msg)))
            self.pending = {k: f for k, f in self.pending.items() if not f.done()}

    async def close(self) -> None:
        if self.reader is not None:
            self.reader.cancel()
        await self.http.aclose()
