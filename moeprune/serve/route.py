"""`moeprune route`: an OpenAI-compatible front that retrieves each request's pattern and proxies
it to the upstream server (vLLM, SGLang, `moeprune serve`, ...) that serves that pattern's export.

vLLM cannot mask experts per request inside one batch, so per-request retrieval sits in front of
it: one upstream per stored pattern, plus a fallback (the full model, or a wide union pattern) for
queries that match none. The front holds only a *signature model* (the layers up to the first
MoE router, `load_signature_model`) and the pattern store. It keeps the serving front's shape: the
same `Gate` (body limit, constant-time API key, route-template metric labels), model ids (`base`,
`base:<pattern>` to pin, `base:full` for the fallback), `x-moeprune-pattern` / `-fallback`
headers and `moeprune` field. Everything else in a request is the upstream's business: the body
goes through with only `model` rewritten to the upstream's own id, and a streamed response comes
back byte for byte. Upstreams are health-checked in the background: a down one gets a 503 that
names it, at once, and a request never waits longer than the connect timeout to learn it.

With a pool of swappable engines (`engines`, see `multiplex`), every stored pattern is servable: a
pattern with a fixed upstream goes there, any other to an engine of the pool, swapped to it if
needed; the fallback still serves `base:full` and unmatched queries.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx2 as httpx
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from ..errors import MoepruneError
from .protocol import APIError, parse_json, retrieval_query
from .server import Gate, _client_gone, add_error_handlers, check_port, gate_metrics, is_loopback

log = logging.getLogger("moeprune")

FALLBACK = "fallback"


@dataclass
class RouteConfig:
    """What the front serves and how it reaches its upstreams. `upstreams`: pattern name -> base URL
    (ending in /v1); `fallback`: the base URL for queries that match no served pattern."""

    model_name: str
    upstreams: dict[str, str]
    fallback: str | None = None
    api_key: str | None = None
    upstream_api_key: str | None = None  # sent to the upstreams as a bearer token
    max_body_bytes: int = 4 * 2**20
    max_in_flight: int = 256  # requests being proxied at once; beyond it: 429
    connect_timeout: float = 3.0
    read_timeout: float = 600.0
    health_interval: float = 5.0
    engines: list[str] | None = None  # the pool of swappable engines' /v1 URLs (None: no pool)
    source: str | None = None  # the full checkpoint the engines read swapped-in experts from
    max_queue: int = 256  # requests waiting for a pool engine; beyond it: 429
    queue_timeout: float = 300.0  # the longest wait for a pool engine; then 503
    swap_timeout: float = 600.0

    def __post_init__(self) -> None:
        if self.engines is not None:
            if not self.engines:
                raise MoepruneError("a pool of swappable engines needs at least one engine (--engine URL)")
            if not self.source:
                raise MoepruneError("a pool of swappable engines needs the source checkpoint to swap experts from")
            for i, url in enumerate(self.engines):
                check_url(url, f"engine{i}")
            if len(set(self.engines)) != len(self.engines):
                raise MoepruneError("an engine URL is given twice")
            clash = [n for n in self.upstreams if n in {f"engine{i}" for i in range(len(self.engines))}]
            if clash:
                raise MoepruneError(f"--upstream {clash[0]}: the name of a pool engine; rename the pattern")
        elif not self.upstreams and not self.fallback:
            raise MoepruneError("give at least one upstream (--upstream NAME=URL) or a --fallback URL")
        for name, url in [*self.upstreams.items(), *([(FALLBACK, self.fallback)] if self.fallback else [])]:
            check_url(url, name)
        if FALLBACK in self.upstreams or "full" in self.upstreams:
            raise MoepruneError("'fallback' and 'full' name the fallback upstream; give it with --fallback URL")
        for name in ("max_body_bytes", "max_in_flight", "max_queue"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MoepruneError(f"{name.replace('_', '-')} must be an integer >= 1, got {value!r}")
        for name in ("connect_timeout", "read_timeout", "health_interval", "queue_timeout", "swap_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise MoepruneError(f"{name.replace('_', '-')} must be a positive number of seconds, got {value!r}")


def check_url(url: object, name: str) -> str:
    """An upstream's OpenAI base URL: http(s)://host[:port]/.../v1."""
    if not isinstance(url, str):
        raise MoepruneError(f"upstream {name}: the URL must be a string, got {url!r}")
    try:
        parsed = httpx.URL(url)
    except Exception:
        raise MoepruneError(f"upstream {name}: {url!r} is not a URL") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise MoepruneError(f"upstream {name}: {url!r} is not an http(s) URL")
    if not parsed.path.rstrip("/").endswith("/v1"):
        raise MoepruneError(f"upstream {name}: {url!r} must be the OpenAI base URL, ending in /v1")
    return url


