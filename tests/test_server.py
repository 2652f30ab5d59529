"""The server in-process, through the ASGI transport, driven with the official `openai` client and raw HTTP:
the API surface clients use, no 500s, bounded under hostile input, batching, evictions and disconnects."""

import asyncio
import json
import shutil
import sys
import threading
import time

import httpx2 as httpx  # what the openai client itself uses
import openai
import pytest
import torch

from moeprune.demo import DEMO_MODEL

KEY = "test-key"
BUDGET = 16  # patterns keep 16 of 32 experts: each fits, no two different ones together


@pytest.fixture(scope="module")
def pool():
    from moeprune.serve.residency import ExpertPool

    return ExpertPool(DEMO_MODEL, BUDGET, dtype=torch.float32)


@pytest.fixture(scope="module")
def store(demo_store_path, tmp_path_factory):
    from moeprune.store import PatternStore

    path = tmp_path_factory.mktemp("server") / "store"
    shutil.copytree(demo_store_path, path)
    return PatternStore(path, on_corrupt="skip")


def make_app(pool, store, engine=None, **config):
    from moeprune.serve.server import ServeConfig, create_app

    return create_app(pool, store, ServeConfig(model_name="demo_model", api_key=KEY, **config), engine=engine)


@pytest.fixture(scope="module")
def app(pool, store):
    app = make_app(pool, store)
    yield app
    app.app.state.service.engine.shutdown()


def call(app, fn):
    """Run `fn(client, http)` against the app in-process."""
    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=300,
                                     headers={"Authorization": f"Bearer {KEY}"}) as http:
            client = openai.AsyncOpenAI(base_url="http://t/v1", api_key=KEY, http_client=http, max_retries=0)
            return await fn(client, http)
    return asyncio.run(main())


def post(app, path, body, headers=None, raw=None):
    async def fn(client, http):
        kw = {"content": raw} if raw is not None else {"json": body}
        return await http.post(path, headers=headers or {}, **kw)
    return call(app, fn)


def metric(app, name, **labels):
    text = call(app, lambda c, h: h.get("/metrics")).text
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        head, _, value = line.rpartition(" ")
        if head == name or head == f"{name}{{{want}}}":
            return float(value)
    return 0.0


_SLIM: dict = {}


def slim_logits(pattern, ids):
    import moeprune

    key = tuple(map(tuple, pattern.kept.values()))
    if key not in _SLIM:
        _SLIM.clear()  # one slim model at a time
        _SLIM[key] = moeprune.load_slim(DEMO_MODEL, pattern, dtype=torch.float32)
    slim = _SLIM[key]
    with torch.no_grad():
        return torch.log_softmax(slim(torch.tensor([ids])).logits[0].float(), -1)


# ------------------------------------------------------------------------------------------ API surface
def test_completion_logprobs_echo_equal_slim_model(app, store):
    tok = app.app.state.service.tok
    prompt = "def main(argv):\n    return"

    async def fn(client, http):
        scored = await client.completions.create(model="demo_model:python", prompt=prompt, max_tokens=0, echo=True,
                                                 logprobs=3)
        gen = await client.completions.create(model="demo_model:python", prompt=prompt, max_tokens=5, echo=True,
                                              logprobs=2, temperature=0)
        return scored, gen

    scored, gen = call(app, fn)
    ids = tok(prompt)["input_ids"]
    lp = scored.choices[0].logprobs
    assert scored.choices[0].text == prompt and scored.usage.completion_tokens == 0
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and len(lp.tokens) == len(ids)
    ref = slim_logits(store.find("python"), ids)
    for i in range(1, len(ids)):
        assert abs(lp.token_logprobs[i] - ref[i - 1, ids[i]].item()) < 1e-4
        assert len(lp.top_logprobs[i]) <= 3
        best = max(lp.top_logprobs[i].values())
        assert abs(best - ref[i - 1].max().item()) < 1e-4
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    # generated tokens (greedy): the slim model's argmax at each step, with its logprob, after the echoed prompt
    g = gen.choices[0]
    new = g.logprobs.tokens[len(ids):]
    assert g.text.startswith(prompt) and len(new) == gen.usage.completion_tokens
    seq = list(ids)
    for token, value in zip(new, g.logprobs.token_logprobs[len(ids):], strict=True):
        ref = slim_logits(store.find("python"), seq)[-1]
        best = int(ref.argmax())
        assert token == tok.decode([best]) and abs(value - ref[best].item()) < 1e-4
        seq.append(best)


