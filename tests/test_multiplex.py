"""The pool of swappable engines behind `moeprune route`: the scheduler alone with a fake engine
control, then the front over in-process stub engines (tests/stub_engine.py) speaking vLLM's dev-mode
control routes. Everything waits on asyncio events, never on time, except the queue timeout itself."""

from __future__ import annotations

import asyncio
import json
import shutil

import httpx2 as httpx
import pytest
from stub_engine import StubEngine
from test_route import KEY, PY_QUERY, Hosts, Stub, post_scope

from moeprune import MoepruneError
from moeprune.pattern import Pattern
from moeprune.serve.multiplex import ControlError, Engine, HTTPEngineControl, Multiplexer
from moeprune.serve.protocol import APIError
from moeprune.serve.route import RouteConfig, Router, create_route_app


# ---------------------------------------------------------------------------------------------- scheduler
def pat(*ids) -> Pattern:
    return Pattern({0: list(ids), 1: list(ids)}, meta={"fingerprint": "f"})


class FakeStore:
    def __init__(self):
        self.patterns = {"a": pat(0, 1), "b": pat(2, 3), "c": pat(4, 5), "d": pat(6, 7),
                         "wide": Pattern({0: [0, 1, 2], 1: [0, 1]}, meta={"fingerprint": "f"})}

    def names(self):
        return list(self.patterns)

    def find(self, name):
        return self.patterns.get(name)


class FakeControl:
    """Records each swap and how many requests its engine had in flight then; `gate` holds swaps open."""

    def __init__(self, digest: str):
        self.digest, self.swaps, self.in_flight_at_swap = digest, [], []
        self.gate: asyncio.Event | None = None
        self.started = asyncio.Event()
        self.fail: str | None = None
        self.engine: Engine | None = None

    async def resident(self):
        return {"digest": self.digest, "slots": {0: 2, 1: 2}, "name": None}

    async def swap(self, name, pattern):
        self.swaps.append(name)
        self.in_flight_at_swap.append(self.engine.in_flight)
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise ControlError(self.fail)
        return {"bytes_read": 10, "seconds": 0.0, "experts_written": 4}

    async def resume(self):
        self.resumed = getattr(self, "resumed", 0) + 1


async def make_pool(residents: list[str | None], **kw) -> Multiplexer:
    store = FakeStore()
    engines = []
    for i, r in enumerate(residents):
        control = FakeControl(store.find(r).digest if r else "sha256:elsewhere")
        engines.append(Engine(f"engine{i}", f"http://e{i}/v1", healthy=True, index=i, control=control))
        control.engine = engines[-1]
    pool = Multiplexer(engines, store, **{"queue_timeout": 10, **kw})  # a broken scheduler fails, not hangs
    await pool.learn()
    return pool


def swaps(pool) -> list:
    return [(e.name, s) for e in pool.engines for s in e.control.swaps]


async def until(condition) -> None:
    """Let the event loop run until `condition()` holds (a bounded number of turns, no clock)."""
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("the condition never held")


def test_the_resident_pattern_is_served_without_a_swap():
    async def main():
        pool = await make_pool(["a", "b"])
        assert [e.resident for e in pool.engines] == ["a", "b"]
        lease = await pool.acquire("b")
        assert lease.engine.name == "engine1" and not lease.swapped and lease.engine.in_flight == 1
        lease.release()
        lease.release()  # idempotent
        assert lease.engine.in_flight == 0 and swaps(pool) == []
    asyncio.run(main())


def test_a_miss_swaps_the_least_recently_used_idle_engine():
    async def main():
        pool = await make_pool(["a", "b", "c"])
        (await pool.acquire("a")).release()
        busy = await pool.acquire("b")
        (await pool.acquire("c")).release()
        lease = await pool.acquire("d")  # idle: engine0 (used first) and engine2; engine1 is busy
        assert lease.engine.name == "engine0" and lease.swapped and lease.engine.resident == "d"
        assert swaps(pool) == [("engine0", "d")]
        lease.release()
        busy.release()
        unknown = await make_pool(["a", None])  # an engine holding no stored pattern goes first
        assert (await unknown.acquire("c")).engine.name == "engine1"
    asyncio.run(main())