def parse_upstreams(items: list[str]) -> dict[str, str]:
    """`NAME=URL` items of the command line as a dict; a repeated or malformed one is refused."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, url = item.partition("=")
        if not sep or not name or not url:
            raise MoepruneError(f"--upstream takes NAME=URL (a stored pattern and its server's /v1 URL), got {item!r}")
        if name in out:
            raise MoepruneError(f"--upstream {name} is given twice")
        out[name] = url
    return out


# ---------------------------------------------------------------------------------------------- upstreams
@dataclass
class Upstream:
    """One OpenAI-compatible server: the pattern it serves (`name`), its base URL, and what the
    health checker last learnt: its served model id, and whether it answered."""

    name: str
    url: str
    model_id: str | None = None
    healthy: bool = False
    problem: str = "not checked yet"
    checked: float = 0.0

    def endpoint(self, path: str) -> str:
        return self.url.rstrip("/") + path

    def down(self, problem: str) -> APIError:
        self.healthy, self.problem = False, problem
        return self.unavailable()

    def unavailable(self) -> APIError:
        return APIError(503, f"upstream {self.name} ({self.url}) is unavailable: {self.problem}", "server_error",
                        "upstream_unavailable")


def _metrics():
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    reg = CollectorRegistry()
    return {
        **gate_metrics(reg),
        # label values are upstream names from the configuration, never from a client
        "retrievals": Counter("moeprune_retrievals", "Requests routed, by upstream and how", ["upstream", "fell_back"],
                              registry=reg),
        "upstream_latency": Histogram("moeprune_upstream_latency_seconds",
                                      "Time to the upstream's response headers", ["upstream"], registry=reg),
        "upstream_errors": Counter("moeprune_upstream_errors", "Upstream failures and error responses",
                                   ["upstream", "kind"], registry=reg),
        "healthy": Gauge("moeprune_upstream_healthy", "1 if the upstream answered its last health check",
                         ["upstream"], registry=reg),
        "in_flight": Gauge("moeprune_requests_in_flight", "Requests being proxied", registry=reg),
        "retrieval_seconds": Histogram("moeprune_retrieval_seconds", "Signature and store search time",
                                       registry=reg),
        # the pool of swappable engines: engine names (engine0, ...) come from the configuration
        "swaps": Counter("moeprune_swaps", "Engine swaps to another pattern, by outcome", ["engine", "outcome"],
                         registry=reg),
        "swap_bytes": Counter("moeprune_swap_bytes_read", "Checkpoint bytes read by successful swaps", ["engine"],
                              registry=reg),
        "swap_seconds": Histogram("moeprune_swap_seconds", "Time of a successful swap, pause to resume",
                                  ["engine"], registry=reg, buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)),
        "queue_wait": Histogram("moeprune_queue_wait_seconds", "Time a request waited for a pool engine",
                                registry=reg),
        "waiting": Gauge("moeprune_requests_waiting", "Requests waiting for a pool engine", registry=reg),
    }


# ---------------------------------------------------------------------------------------------- routing
@dataclass
class Route:
    upstream: Upstream | None  # None: a pool engine, chosen when admitted
    name: str  # the pattern served ("fallback" for the fallback upstream)
    fell_back: bool
    details: dict = field(default_factory=dict)
    release: Callable[[], None] | None = None  # the pool admission, released when the request ends

    def info(self) -> dict:
        return {"pattern": self.name, "fell_back": self.fell_back, "upstream": self.upstream.name, **self.details}


class Router:
    """Chooses each request's upstream: pinned by the model id, or retrieved from its text."""

    def __init__(self, store, signature_model, tokenizer, config: RouteConfig):
        self.store, self.model, self.tok, self.config = store, signature_model, tokenizer, config
        self.upstreams = {name: Upstream(name, url) for name, url in config.upstreams.items()}
        self.fallback = Upstream(FALLBACK, config.fallback) if config.fallback else None
        for name in self.upstreams:
            if name not in store.names():
                raise MoepruneError(f"--upstream {name}: the store {store.path} holds no pattern {name!r} "
                                    f"(it holds {', '.join(store.names()) or 'none'})")
        self.pool = None
        if config.engines is not None:
            from .multiplex import Engine, Multiplexer

            self.pool = Multiplexer([Engine(f"engine{i}", url, index=i) for i, url in enumerate(config.engines)],
                                    store, config.max_queue, config.queue_timeout)

    def all(self) -> list[Upstream]:
        return [*self.upstreams.values(), *([self.fallback] if self.fallback else []),
                *(self.pool.engines if self.pool else [])]

    def served(self) -> list[str]:
        """The patterns that can be pinned: fixed upstreams', then (with a pool) every stored one."""
        return [*self.upstreams, *(n for n in (self.store.names() if self.pool else []) if n not in self.upstreams)]

    def model_ids(self) -> list[str]:
        base = self.config.model_name
        return [base, *([f"{base}:full"] if self.fallback else []), *(f"{base}:{n}" for n in self.served())]

    def choose(self, model_field: str | None, queries: list) -> Route:
        base = self.config.model_name
        head, _, name = (model_field or base).partition(":")
        if head != base:
            raise APIError(404, f"unknown model {model_field!r}; this server serves {base!r} (see GET /v1/models)",
                           code="model_not_found", param="model")
        if name == "full":
            if self.fallback is None:
                raise APIError(404, "this front has no fallback upstream serving the full model",
                               code="model_not_found", param="model")
            return Route(self.fallback, FALLBACK, False, {"reason": "requested"})
        if name:
            if name in self.upstreams:
                return Route(self.upstreams[name], name, False, {"reason": "pinned"})
            if self.pool is None or name not in self.store.names():
                raise APIError(404, f"no upstream serves pattern {name!r}; see GET /v1/models",
                               code="model_not_found", param="model")
            problem = self.pool.problem(name)
            if problem is not None:
                raise APIError(400, problem, code="pattern_unservable", param="model")
            return Route(None, name, False, {"reason": "pinned"})
        return self._retrieve(queries)

    def _retrieve(self, queries: list) -> Route:
        try:
            matches = self.store.search_many(queries, self.model, self.tok)
        except MoepruneError as e:
            raise APIError(503, f"pattern retrieval failed: {e}", "server_error", "retrieval_failed") from None
        names = {m.name for m in matches if not m.fell_back}
        first = matches[0]
        details = {"reason": first.reason, "score": round(first.score, 4), "confidence": round(first.confidence, 4),
                   "runner_up": first.runner_up}
        if any(m.fell_back for m in matches) or len(names) != 1:
            why = first.reason if first.fell_back else "the request's prompts retrieved different patterns"
            return self._fall_back({**details, "reason": why})
        name = names.pop()
        if name not in self.upstreams and self.pool is not None:
            problem = self.pool.problem(name)
            if problem is None:
                return Route(None, name, False, details)
            return self._fall_back({**details, "reason": f"retrieved {name}: {problem}", "retrieved": name})
        if name not in self.upstreams:
            return self._fall_back({**details, "reason": f"retrieved {name}, which no upstream serves",
                                    "retrieved": name})
        return Route(self.upstreams[name], name, False, details)

    def _fall_back(self, details: dict) -> Route:
        if self.fallback is None:
            raise APIError(503, f"no upstream for this request ({details['reason']}) and no fallback upstream",
                           "server_error", "no_upstream")
        return Route(self.fallback, FALLBACK, True, details)