def test_chat_logprobs_parts_and_null_assistant(app, store):
    async def fn(client, http):
        return await client.chat.completions.create(
            model="demo_model:legal", max_completion_tokens=4, temperature=0, logprobs=True, top_logprobs=2,
            messages=[{"role": "user", "content": [{"type": "text", "text": "Permission is hereby granted"}]},
                      {"role": "assistant", "content": None},
                      {"role": "user", "content": "to any person obtaining a copy"}])

    r = call(app, fn)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens >= 1
    assert all(len(t.top_logprobs) <= 2 and t.logprob <= 0 for t in content)
    assert all(t.top_logprobs[0].logprob >= t.logprob - 1e-6 for t in content)


def test_several_prompts_token_ids_and_n(app):
    tok = app.app.state.service.tok
    ids = tok("class Foo:\n")["input_ids"]

    async def fn(client, http):
        many = await client.completions.create(model="demo_model:python", prompt=["import os\n", ids], max_tokens=3,
                                               n=2, temperature=1.0, seed=11)
        again = await client.completions.create(model="demo_model:python", prompt=["import os\n", ids],
                                                max_tokens=3, n=2, temperature=1.0, seed=11)
        return many, again

    many, again = call(app, fn)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert [c.text for c in many.choices] == [c.text for c in again.choices]  # seeded: reproducible
    alone = post(app, "/v1/completions", {"model": "demo_model:python", "prompt": ids, "max_tokens": 3,
                                          "temperature": 1.0, "seed": 11 + 2}).json()
    assert alone["choices"][0]["text"] == many.choices[2].text  # choice i uses seed + i, batched or not
    assert many.usage.prompt_tokens == len(tok("import os\n")["input_ids"]) + len(ids)


