"""The routing front (`moeprune route`) in-process: stub upstreams that record what they receive,
and `moeprune serve` itself as an upstream, all reached through one ASGI dispatching transport."""

from __future__ import annotations

import asyncio
import json
import shutil

import httpx2 as httpx
import openai
import pytest
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from moeprune import MoepruneError
from moeprune.demo import DEMO_MODEL
from moeprune.serve.route import RouteConfig, Router, create_route_app, parse_upstreams

KEY = "front-key"
PY_QUERY = "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)"
SSE = [b'data: {"id": "x", "choices": [{"index": 0, "delta": {"content": "he"}}]}\n\n',
       b'data: {"id": "x", "choices": [{"index": 0, "delta": {"content": "llo"}}]}\n\n', b"data: [DONE]\n\n"]


class Stub:
    """An OpenAI-compatible upstream that records each request; `delay` holds chat answers."""

    def __init__(self, model_id: str):
        self.model_id, self.seen, self.delay, self.cancelled = model_id, [], 0.0, 0
        app = FastAPI()

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [{"id": model_id, "object": "model"}]}

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            body = await request.json()
            self.seen.append((dict(request.headers), body))
            try:
                await asyncio.sleep(self.delay)
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
            if body.get("stream"):
                async def events():
                    for chunk in SSE:
                        yield chunk
                return StreamingResponse(events(), media_type="text/event-stream")
            if body.get("temperature") == -1:  # an upstream's own validation error passes through
                return JSONResponse({"error": {"message": "bad temperature", "type": "invalid_request_error"}},
                                    status_code=400)
            return {"id": "c", "object": "chat.completion", "model": body["model"],
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": f"from {model_id}"},
                                 "finish_reason": "stop"}]}

        @app.post("/v1/completions")
        async def completions(request: Request):
            body = await request.json()
            self.seen.append((dict(request.headers), body))
            return {"id": "c", "object": "text_completion", "model": body["model"],
                    "choices": [{"index": 0, "text": f"from {model_id}", "finish_reason": "stop"}]}

        self.app = app


class Hosts(httpx.AsyncBaseTransport):
    """Sends each request to the in-process app of its host; an unknown host refuses the connection."""

    def __init__(self, apps: dict):
        self.apps = {host: httpx.ASGITransport(app=app) for host, app in apps.items()}

    async def handle_async_request(self, request):
        transport = self.apps.get(request.url.host)
        if transport is None:
            raise httpx.ConnectError(f"connection refused by {request.url.host}", request=request)
        return await transport.handle_async_request(request)


@pytest.fixture(scope="module")
def store(demo_store_path, tmp_path_factory):
    from moeprune.store import PatternStore

    path = tmp_path_factory.mktemp("route") / "store"
    shutil.copytree(demo_store_path, path)
    return PatternStore(path, on_corrupt="skip")


@pytest.fixture(scope="module")
def signature(store):
    from moeprune.models import load_tokenizer
    from moeprune.store.signature import load_signature_model

    return load_signature_model(DEMO_MODEL, dtype=torch.float32), load_tokenizer(DEMO_MODEL)


def front(store, signature, stubs: dict, fallback: str | None = "http://full/v1", **config):
    upstreams = {name: f"http://{name}/v1" for name in stubs if name != "full"}
    upstreams.update(config.pop("upstreams", {}))
    cfg = RouteConfig(model_name="demo_model", upstreams=upstreams, fallback=fallback, api_key=KEY, **config)
    router = Router(store, *signature, cfg)
    client = httpx.AsyncClient(transport=Hosts({name: s.app for name, s in stubs.items()}))
    return create_route_app(router, cfg, client=client)


def run(app, fn):
    """Start the front (health checks), run `fn(openai_client, http)`, stop it."""
    async def main():
        f = app.app.state.front
        await f.start()
        try:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://front", timeout=60,
                                         headers={"Authorization": f"Bearer {KEY}"}) as http:
                client = openai.AsyncOpenAI(base_url="http://front/v1", api_key=KEY, http_client=http, max_retries=0)
                return await fn(client, http)
        finally:
            await f.stop()
    return asyncio.run(main())


@pytest.fixture
def stubs():
    return {name: Stub(f"served-{name}") for name in ("python", "legal", "full")}


def test_routes_by_domain_and_rewrites_the_model(store, signature, stubs):
    app = front(store, signature, stubs)

    async def fn(client, http):
        r = await http.post("/v1/chat/completions", json={"model": "demo_model", "temperature": 0.5,
                                                          "messages": [{"role": "user", "content": PY_QUERY}]})
        return r
    r = run(app, fn)
    assert r.status_code == 200 and r.headers["x-moeprune-pattern"] == "python"
    assert r.headers["x-moeprune-fallback"] == "false"
    body = r.json()
    assert body["choices"][0]["message"]["content"] == "from served-python"
    assert body["moeprune"]["pattern"] == "python" and body["moeprune"]["upstream"] == "python"
    (headers, sent), = stubs["python"].seen
    assert sent["model"] == "served-python" and sent["temperature"] == 0.5  # everything else as the client sent it
    assert not stubs["legal"].seen and not stubs["full"].seen