def _queries(body: dict, chat: bool) -> list:
    """The texts retrieval searches with: checked just enough to route; the rest is the upstream's."""
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise APIError(400, "messages must be a non-empty list of {role, content} objects", param="messages")
        turns = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise APIError(400, f"messages[{i}] must be an object with a role", param=f"messages[{i}]")
            content = m.get("content")
            if isinstance(content, list):  # parts: their text
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            turns.append({"role": m["role"], "content": content if isinstance(content, str) else ""})
        query = retrieval_query(turns)
        if not query.strip():
            raise APIError(400, "the messages hold no text to route by", param="messages")
        return [query]
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) or _token_ids(prompt) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) or _token_ids(p) for p in prompts):
        raise APIError(400, "prompt must be a string, a list of strings, or token ids", param="prompt")
    return prompts


def _token_ids(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool)
                                                           for t in value)


# ---------------------------------------------------------------------------------------------- the app
class Front:
    """The proxying service: health checks, routing, forwarding."""

    def __init__(self, router: Router, config: RouteConfig, metrics: dict, client: httpx.AsyncClient | None = None):
        self.router, self.config, self.metrics = router, config, metrics
        timeout = httpx.Timeout(config.read_timeout, connect=config.connect_timeout)
        self.client = client or httpx.AsyncClient(timeout=timeout)
        self._own_client = client is None
        self.in_flight = 0
        self._checker: asyncio.Task | None = None
        if router.pool is not None:
            from .multiplex import HTTPEngineControl

            router.pool.metrics = metrics
            for e in router.pool.engines:
                if e.control is None:
                    e.control = HTTPEngineControl(e.url, self.client, config.source, config.swap_timeout,
                                                  self._headers())

    def _headers(self) -> dict:
        key = self.config.upstream_api_key
        return {"authorization": f"Bearer {key}"} if key else {}

    # -------------------------------------------------------------- health
    async def check(self, upstream: Upstream) -> None:
        try:
            r = await self.client.get(upstream.endpoint("/models"), headers=self._headers(),
                                      timeout=self.config.connect_timeout)
            data = r.json().get("data") if r.status_code == 200 else None
            ids = [m.get("id") for m in data if isinstance(m, dict)] if isinstance(data, list) else []
            if r.status_code != 200 or not ids or not isinstance(ids[0], str):
                upstream.down(f"GET /v1/models answered {r.status_code} without a model id")
            else:
                upstream.model_id, upstream.healthy = ids[0], True
                if getattr(upstream, "state", "") != "failed":  # a pool engine out of service keeps its reason
                    upstream.problem = ""
        except (httpx.HTTPError, ValueError, AttributeError) as e:
            upstream.down(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
        upstream.checked = time.monotonic()
        self.metrics["healthy"].labels(upstream.name).set(1 if upstream.healthy else 0)

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(u) for u in self.router.all()))
        if self.router.pool is not None:  # engines that did not tell their resident pattern yet, then waiters
            await self.router.pool.learn()

    async def _keep_checking(self) -> None:
        while True:
            await asyncio.sleep(self.config.health_interval)
            await self.check_all()

    async def start(self) -> None:
        await self.check_all()
        for u in self.router.all():
            if not u.healthy:
                log.warning("moeprune route: upstream %s (%s) is not answering yet: %s", u.name, u.url, u.problem)
        self._checker = asyncio.create_task(self._keep_checking())

    async def stop(self) -> None:
        if self.router.pool is not None:
            await self.router.pool.stop()
        if self._checker is not None:
            self._checker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checker
        if self._own_client:
            await self.client.aclose()

    # -------------------------------------------------------------- proxy
    async def forward(self, request: Request, path: str, body: dict, route: Route) -> Response:
        up = route.upstream
        if not up.healthy or up.model_id is None:
            self.metrics["upstream_errors"].labels(up.name, "down").inc()
            raise up.unavailable()
        if self.in_flight >= self.config.max_in_flight:
            raise APIError(429, f"the front is proxying {self.in_flight} requests, its limit; retry shortly",
                           "rate_limit_error", "too_many_requests")
        self.in_flight += 1
        self.metrics["in_flight"].set(self.in_flight)
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.in_flight -= 1
                self.metrics["in_flight"].set(self.in_flight)
                if route.release is not None:
                    route.release()

        try:
            response = await self._forward(request, path, {**body, "model": up.model_id}, route, release)
        except BaseException:
            release()
            raise
        if not isinstance(response, StreamingResponse):  # a stream releases when it ends
            release()
        return response

    async def _forward(self, request: Request, path: str, body: dict, route: Route, release) -> Response:
        up = route.upstream
        headers = {"x-moeprune-pattern": route.name, "x-moeprune-fallback": str(route.fell_back).lower(),
                   "x-moeprune-upstream": up.name}
        req = self.client.build_request("POST", up.endpoint(path), json=body,
                                        headers={**self._headers(), "accept": request.headers.get("accept", "*/*")})
        t0 = time.perf_counter()
        sending = asyncio.ensure_future(self.client.send(req, stream=True))
        gone = asyncio.ensure_future(_client_gone(request))
        try:
            done, _ = await asyncio.wait({sending, gone}, return_when=asyncio.FIRST_COMPLETED)
            if sending not in done:  # the client left before the upstream answered: cancel the upstream request
                response = await _cancel(sending)
                if response is not None:  # it answered just as the client left
                    await response.aclose()
                release()
                return Response(status_code=499)
            resp = sending.result()
        except httpx.TimeoutException as e:
            self.metrics["upstream_errors"].labels(up.name, "timeout").inc()
            raise APIError(504, f"upstream {up.name} ({up.url}) did not answer in time: {type(e).__name__}",
                           "server_error", "upstream_timeout") from None
        except httpx.HTTPError as e:
            self.metrics["upstream_errors"].labels(up.name, "unreachable").inc()
            raise up.down(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__) from None
        finally:
            if not gone.done():
                gone.cancel()
        self.metrics["upstream_latency"].labels(up.name).observe(time.perf_counter() - t0)
        if resp.status_code >= 400:
            self.metrics["upstream_errors"].labels(up.name, str(resp.status_code)).inc()
        if body.get("stream") is True and resp.status_code == 200:
            async def chunks():
                try:
                    async for chunk in resp.aiter_raw():
                        yield chunk
                finally:  # also when the client goes away mid-stream: the upstream connection closes
                    await resp.aclose()
                    release()

            return StreamingResponse(chunks(), status_code=200, headers=headers,
                                     media_type=resp.headers.get("content-type", "text/event-stream"))
        try:
            raw = await _read_or_leave(request, resp)
        finally:
            await resp.aclose()
            release()
        if raw is None:
            return Response(status_code=499)
        kind = resp.headers.get("content-type", "application/json")
        if resp.status_code == 200 and kind.startswith("application/json"):
            try:
                data = json.loads(raw)
            except ValueError:
                data = None
            if isinstance(data, dict):
                data["moeprune"] = route.info()
                return JSONResponse(data, headers=headers)
        return Response(raw, status_code=resp.status_code, media_type=kind, headers=headers)