def test_concurrent_requests_for_one_pattern_cause_one_swap():
    async def main():
        pool = await make_pool(["a", "b"])
        for e in pool.engines:
            e.control.gate = asyncio.Event()
        tasks = [asyncio.create_task(pool.acquire("c")) for _ in range(5)]
        await until(lambda: pool.waiting == 5 and any(e.control.started.is_set() for e in pool.engines))
        assert len(swaps(pool)) == 1
        for e in pool.engines:
            e.control.gate.set()
        leases = await asyncio.gather(*tasks)
        assert len({lease.engine.name for lease in leases}) == 1 and len(swaps(pool)) == 1
        assert all(lease.swapped for lease in leases) and leases[0].engine.in_flight == 5
    asyncio.run(main())


def test_a_busy_engine_is_drained_before_its_swap_and_admits_nothing_meanwhile():
    async def main():
        pool = await make_pool(["a"])
        e = pool.engines[0]
        e.control.gate = asyncio.Event()
        first = await pool.acquire("a")
        want_b = asyncio.create_task(pool.acquire("b"))
        await until(lambda: e.target == "b")
        want_a = asyncio.create_task(pool.acquire("a"))  # its pattern is resident, but the engine is draining
        await until(lambda: pool.waiting == 2)
        assert e.control.swaps == [] and e.in_flight == 1  # the swap waits for the request in flight
        first.release()
        await e.control.started.wait()
        assert e.control.in_flight_at_swap == [0] and e.in_flight == 0 and not want_a.done()
        e.control.gate.set()
        b = await want_b
        assert b.engine is e and e.resident == "b" and not want_a.done()  # a drains b's request first
        await until(lambda: e.target == "a")
        assert e.control.swaps == ["b"]
        b.release()
        a = await want_a
        assert e.control.swaps == ["b", "a"] and e.control.in_flight_at_swap == [0, 0] and e.resident == "a"
        a.release()
    asyncio.run(main())


def test_requests_queued_for_the_resident_pattern_go_before_the_next_swap():
    """A mixed queue b, a, b, a behind a swap to b: both b's are served after it, then one swap to a for
    both a's (first come first served alone would swap for every request)."""
    async def main():
        pool = await make_pool(["c"])
        e = pool.engines[0]
        e.control.gate = asyncio.Event()
        tasks = [asyncio.create_task(pool.acquire(n)) for n in ("b", "a", "b", "a")]
        await until(lambda: pool.waiting == 4 and e.control.started.is_set())
        e.control.gate.set()
        await until(lambda: tasks[0].done() and tasks[2].done())
        assert e.resident == "b" and e.in_flight == 2 and e.target == "a" and not tasks[1].done()
        for t in (tasks[0], tasks[2]):
            t.result().release()
        leases = [await tasks[1], await tasks[3]]
        assert e.control.swaps == ["b", "a"] and e.in_flight == 2
        for lease in leases:
            lease.release()
    asyncio.run(main())


def test_queue_overflow_is_a_429():
    async def main():
        pool = await make_pool(["a"], max_queue=2)
        pool.engines[0].control.gate = asyncio.Event()
        waiting = [asyncio.create_task(pool.acquire("b")) for _ in range(2)]
        await until(lambda: pool.waiting == 2)
        with pytest.raises(APIError) as e:
            await pool.acquire("c")
        assert e.value.status == 429 and pool.waiting == 2
        pool.engines[0].control.gate.set()
        for lease in await asyncio.gather(*waiting):
            lease.release()
    asyncio.run(main())