def test_stream_include_usage_and_matches_non_streaming(app):
    kw = dict(model="demo_model", prompt="Permission is hereby granted, free of charge, to any person",
              max_tokens=12, temperature=0)

    async def fn(client, http):
        whole = await client.completions.create(**kw)
        parts = [c async for c in await client.completions.create(stream=True, stream_options={"include_usage": True},
                                                                   **kw)]
        chat = [c async for c in await client.chat.completions.create(
            model="demo_model", stream=True, max_tokens=5, temperature=0, logprobs=True,
            messages=[{"role": "user", "content": "def parse(argv):"}])]
        return whole, parts, chat

    whole, parts, chat = call(app, fn)
    text = "".join(p.choices[0].text for p in parts if p.choices)
    assert text == whole.choices[0].text
    assert parts[-1].choices == [] and parts[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [p for p in parts if p.choices][-1].choices[0].finish_reason in ("length", "stop")
    assert chat[0].choices[0].delta.role == "assistant" and chat[-1].choices[0].finish_reason is not None
    assert sum(len(c.choices[0].logprobs.content) for c in chat if c.choices[0].logprobs) >= 1


@pytest.mark.parametrize("field,value", [
    ("tools", [{"type": "function", "function": {"name": "f"}}]), ("response_format", {"type": "json_object"}),
    ("logit_bias", {"5": 1}), ("suffix", "x"), ("best_of", 3), ("frobnicate", 1), ("presence_penalty", -3),
    ("seed", 2**70), ("max_tokens", True), ("stream", "false"), ("stop", [""]), ("model", 5),
])
def test_refused_fields_name_themselves(app, field, value):
    r = post(app, "/v1/completions", {"model": "demo_model", "prompt": "x", "max_tokens": 2, field: value})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == field and err["type"] == "invalid_request_error"
    assert app.app.state.service.engine.arriving == 0  # a refused request no longer holds a batch back


def test_unknown_routes_and_methods_get_openai_errors(app):
    for path in ("/v1/responses", "/v1/embeddings", "/nope"):
        r = post(app, path, {})
        assert r.status_code == 404 and "error" in r.json() and path in r.json()["error"]["message"]
    r = call(app, lambda c, h: h.get("/v1/completions"))
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


# ------------------------------------------------------------------------------------------ bounded
def test_body_limit(pool, store):
    app = make_app(pool, store, max_body_bytes=10_000)
    try:
        r = post(app, "/v1/completions", {"prompt": "x" * 20_000, "max_tokens": 2})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        assert post(app, "/v1/completions", {"prompt": "x" * 100, "max_tokens": 1}).status_code == 200
        assert metric(app, "moeprune_requests_total", endpoint="/v1/completions", status="413") == 1
    finally:
        app.app.state.service.engine.shutdown()


def test_prompt_too_long_for_any_tokenisation_is_refused_without_tokenising(app, monkeypatch):
    service = app.app.state.service
    calls = []
    real = type(service.tok).__call__
    monkeypatch.setattr(type(service.tok), "__call__", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    r = post(app, "/v1/completions", {"prompt": "a" * (service.max_prompt_chars + 1), "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded" and not calls
    assert post(app, "/v1/completions", {"prompt": "a b c", "max_tokens": 1}).status_code == 200 and calls


def test_context_length_is_enforced(app):
    service = app.app.state.service
    ctx = service.limits.context_length
    ids = [5] * (ctx - 4)
    r = post(app, "/v1/completions", {"prompt": ids, "max_tokens": 8})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert post(app, "/v1/completions", {"prompt": ids[:10], "max_tokens": 2}).status_code == 200
    # no max_tokens: the default (64) shortened to the room the context has left, as vLLM does
    r = post(app, "/v1/completions", {"prompt": ids, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 4
    r = post(app, "/v1/completions", {"prompt": [5] * ctx})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_tokenising_does_not_block_the_event_loop(app, monkeypatch):
    service = app.app.state.service
    entered, release = threading.Event(), threading.Event()
    real = type(service.tok).__call__

    def slow(self, text, *a, **k):
        if text == "BLOCK":
            entered.set()
            release.wait(60)
        return real(self, text, *a, **k)

    monkeypatch.setattr(type(service.tok), "__call__", slow)

    async def fn(client, http):
        pending = asyncio.ensure_future(http.post("/v1/completions", json={"prompt": "BLOCK", "max_tokens": 1}))
        await asyncio.get_running_loop().run_in_executor(None, entered.wait, 60)
        health = await http.get("/health")  # answered while the tokenizer is still busy
        release.set()
        return health, await pending

    health, done = call(app, fn)
    assert health.status_code == 200 and done.status_code == 200


def test_metric_labels_come_from_route_templates(app):
    async def fn(client, http):
        for i in range(50):
            await http.get(f"/probe-{i}")
            await http.post(f"/v1/x{i}", headers={"Authorization": "Bearer wrong"})
    call(app, fn)
    text = call(app, lambda c, h: h.get("/metrics")).text
    series = [line for line in text.splitlines() if line.startswith("moeprune_requests_total{")]
    assert not any("probe" in s or "/v1/x" in s for s in series)
    assert len(series) < 20


def test_auth_scheme_case_and_key(app):
    body = {"prompt": "hello", "max_tokens": 1}
    assert post(app, "/v1/completions", body, headers={"Authorization": ""}).status_code == 401
    r = post(app, "/v1/completions", body, headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert post(app, "/v1/completions", body, headers={"Authorization": f"bearer {KEY}"}).status_code == 200
    assert post(app, "/v1/completions", body, headers={"Authorization": f"BEARER  {KEY}"}).status_code == 200
    health = call(app, lambda c, h: h.get("/health", headers={"Authorization": ""}))
    assert health.status_code == 200


# ------------------------------------------------------------------------------------------ no 500s
def test_corrupt_entry_is_skipped_while_serving(pool, demo_store_path, tmp_path):
    from moeprune.store import PatternStore

    shutil.copytree(demo_store_path, tmp_path / "store")
    store = PatternStore(tmp_path / "store", on_corrupt="skip")
    app = make_app(pool, store)
    try:
        r = post(app, "/v1/completions", {"prompt": "import os\nimport sys\ndef main(argv):\n", "max_tokens": 1})
        assert r.status_code == 200 and r.headers["x-moeprune-pattern"] == "python"
        entry = tmp_path / "store" / "entries" / "bible.json"
        data = json.loads(entry.read_text())
        data["pattern"]["kept"] = {k: [999] for k in data["pattern"]["kept"]}
        entry.write_text(json.dumps(data))
        r = post(app, "/v1/completions", {"prompt": "import os\nimport sys\ndef main(argv):\n", "max_tokens": 1})
        assert r.status_code == 200 and r.headers["x-moeprune-pattern"] == "python"
        deadline = time.monotonic() + 60  # an in-place edit is seen at the store's next recheck
        while True:
            r = post(app, "/v1/completions", {"prompt": "And the LORD spake unto Moses, saying", "max_tokens": 1})
            assert r.status_code == 200
            if r.headers["x-moeprune-pattern"] != "bible" or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        assert r.headers["x-moeprune-pattern"] != "bible"
        assert post(app, "/v1/completions", {"model": "demo_model:bible", "prompt": "x", "max_tokens": 1}
                    ).status_code == 404
        health = call(app, lambda c, h: h.get("/health")).json()
        assert "bible" in health["store"]["skipped"]
    finally:
        app.app.state.service.engine.shutdown()


def test_start_up_refusals(demo_store_path):
    from moeprune.errors import MoepruneError
    from moeprune.serve.server import ServeConfig, check_budget_fits, check_port, is_loopback
    from moeprune.store import PatternStore

    store = PatternStore(demo_store_path)
    with pytest.raises(MoepruneError, match="smaller than stored pattern"):
        check_budget_fits(store, 8, 32)
    assert check_budget_fits(store, 16, 32) == 16
    for port in (0, 70000, True, "80"):
        with pytest.raises(MoepruneError, match="port"):
            check_port(port)
    with pytest.raises(MoepruneError, match="max-queue"):
        ServeConfig(model_name="m", max_queue=0)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.org")


# ------------------------------------------------------------------------------------------ engine behaviour
def test_same_pattern_requests_form_one_batch(pool, store):
    from moeprune.serve.engine import Engine

    engine = Engine(pool, pool.tokenizer, max_batch=8, max_queue=16, start=False)
    app = make_app(pool, store, engine=engine)
    try:
        async def fn(client, http):
            reqs = [asyncio.ensure_future(client.completions.create(
                model="demo_model:python", prompt=p, max_tokens=3, temperature=0))
                for p in ("import os\n", "class A:\n", "def f(x):\n", "x = 1\n")]
            while engine.depth < 4:  # all four queued before the worker starts
                await asyncio.sleep(0.01)
            engine.start()
            return await asyncio.gather(*reqs)

        out = call(app, fn)
        assert engine.batch_sizes == [4] and all(r.usage.completion_tokens >= 1 for r in out)
    finally:
        engine.shutdown()


def test_queue_full_is_429_counted_apart(pool, store):
    from moeprune.serve.engine import Engine

    engine = Engine(pool, pool.tokenizer, max_batch=8, max_queue=2, start=False)
    app = make_app(pool, store, engine=engine, max_queue=2)
    try:
        async def fn(client, http):
            first = [asyncio.ensure_future(http.post("/v1/completions", json={"model": "demo_model:python",
                                                                              "prompt": "x", "max_tokens": 1}))
                     for _ in range(2)]
            while engine.depth < 2:
                await asyncio.sleep(0.01)
            refused = await http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
            engine.start()
            return refused, await asyncio.gather(*first)

        refused, ok = call(app, fn)
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "queue_full"
        assert [r.status_code for r in ok] == [200, 200] and engine.arriving == 0
        assert metric(app, "moeprune_requests_total", endpoint="/v1/completions", status="429") == 1
    finally:
        engine.shutdown()


def test_pattern_switches_evict_and_read_only_missing_experts(app, store):
    from moeprune.reader import CheckpointReader

    with CheckpointReader(DEMO_MODEL) as r:
        per_expert = sum(r.nbytes(k) for k in r.keys() if ".experts.0." in k and "layers.0." in k)  # noqa: SIM118
    pats = {n: store.find(n) for n in ("python", "legal", "bible")}
    union = max(len(set(pats["python"].kept[layer]) | set(pats["legal"].kept[layer])) for layer in pats["python"].kept)
    assert union > BUDGET  # the two patterns cannot be resident together

    def pin(name):
        before = [metric(app, m) for m in ("moeprune_expert_bytes_read", "moeprune_expert_loads",
                                            "moeprune_expert_evictions")]
        r = post(app, "/v1/completions", {"model": f"demo_model:{name}", "prompt": "x", "max_tokens": 1})
        assert r.status_code == 200
        after = [metric(app, m) for m in ("moeprune_expert_bytes_read", "moeprune_expert_loads",
                                           "moeprune_expert_evictions")]
        return [a - b for a, b in zip(after, before, strict=True)]

    pin("python")
    assert pin("python") == [0, 0, 0]
    read, loads, evictions = pin("legal")
    missing = sum(len(set(pats["legal"].kept[layer]) - set(pats["python"].kept[layer])) for layer in pats["legal"].kept)
    assert loads == missing and read == loads * per_expert and evictions > 0
    assert pin("legal") == [0, 0, 0]


def test_client_disconnect_cancels_non_streaming_generation(pool, store):
    """The client hangs up while its (non-streaming) request is generating: generation stops at the next token."""
    app = make_app(pool, store)
    service = app.app.state.service
    steps, reached, answered = [], threading.Event(), threading.Event()

    def hook(module, args):
        steps.append(1)
        if len(steps) == 3:  # mid-generation: hold the worker until the server has seen the client leave
            reached.set()
            answered.wait(60)

    handle = pool.model.register_forward_pre_hook(hook)
    body = json.dumps({"model": "demo_model:python", "prompt": "def f(x):", "max_tokens": 200,
                       "temperature": 0}).encode()
    sent = []

    async def main():
        loop = asyncio.get_running_loop()
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive():
            if messages:
                return messages.pop()
            await loop.run_in_executor(None, reached.wait, 60)
            return {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)
            if message["type"] == "http.response.start":
                answered.set()

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"",
                 "root_path": "", "headers": [(b"authorization", f"Bearer {KEY}".encode()),
                                              (b"content-type", b"application/json"),
                                              (b"content-length", str(len(body)).encode())],
                 "client": ("127.0.0.1", 1), "server": ("t", 80)}
        await app(scope, receive, send)

    try:
        asyncio.run(main())
        for _ in range(600):
            if service.engine.depth == 0:
                break
            threading.Event().wait(0.1)
        assert service.engine.stopped_early == 1
        assert len(steps) <= 4  # prefill, two tokens, and at most the step that saw the cancel
        assert metric(app, "moeprune_requests_total", endpoint="/v1/completions", status="499") == 1
    finally:
        handle.remove()
        service.engine.shutdown()


# ------------------------------------------------------------------------------------------ a changing store
DECOY_TEXTS = {
    "a0": [" ".join(str((i * 7919 + j * 104729) % 1000) for j in range(120)) for i in range(6)],
    "a1": [f'<div class="row"><span id="c{i}">{"&nbsp;" * 20}</span></div>\n' * 12 for i in range(6)],
}


def _churn(path: str, source: str) -> None:
    """The other process: adds and removes the decoys (sometimes leaving the index stale) until stdin closes."""
    import os
    import sys

    from moeprune.store import PatternStore

    os.fsync = lambda fd: None  # never killed mid-write here; without fsync it changes the store far more often
    src, s = PatternStore(source), PatternStore(path)
    made = {n: (src.profile(n), src.get(n).pattern) for n in src.names()}
    changes = [0]

    def until_stdin_closes():
        sys.stdin.read()
        print(changes[0], flush=True)
        os._exit(0)

    threading.Thread(target=until_stdin_closes, daemon=True).start()
    print("ready", flush=True)
    while True:
        i = changes[0]
        name = sorted(made)[i % len(made)]
        if name in s:
            s.remove(name)
        else:
            s.add(name, *made[name], rebuild=i % 3 != 1)
        changes[0] += 1


def test_serving_while_another_process_adds_and_removes_patterns(pool, demo_store_path, tmp_path):
    import os
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM, AutoTokenizer

    import moeprune
    from moeprune.demo import DEMO_DATA
    from moeprune.prompts import read_prompts
    from moeprune.store import PatternStore

    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(DEMO_MODEL)
    source = PatternStore(tmp_path / "decoys")
    for name, texts in DECOY_TEXTS.items():
        prof = moeprune.profile(model, texts, tokenizer=tok, max_length=128)
        source.add(name, prof, prof.select(keep=0.5))
    shutil.copytree(demo_store_path, tmp_path / "store")
    store = PatternStore(tmp_path / "store", on_corrupt="skip")
    queries = [(d, p[:600]) for d in ("python", "legal", "bible") for p in read_prompts(DEMO_DATA / f"{d}.eval.jsonl")]
    app = make_app(pool, store)

    def route_all():
        async def fn(client, http):  # all at once: the server's threads search the store side by side
            rs = await asyncio.gather(*(http.post("/v1/completions", json={"prompt": q, "max_tokens": 1})
                                        for _, q in queries))
            return [(r.status_code, r.headers.get("x-moeprune-pattern")) for r in rs]
        return call(app, fn)

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(DEMO_MODEL.parents[1]))
    child = subprocess.Popen([sys.executable, __file__, "--churn", str(tmp_path / "store"), str(tmp_path / "decoys")],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        quiet = route_all()
        assert all(s == 200 for s, _ in quiet)
        expected = [name for _, name in quiet]
        assert sum(name == d for name, (d, _) in zip(expected, queries, strict=True)) >= len(queries) - 2
        assert child.stdout.readline().strip() == "ready"
        busy = route_all() + route_all()
        child.stdin.close()
        changes = int(child.stdout.readline())
        assert changes >= 5, f"the other process changed the store only {changes} times"
        assert [s for s, _ in busy] == [200] * len(busy)
        assert [n for _, n in busy] == expected * 2  # the decoys never take a query, nor break one
    finally:
        if not child.stdin.closed:
            child.stdin.close()
        child.wait(timeout=120)
        app.app.state.service.engine.shutdown()


if __name__ == "__main__" and sys.argv[1:2] == ["--churn"]:
    _churn(sys.argv[2], sys.argv[3])