def test_pinned_full_and_unknown_models(store, signature, stubs):
    app = front(store, signature, stubs)

    async def fn(client, http):
        pinned = await client.chat.completions.create(model="demo_model:legal", messages=[
            {"role": "user", "content": PY_QUERY}])
        full = await client.completions.create(model="demo_model:full", prompt="hello")
        models = [m.id for m in (await client.models.list()).data]
        unknown = await http.post("/v1/chat/completions", json={"model": "demo_model:nope", "messages": [
            {"role": "user", "content": "x"}]})
        return pinned, full, models, unknown
    pinned, full, models, unknown = run(app, fn)
    assert pinned.choices[0].message.content == "from served-legal"
    assert full.choices[0].text == "from served-full"
    assert models == ["demo_model", "demo_model:full", "demo_model:python", "demo_model:legal"]
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"


def test_unmatched_and_unserved_patterns_fall_back(store, signature):
    only_python = {name: Stub(f"served-{name}") for name in ("python", "full")}
    app = front(store, signature, only_python)

    async def fn(client, http):
        legal = "THE SOFTWARE IS PROVIDED \"AS IS\", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING " \
                "BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE"
        return await http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": legal}]})
    r = run(app, fn)
    assert r.status_code == 200 and r.headers["x-moeprune-fallback"] == "true"
    assert r.headers["x-moeprune-pattern"] == "fallback"
    assert "legal" in r.json()["moeprune"]["reason"]  # retrieved legal, which no upstream serves
    assert only_python["full"].seen and not only_python["python"].seen


def test_streaming_passes_through_byte_for_byte(store, signature, stubs):
    app = front(store, signature, stubs)

    async def fn(client, http):
        async with http.stream("POST", "/v1/chat/completions", json={
                "model": "demo_model:python", "stream": True, "messages": [{"role": "user", "content": "x"}]}) as r:
            return r.status_code, dict(r.headers), b"".join([c async for c in r.aiter_raw()])
    status, headers, raw = run(app, fn)
    assert status == 200 and raw == b"".join(SSE)
    assert headers["x-moeprune-pattern"] == "python" and headers["content-type"].startswith("text/event-stream")


def test_upstream_down_is_a_503_naming_it(store, signature, stubs):
    app = front(store, signature, stubs, upstreams={"bible": "http://nowhere/v1"})

    async def fn(client, http):
        health = (await http.get("/health")).json()
        r = await http.post("/v1/chat/completions", json={"model": "demo_model:bible", "messages": [
            {"role": "user", "content": "x"}]})
        metrics = (await http.get("/metrics")).text
        return health, r, metrics
    health, r, metrics = run(app, fn)
    assert health["status"] == "degraded" and not health["upstreams"]["bible"]["healthy"]
    assert r.status_code == 503 and "bible" in r.json()["error"]["message"]
    assert "http://nowhere/v1" in r.json()["error"]["message"]
    assert 'moeprune_upstream_errors_total{kind="down",upstream="bible"} 1.0' in metrics


def test_upstream_failing_mid_way_is_marked_down(store, signature, stubs):
    app = front(store, signature, stubs)

    async def fn(client, http):
        del app.app.state.front.client._transport.apps["legal"]  # it dies after the health check
        r1 = await http.post("/v1/chat/completions", json={"model": "demo_model:legal", "messages": [
            {"role": "user", "content": "x"}]})
        r2 = await http.post("/v1/chat/completions", json={"model": "demo_model:legal", "messages": [
            {"role": "user", "content": "x"}]})
        return r1, r2
    r1, r2 = run(app, fn)
    assert r1.status_code == r2.status_code == 503
    assert "legal" in r1.json()["error"]["message"] and "ConnectError" in r2.json()["error"]["message"]


def test_upstream_errors_pass_through(store, signature, stubs):
    app = front(store, signature, stubs)
    r = run(app, lambda c, h: h.post("/v1/chat/completions", json={
        "model": "demo_model:python", "temperature": -1, "messages": [{"role": "user", "content": "x"}]}))
    assert r.status_code == 400 and r.json()["error"]["message"] == "bad temperature"


def post_scope(body: bytes, path: str = "/v1/chat/completions") -> dict:
    """The ASGI scope of an authorised JSON POST, to drive the app by hand (a client that hangs up)."""
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
            "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
            "client": ("127.0.0.1", 1), "server": ("front", 80),
            "headers": [(b"authorization", f"Bearer {KEY}".encode()), (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode())]}