def test_queue_timeout_is_a_503_naming_the_reason_and_gives_the_claim_back():
    async def main():
        pool = await make_pool(["a"], queue_timeout=0.05)
        e = pool.engines[0]
        held = await pool.acquire("a")
        with pytest.raises(APIError) as err:
            await pool.acquire("b")  # the engine never drains: held is not released
        assert err.value.status == 503 and "pattern b" in err.value.message and "draining" in err.value.message
        assert e.target is None and pool.waiting == 0  # nobody waits for b: the engine admits again
        again = await pool.acquire("a")
        assert again.engine is e and e.in_flight == 2 and e.control.swaps == []
        held.release()
        again.release()
    asyncio.run(main())


def test_a_failed_swap_is_a_503_naming_the_engine_which_leaves_service():
    async def main():
        pool = await make_pool(["a", "b"])
        pool.engines[0].control.fail = "CUDA out of memory"
        with pytest.raises(APIError) as err:
            await pool.acquire("c")
        assert err.value.status == 503 and "engine0" in err.value.message and "out of memory" in err.value.message
        e0 = pool.engines[0]
        assert e0.state == "failed" and e0.resident is None and not e0.usable and "out of memory" in e0.problem
        lease = await pool.acquire("a")  # its pattern moves to the engine left
        assert lease.engine.name == "engine1" and swaps(pool) == [("engine0", "c"), ("engine1", "a")]
        lease.release()
        pool.engines[1].control.fail = "again"
        with pytest.raises(APIError):
            await pool.acquire("c")
        with pytest.raises(APIError, match="no engine of the pool"):
            await pool.acquire("a")
    asyncio.run(main())


def test_patterns_of_another_budget_are_refused():
    async def main():
        pool = await make_pool(["a"])
        assert "layer 0" in pool.problem("wide") and "pattern wide" in pool.problem("wide")
        with pytest.raises(APIError, match="pattern wide keeps 3 experts in layer 0"):
            await pool.acquire("wide")
        assert swaps(pool) == []
    asyncio.run(main())


# ---------------------------------------------------------------------------------------------- the front
@pytest.fixture(scope="module")
def store(demo_store_path, tmp_path_factory):
    from moeprune.store import PatternStore

    path = tmp_path_factory.mktemp("multiplex") / "store"
    shutil.copytree(demo_store_path, path)
    s = PatternStore(path, on_corrupt="skip")
    prof = s.profile("python")
    s.add("narrow", prof, prof.select(keep=0.25))
    return s


@pytest.fixture(scope="module")
def signature(store):
    import torch

    from moeprune.demo import DEMO_MODEL
    from moeprune.models import load_tokenizer
    from moeprune.store.signature import load_signature_model

    return load_signature_model(DEMO_MODEL, dtype=torch.float32), load_tokenizer(DEMO_MODEL)


def resident(store, name):
    p = store.find(name)
    return {"name": name, "digest": p.digest, "kept": {str(k): v for k, v in p.kept.items()}}


def pool_front(store, signature, engines: dict[str, StubEngine], **config):
    stubs = {"full": Stub("served-full").app, **{host: e.app for host, e in engines.items()}}
    cfg = RouteConfig(model_name="demo_model", upstreams=config.pop("upstreams", {}), fallback="http://full/v1",
                      engines=[f"http://{host}/v1" for host in engines], source="/src/demo_model", api_key=KEY,
                      **{"queue_timeout": 10, **config})
    router = Router(store, *signature, cfg)
    return create_route_app(router, cfg, client=httpx.AsyncClient(transport=Hosts(stubs)))


async def serve(app, fn):
    f = app.app.state.front
    await f.start()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://front", timeout=60,
                                     headers={"Authorization": f"Bearer {KEY}"}) as http:
            return await fn(http)
    finally:
        await f.stop()


def chat(model, content="hi"):
    return {"model": model, "messages": [{"role": "user", "content": content}]}