async def _read_or_leave(request: Request, resp) -> bytes | None:
    """The upstream's whole body, or None when the client disconnects first (the read is cancelled)."""
    reading = asyncio.ensure_future(resp.aread())
    gone = asyncio.ensure_future(_client_gone(request))
    done, _ = await asyncio.wait({reading, gone}, return_when=asyncio.FIRST_COMPLETED)
    for task in (reading, gone):
        if task not in done:
            await _cancel(task)
    return reading.result() if reading in done else None


async def _acquire_or_leave(request: Request, pool, name: str):
    """A pool lease for pattern `name`, or None when the client disconnects while it waits."""
    acquiring = asyncio.ensure_future(pool.acquire(name))
    gone = asyncio.ensure_future(_client_gone(request))
    done, _ = await asyncio.wait({acquiring, gone}, return_when=asyncio.FIRST_COMPLETED)
    if acquiring in done:
        await _cancel(gone)
        return acquiring.result()
    lease = await _cancel(acquiring)
    if lease is not None:  # admitted just as the client left
        lease.release()
    return None


async def _cancel(task: asyncio.Future):
    """Cancel `task` and wait until it has stopped (a cancellation of the caller still propagates);
    its result if it finished first, else None."""
    task.cancel()
    await asyncio.wait({task})
    if task.cancelled() or task.exception() is not None:
        return None
    return task.result()