def test_client_disconnect_cancels_the_upstream_request(store, signature, stubs):
    app = front(store, signature, stubs)
    stubs["python"].delay = 30
    body = json.dumps({"model": "demo_model:python", "messages": [{"role": "user", "content": "x"}]}).encode()
    sent = []

    async def main():
        f = app.app.state.front
        await f.start()
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive():
            if messages:
                return messages.pop()
            while not stubs["python"].seen:  # the upstream has the request: now the client hangs up
                await asyncio.sleep(0.01)
            return {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        await app(post_scope(body), receive, send)
        cancelled = stubs["python"].cancelled  # by the time the front answered, not at shutdown
        await f.stop()
        return f.in_flight, cancelled
    assert asyncio.run(main()) == (0, 1)
    assert sent[0]["status"] == 499


def test_auth_body_limit_and_bad_requests(store, signature, stubs):
    app = front(store, signature, stubs, max_body_bytes=1000)

    async def fn(client, http):
        no_key = await http.post("/v1/chat/completions", json={}, headers={"Authorization": "Bearer wrong"})
        big = await http.post("/v1/chat/completions", content=b"{" + b" " * 2000 + b"}")
        not_json = await http.post("/v1/chat/completions", content=b"nope")
        no_messages = await http.post("/v1/chat/completions", json={"messages": []})
        bad_prompt = await http.post("/v1/completions", json={"prompt": 5})
        health = await http.get("/health", headers={"Authorization": ""})
        return no_key, big, not_json, no_messages, bad_prompt, health
    no_key, big, not_json, no_messages, bad_prompt, health = run(app, fn)
    assert no_key.status_code == 401 and big.status_code == 413 and not_json.status_code == 400
    assert no_messages.status_code == 400 and no_messages.json()["error"]["param"] == "messages"
    assert bad_prompt.status_code == 400 and bad_prompt.json()["error"]["param"] == "prompt"
    assert health.status_code == 200
    assert not any(s.seen for s in stubs.values())  # nothing bad reached an upstream


def test_metrics_count_per_upstream(store, signature, stubs):
    app = front(store, signature, stubs)

    async def fn(client, http):
        for _ in range(2):
            await http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": PY_QUERY}]})
        return (await http.get("/metrics")).text
    text = run(app, fn)
    assert 'moeprune_retrievals_total{fell_back="false",upstream="python"} 2.0' in text
    assert 'moeprune_upstream_latency_seconds_count{upstream="python"} 2.0' in text
    assert 'moeprune_requests_total{endpoint="/v1/chat/completions",status="200"} 2.0' in text


def test_config_refusals(store, signature):
    with pytest.raises(MoepruneError, match="ending in /v1"):
        RouteConfig(model_name="m", upstreams={"python": "http://h:1/"})
    with pytest.raises(MoepruneError, match="at least one upstream"):
        RouteConfig(model_name="m", upstreams={})
    with pytest.raises(MoepruneError, match="NAME=URL"):
        parse_upstreams(["python"])
    with pytest.raises(MoepruneError, match="given twice"):
        parse_upstreams(["a=http://x/v1", "a=http://y/v1"])
    with pytest.raises(MoepruneError, match="holds no pattern 'nope'"):
        Router(store, *signature, RouteConfig(model_name="m", upstreams={"nope": "http://h/v1"}))


def test_moeprune_serve_as_an_upstream(store, signature):
    """The front over a real `moeprune serve` app: the answer is the one serve gives directly."""
    from moeprune.serve.residency import ExpertPool
    from moeprune.serve.server import ServeConfig, create_app

    pool = ExpertPool(DEMO_MODEL, 16, dtype=torch.float32)
    upstream = create_app(pool, store, ServeConfig(model_name="demo_model"))
    cfg = RouteConfig(model_name="demo_model", upstreams={"python": "http://serve/v1"})
    app = create_route_app(Router(store, *signature, cfg), cfg,
                           client=httpx.AsyncClient(transport=Hosts({"serve": upstream})))
    request = {"prompt": "def add(a, b):", "max_tokens": 8, "temperature": 0}

    async def direct():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=upstream), base_url="http://serve") as h:
            return (await h.post("/v1/completions", json={**request, "model": "demo_model:python"})).json()
    try:
        want = asyncio.run(direct())
        got = run(app, lambda c, h: h.post("/v1/completions", json={**request, "model": "demo_model:python"}))
    finally:
        upstream.app.state.service.engine.shutdown()
    assert got.status_code == 200
    assert got.json()["choices"][0]["text"] == want["choices"][0]["text"] and want["choices"][0]["text"]