def test_front_assigns_swaps_counts_and_shows_residents(store, signature):
    e0 = StubEngine("e0", resident(store, "python"))
    e1 = StubEngine("e1", {**resident(store, "legal"), "digest": "sha256:not-stored"})  # unknown resident
    e1.prefix_failures = 1  # the first reset of the prefix cache fails: retried
    app = pool_front(store, signature, {"e0": e0, "e1": e1})

    async def fn(http):
        out = {}
        for key, body in [("retrieved", chat(None, PY_QUERY)), ("pinned_python", chat("demo_model:python")),
                          ("bible", chat("demo_model:bible")), ("full", chat("demo_model:full"))]:
            out[key] = await http.post("/v1/chat/completions", json={k: v for k, v in body.items() if v})
        out["completion"] = await http.post("/v1/completions", json={"model": "demo_model:bible", "prompt": "x"})
        out["narrow"] = await http.post("/v1/chat/completions", json=chat("demo_model:narrow"))
        out["models"] = [m["id"] for m in (await http.get("/v1/models")).json()["data"]]
        out["health"] = (await http.get("/health")).json()
        out["metrics"] = (await http.get("/metrics")).text
        return out
    out = asyncio.run(serve(app, fn))
    for key, engine, content in [("retrieved", "engine0", "from python"), ("pinned_python", "engine0", "from python"),
                                 ("bible", "engine1", "from bible")]:
        r = out[key]
        assert r.status_code == 200, r.text
        assert r.headers["x-moeprune-upstream"] == engine and r.json()["moeprune"]["upstream"] == engine, key
        assert r.json()["choices"][0]["message"]["content"] == content, key
    assert out["bible"].json()["moeprune"]["swapped"] and not out["pinned_python"].json()["moeprune"]["swapped"]
    assert out["full"].json()["choices"][0]["message"]["content"] == "from served-full"
    assert out["completion"].json()["choices"][0]["text"] == "from bible"
    assert out["narrow"].status_code == 400 and "pattern narrow keeps" in out["narrow"].json()["error"]["message"]
    assert "layer" in out["narrow"].json()["error"]["message"]
    assert e1.calls == ["moeprune_resident", "pause:wait", "moeprune_swap", "reset_prefix_cache",
                        "reset_prefix_cache", "resume"]
    assert e1.swaps == [{"name": "bible", "source": "/src/demo_model"}] and e0.calls == ["moeprune_resident"]
    assert not e0.violations and not e1.violations
    assert "demo_model:bible" in out["models"] and "demo_model:full" in out["models"]
    health = out["health"]
    assert health["upstreams"]["engine0"]["resident"] == "python"
    assert health["upstreams"]["engine1"]["resident"] == "bible" and health["status"] == "ok"
    metrics = out["metrics"]
    assert 'moeprune_swaps_total{engine="engine1",outcome="ok"} 1.0' in metrics
    assert 'moeprune_swap_bytes_read_total{engine="engine1"} 2000.0' in metrics  # two workers' bytes
    assert 'moeprune_swap_seconds_count{engine="engine1"} 1.0' in metrics
    assert "moeprune_queue_wait_seconds_count 4.0" in metrics
    assert 'moeprune_retrievals_total{fell_back="false",upstream="engine0"} 2.0' in metrics


def test_front_drains_a_busy_engine_before_swapping_it(store, signature):
    e0 = StubEngine("e0", resident(store, "python"))
    e0.hold = asyncio.Event()
    app = pool_front(store, signature, {"e0": e0})
    pool = app.app.state.front.router.pool

    async def fn(http):
        busy = asyncio.create_task(http.post("/v1/chat/completions", json=chat("demo_model:python")))
        await until(lambda: e0.in_flight == 1)
        legal = [asyncio.create_task(http.post("/v1/chat/completions", json=chat("demo_model:legal")))
                 for _ in range(3)]
        await until(lambda: pool.waiting == 3)
        late = asyncio.create_task(http.post("/v1/chat/completions", json=chat("demo_model:python")))
        await until(lambda: pool.waiting == 4)
        assert e0.calls == ["moeprune_resident"] and pool.engines[0].target == "legal"
        e0.hold.set()
        results = [await busy, *(await asyncio.gather(*legal)), await late]
        return [r.json()["choices"][0]["message"]["content"] for r in results]
    answers = asyncio.run(serve(app, fn))
    assert answers == ["from python", "from legal", "from legal", "from legal", "from python"]
    assert [s["name"] for s in e0.swaps] == ["legal", "python"] and not e0.violations