def create_route_app(router: Router, config: RouteConfig, client: httpx.AsyncClient | None = None):
    """The ASGI application of the front (FastAPI behind the same Gate as `moeprune serve`)."""
    from contextlib import asynccontextmanager

    metrics = _metrics()
    front = Front(router, config, metrics, client)

    @asynccontextmanager
    async def lifespan(app):
        await front.start()
        yield
        await front.stop()

    app = FastAPI(title="moeprune route", lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None)
    app.state.front = front

    add_error_handlers(app)

    @app.get("/health")
    async def health():
        ups = {u.name: {"url": u.url, "healthy": u.healthy, "model": u.model_id,
                        **({"problem": u.problem} if not u.healthy or getattr(u, "state", "") == "failed" else {}),
                        **(u.status() if hasattr(u, "status") else {})}
               for u in router.all()}
        ok = all(u.healthy and getattr(u, "state", "ready") == "ready" for u in router.all())
        extra = {"waiting": router.pool.waiting} if router.pool is not None else {}
        return JSONResponse({"status": "ok" if ok else "degraded", "upstreams": ups, **extra})

    @app.get("/v1/models")
    async def models():
        now = int(time.time())
        return {"object": "list", "data": [{"id": i, "object": "model", "created": now, "owned_by": "moeprune"}
                                           for i in router.model_ids()]}

    @app.get("/metrics")
    async def metrics_route():
        from prometheus_client import generate_latest

        return PlainTextResponse(generate_latest(metrics["registry"]).decode(), media_type="text/plain; version=0.0.4")

    async def handle(request: Request, path: str, chat: bool) -> Response:
        body = parse_json(await request.body())
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise APIError(400, f"model must be a string, got {type(model).__name__}", param="model")
        stream = body.get("stream", False)
        if stream is not None and not isinstance(stream, bool):
            raise APIError(400, "stream must be true or false", param="stream")
        queries = _queries(body, chat)
        t0 = time.perf_counter()
        if (model or config.model_name).partition(":")[2]:
            route = router.choose(model, queries)
        else:
            route = await run_in_threadpool(router.choose, model, queries)
            metrics["retrieval_seconds"].observe(time.perf_counter() - t0)
        if route.upstream is None:  # a pool engine: wait for one holding the pattern
            metrics["waiting"].inc()
            try:
                lease = await _acquire_or_leave(request, router.pool, route.name)
            finally:
                metrics["waiting"].dec()
            if lease is None:  # the client hung up while queued: its place (and any claim) is given back
                return Response(status_code=499)
            route.upstream, route.release = lease.engine, lease.release
            route.details.update(lease.info())
        metrics["retrievals"].labels(route.upstream.name, str(route.fell_back).lower()).inc()
        try:
            return await front.forward(request, path, body, route)
        except BaseException:
            if route.release is not None:  # refused before the proxying began (idempotent otherwise)
                route.release()
            raise

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, "/completions", chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, "/chat/completions", chat=True)

    return Gate(app, config, metrics)


