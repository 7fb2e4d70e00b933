"""A tiny in-process fake OpenAI streaming server for the bench's end-to-end unit tests.

Owns ``FakeOpenAI``: aiohttp on 127.0.0.1, a random port, its own thread and event loop. It streams
SSE chunks ``data: {...}`` ending with ``data: [DONE]``: it waits ``ttft_s``, sends one text chunk per
output token every ``itl_s``, then a usage chunk whose ``cached_tokens`` come from a 16-token-block
prefix cache, so cache-hit accounting can be checked. ``fail_every=k`` answers every k-th request
with 500; ``mode`` breaks streams (``stream_error``, ``drop``). ``server_timing``: the headers go out with the
first chunk, with a ``Server-Timing`` header as kvserve's ingress sends it (accepted when the handler started; its
``ingress`` stage the ``ttft_s`` waited). ``replicas``: names it answers from in turn, in kvserve's
``x-kvserve-replica`` header. Requests it saw are in ``seen``.
A fake is used only in unit tests; integration tests run the real service.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

from aiohttp import web

BLOCK = 16


class FakeOpenAI:
    """A streaming OpenAI-shaped server with timing, failure injection and a prefix cache."""

    def __init__(self, ttft_s=0.05, itl_s=0.002, fail_every=0, mode="ok", server_timing=False, replicas=()):
        self.ttft_s, self.itl_s, self.fail_every, self.mode = ttft_s, itl_s, fail_every, mode
        self.server_timing, self.replicas = server_timing, tuple(replicas)
        self.count = 0
        self.seen: list[dict] = []
        self.blocks: set[tuple] = set()
        self.loop = asyncio.new_event_loop()
        self.port = None

    def _cached(self, tokens: list) -> int:
        cached, hit = 0, True
        for i in range(0, len(tokens) - len(tokens) % BLOCK, BLOCK):
            key = tuple(tokens[: i + BLOCK])
            if hit and key in self.blocks:
                cached += BLOCK
            else:
                hit = False
            self.blocks.add(key)
        return cached

    async def models(self, request):
        return web.json_response({"object": "list", "data": [{"id": "fake", "object": "model"}]})

    async def generate(self, request):
        accepted = time.time()
        body = await request.json()
        self.count += 1
        self.seen.append({"body": body, "session": request.headers.get("x-session-id"), "path": request.path})
        if body.get("model") != "fake":
            return web.json_response({"error": {"message": "no such model", "code": 404}}, status=404)
        if self.fail_every and self.count % self.fail_every == 0:
            return web.json_response({"error": {"message": "injected failure"}}, status=500)
        chat = "messages" in body
        tokens = (" ".join(m["content"] for m in body["messages"]).split() if chat else body["prompt"])
        headers = {"Content-Type": "text/event-stream"}
        if self.replicas:
            headers["x-kvserve-replica"] = self.replicas[(self.count - 1) % len(self.replicas)]
        if self.server_timing:
            await asyncio.sleep(self.ttft_s)
            headers["Server-Timing"] = f'accepted;desc="{accepted:.6f}", engine;dur={self.ttft_s * 1000:.3f}, ' \
                                       f'ingress;dur={(time.time() - accepted) * 1000:.3f}'
        response = web.StreamResponse(headers=headers)
        await response.prepare(request)
        if not self.server_timing:
            await asyncio.sleep(self.ttft_s)
        n = body["max_tokens"]
        for i in range(n):
            if i:
                await asyncio.sleep(self.itl_s)
            if self.mode == "stream_error" and i == 1:
                await response.write(b'data: {"error": {"message": "engine died"}}\n\n')
                return response
            if self.mode == "drop" and i == 1:
                return response  # ends the stream without [DONE]
            choice = {"index": 0, "delta": {"content": f"w{i} "}} if chat else {"index": 0, "text": f"w{i} "}
            await response.write(f"data: {json.dumps({'choices': [choice]})}\n\n".encode())
        usage = {"prompt_tokens": len(tokens), "completion_tokens": n, "total_tokens": len(tokens) + n,
                 "prompt_tokens_details": {"cached_tokens": self._cached(list(tokens))}}
        await response.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        return response

    def __enter__(self):
        ready = threading.Event()

        async def start():
            app = web.Application()
            app.router.add_get("/v1/models", self.models)
            app.router.add_post("/v1/completions", self.generate)
            app.router.add_post("/v1/chat/completions", self.generate)
            self.runner = web.AppRunner(app)
            await self.runner.setup()
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            await site.start()
            self.port = site._server.sockets[0].getsockname()[1]

        def serve():
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(start())
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=serve, daemon=True)
        self.thread.start()
        assert ready.wait(10), "fake server did not start"
        return self

    def __exit__(self, *exc):
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()

    @property
    def base_url(self):
        return f"http://127.0.0.1:{self.port}/v1"