def test_front_failed_swap_is_a_503_naming_the_engine(store, signature):
    e0 = StubEngine("e0", resident(store, "python"))
    e0.fail_swap = "CUDA out of memory"
    app = pool_front(store, signature, {"e0": e0})

    async def fn(http):
        failed = await http.post("/v1/chat/completions", json=chat("demo_model:legal"))
        after = await http.post("/v1/chat/completions", json=chat("demo_model:python"))
        return failed, after, (await http.get("/health")).json()
    failed, after, health = asyncio.run(serve(app, fn))
    assert failed.status_code == 503
    message = failed.json()["error"]["message"]
    assert "engine0" in message and "legal" in message and "out of memory" in message
    assert "resume" not in e0.calls  # an engine in an unknown state is not resumed
    assert after.status_code == 503 and "engine0" in after.json()["error"]["message"]
    assert health["status"] == "degraded" and health["upstreams"]["engine0"]["state"] == "failed"
    assert health["upstreams"]["engine0"]["resident"] is None


def test_a_failed_engine_restarted_on_an_export_returns_to_service(store, signature):
    e0 = StubEngine("e0", resident(store, "python"))
    e0.fail_swap = "CUDA out of memory"
    app = pool_front(store, signature, {"e0": e0})
    front = app.app.state.front

    async def fn(http):
        failed = await http.post("/v1/chat/completions", json=chat("demo_model:legal"))
        await front.check_all()  # still failed: the engine does not know what it holds
        still = (await http.get("/health")).json()["upstreams"]["engine0"]
        e0.fail_swap, e0.resident = None, resident(store, "bible")  # the operator restarted it on bible's export
        await front.check_all()
        return failed, still, await http.post("/v1/chat/completions", json=chat("demo_model:bible"))
    failed, still, back = asyncio.run(serve(app, fn))
    assert failed.status_code == 503 and still["state"] == "failed" and "out of memory" in still["problem"]
    assert back.status_code == 200, back.text
    assert e0.calls.count("resume") == 1  # on its return to service; the failed swap left it paused
    assert back.json()["choices"][0]["message"]["content"] == "from bible"


def test_a_client_leaving_the_queue_gives_its_place_back(store, signature):
    """A request waiting for a swap whose client hangs up: 499, no swap for it, the engine admits again."""
    e0 = StubEngine("e0", resident(store, "python"))
    e0.hold = asyncio.Event()
    app = pool_front(store, signature, {"e0": e0})
    front = app.app.state.front
    pool = front.router.pool
    body = json.dumps(chat("demo_model:legal")).encode()
    sent = []

    async def main():
        await front.start()
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://front",
                                         headers={"Authorization": f"Bearer {KEY}"}) as http:
                busy = asyncio.create_task(http.post("/v1/chat/completions", json=chat("demo_model:python")))
                await until(lambda: e0.in_flight == 1)
                messages = [{"type": "http.request", "body": body, "more_body": False}]
                left = asyncio.Event()

                async def receive():
                    if messages:
                        return messages.pop()
                    await left.wait()
                    return {"type": "http.disconnect"}

                async def send(message):
                    sent.append(message)

                waiting = asyncio.create_task(app(post_scope(body), receive, send))
                await until(lambda: pool.waiting == 1 and pool.engines[0].target == "legal")
                left.set()
                await waiting
                claim = pool.engines[0].target, pool.waiting
                late = asyncio.create_task(http.post("/v1/chat/completions", json=chat("demo_model:python")))
                await until(lambda: e0.in_flight == 2)  # admitted again: nobody waits for legal any more
                e0.hold.set()
                return claim, [(await t).json()["choices"][0]["message"]["content"] for t in (busy, late)]
        finally:
            await front.stop()
    claim, answers = asyncio.run(main())
    assert sent[0]["status"] == 499 and claim == (None, 0)
    assert answers == ["from python", "from python"] and e0.swaps == [] and not e0.violations