def route(model: str, store_path: str, upstreams: dict[str, str], fallback: str | None = None,
          host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, upstream_api_key: str | None = None,
          dtype=None, device: str = "cpu", threads: int | None = None, log_level: str = "info",
          engines: list[str] | None = None, max_queue: int = 256, queue_timeout: float = 300.0,
          swap_timeout: float = 600.0) -> None:
    """Load the signature model (on `device`) and the store and run the front until Ctrl-C. `threads`:
    torch's CPU threads for retrieval (fewer than the cores keeps a busy front's retrievals short).
    `engines`: a pool of swappable engines (their /v1 URLs), which swap experts in from `model`."""
    import os
    import sys

    import uvicorn

    from ..models import load_tokenizer
    from ..store import PatternStore
    from ..store.signature import load_signature_model

    check_port(port)
    api_key = api_key or os.environ.get("MOEPRUNE_API_KEY")
    name = os.path.basename(os.path.normpath(str(model))) or "model"
    source = os.path.abspath(model) if os.path.isdir(model) else model  # the engines' workers read it
    config = RouteConfig(model_name=name, upstreams=upstreams, fallback=fallback, api_key=api_key,
                         upstream_api_key=upstream_api_key, engines=engines,
                         source=source if engines is not None else None, max_queue=max_queue,
                         queue_timeout=queue_timeout, swap_timeout=swap_timeout)
    store = PatternStore(store_path, on_corrupt="skip")
    store.info()  # fail fast on a missing or broken store
    if not is_loopback(host) and not api_key:
        print(f"moeprune: warning: routing on {host} without an API key: anyone who can reach this address can "
              f"use the upstreams (set --api-key or MOEPRUNE_API_KEY)", file=sys.stderr)
    for url in engines or []:
        if not is_loopback(httpx.URL(url).host):
            print(f"moeprune: warning: engine {url} is not on loopback: vLLM's dev-mode control routes "
                  f"(/pause, /collective_rpc) are open to anyone who reaches it; keep it on a private network",
                  file=sys.stderr)
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise MoepruneError(f"--threads must be an integer >= 1, got {threads!r}")
        import torch

        torch.set_num_threads(threads)
    signature_model = load_signature_model(model, dtype=dtype, device=device)
    if signature_model.moeprune_source_fingerprint != store.manifest["fingerprint"]:
        raise MoepruneError(f"the store {store_path} holds patterns of another model")
    router = Router(store, signature_model, load_tokenizer(model), config)
    uvicorn.run(create_route_app(router, config), host=host, port=port, log_level=log_level,
                timeout_graceful_shutdown=30)