def test_fixed_upstreams_win_over_the_pool(store, signature):
    e0 = StubEngine("e0", resident(store, "python"))
    legal = Stub("served-legal")
    stubs = {"full": Stub("served-full").app, "legal": legal.app, "e0": e0.app}
    cfg = RouteConfig(model_name="demo_model", upstreams={"legal": "http://legal/v1"}, fallback="http://full/v1",
                      engines=["http://e0/v1"], source="/src", api_key=KEY)
    app = create_route_app(Router(store, *signature, cfg), cfg, client=httpx.AsyncClient(transport=Hosts(stubs)))
    r = asyncio.run(serve(app, lambda http: http.post("/v1/chat/completions", json=chat("demo_model:legal"))))
    assert r.json()["choices"][0]["message"]["content"] == "from served-legal" and not e0.swaps


def test_http_control_refuses_bad_answers():
    """Workers that disagree: an unknown resident; a worker's error or a non-dict result: a failed swap."""
    answers = {"moeprune_resident": {"results": [{"name": "a", "digest": "sha256:1", "kept": {"0": [1, 2]}},
                                                 {"name": "a", "digest": "sha256:2", "kept": {"0": [1, 3]}}]}}

    def handler(request):
        if request.url.path == "/collective_rpc":
            import json

            return httpx.Response(200, json=answers[json.loads(request.content)["method"]])
        return httpx.Response(200, json={"status": "paused"})

    async def main():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            control = HTTPEngineControl("http://e/v1", client, "/src")
            assert control.root == "http://e"
            info = await control.resident()
            assert info == {"digest": None, "slots": {0: 2}, "name": None}
            out = []
            for results in ([{"error": "no such expert file"}], ["oops"]):
                answers["moeprune_swap"] = {"results": results}
                with pytest.raises(ControlError) as e:
                    await control.swap("a", pat(0, 1))
                out.append(str(e.value))
            return out
    error, not_dict = asyncio.run(main())
    assert "no such expert file" in error and "oops" in not_dict


def test_pool_config_refusals():
    with pytest.raises(MoepruneError, match="at least one engine"):
        RouteConfig(model_name="m", upstreams={}, engines=[], source="/s")
    with pytest.raises(MoepruneError, match="engine1.*ending in /v1"):
        RouteConfig(model_name="m", upstreams={}, engines=["http://a/v1", "http://b:1/"], source="/s")
    with pytest.raises(MoepruneError, match="given twice"):
        RouteConfig(model_name="m", upstreams={}, engines=["http://a/v1", "http://a/v1"], source="/s")
    with pytest.raises(MoepruneError, match="source checkpoint"):
        RouteConfig(model_name="m", upstreams={}, engines=["http://a/v1"])


def test_route_warns_about_engines_off_loopback(store, monkeypatch, capsys):
    import uvicorn

    from moeprune.demo import DEMO_MODEL
    from moeprune.serve.route import route

    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: None)
    route(str(DEMO_MODEL), str(store.path), {}, engines=["http://127.0.0.1:8101/v1", "http://10.0.0.5:8000/v1"],
          port=8765)
    err = capsys.readouterr().err
    assert "engine http://10.0.0.5:8000/v1 is not on loopback" in err and "127.0.0.1:8101" not in err
