"""OpenAI-compatible HTTP server that answers every request with only the experts its task needs.

The parts, each testable alone: `protocol` parses and validates requests, `Service` chooses each
prompt's pattern and runs its sequences on the `Engine`, `responses` builds bodies and SSE chunks,
and `Gate` (the outermost ASGI layer) enforces the body limit and the API key and counts every
response with its real status under a route template. `create_app` wires them into FastAPI.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import os
import sys
import time
import uuid
from dataclasses import dataclass, field, replace

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..budget import resolve_count
from ..errors import MoepruneError
from ..pattern import Pattern
from ..prompts import render
from . import responses
from .engine import Engine, Job, QueueFull
from .params import Result, SamplingParams, TokenLogprob
from .protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    Limits,
    check_length,
    check_token_ids,
    parse_chat,
    parse_completion,
    parse_json,
    retrieval_query,
)
from .residency import ExpertPool

log = logging.getLogger("moeprune")

ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")
_OPEN_ROUTES = ("/health",)  # answered without the API key: load balancers probe it


@dataclass
class ServeConfig:
    model_name: str
    api_key: str | None = None
    max_batch: int = 8
    max_queue: int = 64
    max_body_bytes: int = 4 * 2**20
    max_prompt_tokens: int = 2048
    max_tokens_cap: int = 512
    default_max_tokens: int = 64
    max_n: int = 8
    max_prompts: int = 8

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_queue", "max_body_bytes", "max_prompt_tokens", "max_tokens_cap",
                     "default_max_tokens", "max_n", "max_prompts"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MoepruneError(f"{name.replace('_', '-')} must be an integer >= 1, got {value!r}")


# ---------------------------------------------------------------------------------------------- metrics
def _metrics():
    from prometheus_client import CollectorRegistry, Counter, Gauge

    reg = CollectorRegistry()
    return {
        **gate_metrics(reg),
        "tokens": Counter("moeprune_tokens", "Tokens processed", ["kind"], registry=reg),
        "retrievals": Counter("moeprune_retrievals", "Patterns chosen per prompt", ["pattern", "fell_back"],
                              registry=reg),
        "loads": Gauge("moeprune_expert_loads", "Experts loaded into the pool since start", registry=reg),
        "evictions": Gauge("moeprune_expert_evictions", "Experts evicted from the pool since start", registry=reg),
        "bytes": Gauge("moeprune_expert_bytes_read", "Expert bytes read from the checkpoint", registry=reg),
        "resident": Gauge("moeprune_resident_experts", "Experts resident in the pool", registry=reg),
        "queue": Gauge("moeprune_queue_depth", "Sequences waiting or running", registry=reg),
        "batch": Gauge("moeprune_mean_batch_size", "Mean sequences per batch (last 1000)", registry=reg),
        "stopped": Gauge("moeprune_generations_stopped_early",
                         "Generations cut short because the client went away", registry=reg),
        "skipped": Gauge("moeprune_store_skipped_entries", "Store entries left out because they are corrupt",
                         registry=reg),
    }


def gate_metrics(reg) -> dict:
    """The metrics the `Gate` keeps for every response (shared by `serve` and `route`)."""
    from prometheus_client import Counter, Histogram

    return {
        "registry": reg,
        "requests": Counter("moeprune_requests", "HTTP responses by route template and status",
                            ["endpoint", "status"], registry=reg),
        "latency": Histogram("moeprune_request_latency_seconds", "Request latency", ["endpoint"], registry=reg),
    }


# ---------------------------------------------------------------------------------------------- the gate
def _json_bytes(e: APIError) -> bytes:
    return json.dumps(e.body()).encode()


class Gate:
    """Outermost ASGI layer: body-size limit, API key, and a metric sample for every response.

    It reads a request's whole body (our routes need all of it) before the application sees it, so
    an oversized body is refused without being stored; the API key is compared in constant time."""

    def __init__(self, app, config: ServeConfig, metrics: dict):
        self.app, self.config, self.metrics = app, config, metrics
        self._key = config.api_key.encode() if config.api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        label = scope["path"] if scope["path"] in ROUTES else "other"  # never a client-chosen label
        status: list[int] = []
        t0 = time.perf_counter()

        async def counted_send(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            problem = self._refuse_auth(scope)
            if problem is None:
                body, problem = await self._read_body(scope, receive)
            if problem is not None:
                if problem.status:  # status 0: the client went away while sending
                    await _send_error(counted_send, problem)
                return
            sent = False

            async def replay():
                nonlocal sent
                if not sent:
                    sent = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await self.app(scope, replay, counted_send)
        except Exception:  # a bug: the client still gets an OpenAI error body, and it is counted
            log.exception("moeprune: request %s %s failed", scope.get("method"), scope["path"])
            if not status:
                await _send_error(counted_send, APIError(500, "internal server error", "server_error"))
        finally:
            code = str(status[0]) if status else "499"  # no response: the client left first
            self.metrics["requests"].labels(label, code).inc()
            self.metrics["latency"].labels(label).observe(time.perf_counter() - t0)

    def _refuse_auth(self, scope) -> APIError | None:
        if self._key is None or scope["path"] in _OPEN_ROUTES:
            return None
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.strip().partition(b" ")
        # compare_digest on the token alone: the time taken tells nothing about the key
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._key):
            return None
        return APIError(401, "missing or wrong API key (send Authorization: Bearer <key>)", "authentication_error",
                        "invalid_api_key")

    async def _read_body(self, scope, receive) -> tuple[bytes, APIError | None]:
        limit = self.config.max_body_bytes
        too_big = APIError(413, f"the request body exceeds this server's limit of {limit} bytes",
                           code="request_too_large")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return b"", too_big if length.isdigit() else APIError(400, "invalid Content-Length header")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"", APIError(0, "")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return b"", too_big
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), None


async def _send_error(send, e: APIError) -> None:
    data = _json_bytes(e)
    await send({"type": "http.response.start", "status": e.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


# ---------------------------------------------------------------------------------------------- the service
@dataclass
class Choice:
    """The pattern a prompt is served with, and why."""

    pattern: Pattern
    name: str
    fell_back: bool
    details: dict = field(default_factory=dict)

    def info(self) -> dict:
        return {"pattern": self.name, "fell_back": self.fell_back, **self.details}


@dataclass
class Prompt:
    ids: list[int]
    text: str  # what `echo` returns
    choice: Choice | None = None
    max_tokens: int = 0


class ClientGone(Exception):
    """The client disconnected before its response was ready."""


class Service:
    """Everything between a parsed request and its response body."""

    def __init__(self, pool: ExpertPool, store, config: ServeConfig, metrics: dict, engine: Engine | None = None):
        tok = pool.tokenizer
        if tok is None:
            raise MoepruneError(f"{pool.path} has no tokenizer: the server needs one")
        self.pool, self.store, self.config, self.metrics, self.tok = pool, store, config, metrics, tok
        self.engine = engine or Engine(pool, tok, max_batch=config.max_batch, max_queue=config.max_queue)
        ctx = self.engine.context_length
        self.limits = Limits(max_tokens_cap=config.max_tokens_cap, default_max_tokens=config.default_max_tokens,
                             context_length=ctx, max_prompt_tokens=min(config.max_prompt_tokens, ctx),
                             max_n=config.max_n, max_prompts=config.max_prompts)
        # A prompt longer than this many characters has more tokens than the limit whatever they are:
        # no token of the vocabulary spells more characters than its longest entry.
        longest = max((len(t) for t in tok.get_vocab()), default=1)
        self.max_prompt_chars = self.limits.max_prompt_tokens * max(longest, 1)
        self.vocab_size = len(tok)
        self._token_text_cache: dict[int, str] = {}

    # -------------------------------------------------------------- prompts
    async def encode(self, text: str, param: str = "prompt") -> list[int]:
        if len(text) > self.max_prompt_chars:
            raise APIError(400, f"the prompt has {len(text)} characters, more than {self.limits.max_prompt_tokens} "
                           f"tokens of this model can hold", param=param, code="context_length_exceeded")
        ids = await run_in_threadpool(lambda: self.tok(text, add_special_tokens=True, verbose=False)["input_ids"])
        if not ids:
            raise APIError(400, "the prompt is empty", param=param)
        return list(ids)

    def token_text(self, token_id: int) -> str:
        text = self._token_text_cache.get(token_id)
        if text is None:
            text = self.tok.decode([token_id])
            if len(self._token_text_cache) < 1_000_000:  # bounded by the vocabulary anyway
                self._token_text_cache[token_id] = text
        return text

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    async def completion_prompts(self, req: CompletionRequest) -> list[Prompt]:
        check_token_ids(req.prompts, self.vocab_size)
        out = []
        for p in req.prompts:
            if isinstance(p, str):
                out.append(Prompt(await self.encode(p), p))
            else:
                out.append(Prompt(list(p), self.decode(list(p))))
        for p in out:
            p.max_tokens = self.room(len(p.ids), req.params.max_tokens, req.max_tokens_given, "prompt")
        return out

    def room(self, n_prompt: int, max_tokens: int, given: bool, param: str) -> int:
        """The tokens a prompt may generate: what the client asked for, or the default shortened to fit
        the context (as vLLM does); 400 when even that does not fit."""
        if not given:
            max_tokens = max(1, min(max_tokens, self.limits.context_length - n_prompt))
        check_length(n_prompt, max_tokens, self.limits, param=param)
        return max_tokens

    async def chat_prompt(self, req: ChatRequest) -> Prompt:
        if getattr(self.tok, "chat_template", None):
            text = self.tok.apply_chat_template(req.messages, tokenize=False, add_generation_prompt=True)
        else:
            text = render(req.messages, self.tok) + "\nassistant:"
        p = Prompt(await self.encode(text, "messages"), text)
        p.max_tokens = self.room(len(p.ids), req.params.max_tokens, req.max_tokens_given, "messages")
        return p

    # -------------------------------------------------------------- patterns
    def choose(self, model_field: str | None, query: str) -> Choice:
        """The pattern for one prompt: pinned (`model:name`), all experts (`model:full`), or retrieved."""
        base, pool = self.config.model_name, self.pool
        head, _, name = (model_field or base).partition(":")
        if head != base:
            raise APIError(404, f"unknown model {model_field!r}; this server serves {base!r} (see GET /v1/models)",
                           code="model_not_found", param="model")
        if name == "full":
            if pool.budget < pool.num_experts:
                raise APIError(400, f"the full model needs {pool.num_experts} experts per layer, the expert "
                               f"budget is {pool.budget}", param="model")
            full = Pattern({layer: list(range(pool.num_experts)) for layer in pool.layers},
                           {"num_experts": pool.num_experts, "fingerprint": pool.fingerprint})
            return Choice(full, "full", False, {"reason": "requested"})
        if name:
            pinned = self.store.find(name)
            if pinned is None:
                raise APIError(404, f"no stored pattern {name!r}; see GET /v1/models", code="model_not_found",
                               param="model")
            self._check_fits(pinned, name)
            return Choice(pinned, name, False, {"reason": "pinned"})
        try:
            match = self.store.search(query, pool.model, self.tok, expert_budget=pool.budget)
        except MoepruneError as e:
            raise APIError(503, f"pattern retrieval failed: {e}", "server_error", "retrieval_failed") from None
        pattern, name = match.pattern, match.name or ("union" if match.fell_back else "?")
        reason = match.reason
        if max(pattern.counts.values()) > pool.budget:  # all experts do not fit: serve the nearest pattern
            name = max(match.votes, key=match.votes.get)
            nearest = self.store.find(name)
            if nearest is None:
                raise APIError(503, f"pattern {name!r} was removed while this request was served; retry",
                               "server_error", "pattern_removed")
            pattern, reason = nearest, f"{reason}; all experts exceed the budget of {pool.budget}, serving {name}"
        self._check_fits(pattern, name)
        details = {"reason": reason, "score": round(match.score, 4), "confidence": round(match.confidence, 4),
                   "runner_up": match.runner_up}
        return Choice(pattern, name, match.fell_back, details)

    def _check_fits(self, pattern: Pattern, name: str) -> None:
        need = max(pattern.counts.values())
        if need > self.pool.budget:  # a pattern added after start-up can be larger than the pool
            raise APIError(503, f"pattern {name!r} keeps {need} experts in a layer, more than this server's expert "
                           f"budget of {self.pool.budget}", "server_error", "pattern_too_large")

    async def choose_all(self, model_field: str | None, prompts: list[Prompt], queries: list[str]) -> None:
        for p, q in zip(prompts, queries, strict=True):
            p.choice = await run_in_threadpool(self.choose, model_field, q)
            self.metrics["retrievals"].labels(p.choice.name, str(p.choice.fell_back).lower()).inc()

    # -------------------------------------------------------------- running
    def jobs(self, prompts: list[Prompt], params: SamplingParams, n: int, stream: bool, sink) -> list[Job]:
        jobs = []
        for i, p in enumerate(prompts):
            for j in range(n):
                index = i * n + j
                # every sequence has its own generator: seed, seed+1, ... for the choices of a seeded request
                seed = None if params.seed is None else (params.seed + index) % 2**63
                jobs.append(Job(p.choice.pattern, p.ids, replace(params, seed=seed, max_tokens=p.max_tokens), index,
                                sink, stream=stream))
        return jobs

    def submit(self, jobs: list[Job]) -> None:
        try:
            self.engine.submit(jobs)
        except QueueFull as e:
            raise APIError(429, str(e), "rate_limit_error", "queue_full") from None
        except MoepruneError as e:
            raise APIError(503, str(e), "server_error", "shutting_down") from None

    async def collect(self, request: Request, jobs: list[Job], events: asyncio.Queue) -> dict[int, Result]:
        """Wait for every sequence; a client that disconnects cancels them all (ClientGone)."""
        results: dict[int, Result] = {}
        gone = asyncio.ensure_future(_client_gone(request))
        try:
            while len(results) < len(jobs):
                get = asyncio.ensure_future(events.get())
                done, _ = await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    get.cancel()
                    raise ClientGone
                index, kind, payload = get.result()
                if kind == "done":
                    results[index] = payload
                elif kind == "error":
                    raise APIError(503, f"generation failed: {payload}", "server_error", "generation_failed")
            return results
        finally:
            gone.cancel()
            for job in jobs:
                job.cancelled.set()  # no-op for finished ones; frees the slots of the rest

    def count_tokens(self, prompts: list[Prompt], completion: int) -> dict:
        prompt = sum(len(p.ids) for p in prompts)
        self.metrics["tokens"].labels("prompt").inc(prompt)
        self.metrics["tokens"].labels("completion").inc(completion)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body has been read: the next message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _sink(loop: asyncio.AbstractEventLoop, events: asyncio.Queue):
    def sink(index: int, kind: str, payload) -> None:
        loop.call_soon_threadsafe(events.put_nowait, (index, kind, payload))
    return sink


# ---------------------------------------------------------------------------------------------- the app
def add_error_handlers(app: FastAPI) -> None:
    """OpenAI error bodies for moeprune's own errors, unknown routes (404) and wrong methods (405)."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        if e.status_code == 404:
            message = (f"no route {request.method} {request.url.path}; this server serves "
                       f"{', '.join(ROUTES)}")
            return JSONResponse(APIError(404, message, code="not_found").body(), status_code=404)
        if e.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
            return JSONResponse(APIError(405, message, code="method_not_allowed").body(), status_code=405)
        return JSONResponse(APIError(e.status_code, str(e.detail)).body(), status_code=e.status_code)


def create_app(pool: ExpertPool, store, config: ServeConfig, engine: Engine | None = None):
    """The ASGI application (FastAPI behind the Gate) over an expert pool and a pattern store."""
    from contextlib import asynccontextmanager

    metrics = _metrics()
    service = Service(pool, store, config, metrics, engine)

    @asynccontextmanager
    async def lifespan(app):
        yield
        await run_in_threadpool(service.engine.shutdown)  # drain: queued and running requests finish

    app = FastAPI(title="moeprune", lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None)
    app.state.service = service

    add_error_handlers(app)

    @app.get("/health")
    async def health():
        skipped = dict(getattr(store, "skipped", {}) or {})
        return {"status": "ok", "queue": service.engine.depth,
                "store": {"patterns": len(store.names()), "skipped": skipped}}

    @app.get("/v1/models")
    async def models():
        now, base = int(time.time()), config.model_name
        ids = [base, f"{base}:full", *(f"{base}:{n}" for n in store.names())]
        return {"object": "list", "data": [{"id": i, "object": "model", "created": now, "owned_by": "moeprune"}
                                           for i in ids]}

    @app.get("/metrics")
    async def metrics_route():
        from prometheus_client import generate_latest

        s, engine_ = pool.stats, service.engine
        metrics["loads"].set(s["loads"])
        metrics["evictions"].set(s["evictions"])
        metrics["bytes"].set(s["bytes_read"])
        metrics["resident"].set(sum(s["resident"].values()))
        metrics["queue"].set(engine_.depth)
        sizes = engine_.batch_sizes
        metrics["batch"].set(sum(sizes) / len(sizes) if sizes else 0)
        metrics["stopped"].set(engine_.stopped_early)
        metrics["skipped"].set(len(getattr(store, "skipped", {}) or {}))
        return PlainTextResponse(generate_latest(metrics["registry"]).decode(), media_type="text/plain; version=0.0.4")

    @app.post("/v1/completions")
    async def completions(request: Request):
        with _Arrival(service.engine) as arrival:
            req = parse_completion(parse_json(await request.body()), service.limits)
            prompts = await service.completion_prompts(req)
            await service.choose_all(req.model, prompts, [p.text for p in prompts])
            return await _respond(service, request, req, prompts, False, arrival)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        with _Arrival(service.engine) as arrival:
            req = parse_chat(parse_json(await request.body()), service.limits)
            prompt = await service.chat_prompt(req)
            await service.choose_all(req.model, [prompt], [retrieval_query(req.messages)])
            return await _respond(service, request, req, [prompt], True, arrival)

    return Gate(app, config, metrics)


class _Arrival:
    """Counts a request the engine may soon receive, so a batch about to form waits for it (briefly)."""

    def __init__(self, engine: Engine):
        self.engine, self.open = engine, False

    def __enter__(self) -> _Arrival:
        self.engine.arrive(+1)
        self.open = True
        return self

    def done(self) -> None:
        if self.open:
            self.open = False
            self.engine.arrive(-1)

    def __exit__(self, *exc) -> None:
        self.done()


async def _respond(service: Service, request: Request, req, prompts: list[Prompt], chat: bool, arrival: _Arrival):
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    jobs = service.jobs(prompts, req.params, req.n, req.stream, _sink(loop, events))
    try:
        service.submit(jobs)
    finally:
        arrival.done()
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    model_id = req.model or service.config.model_name
    info = prompts[0].choice.info()
    if len(prompts) > 1:
        info["prompts"] = [p.choice.info() for p in prompts]
    headers = {"x-moeprune-pattern": prompts[0].choice.name,
               "x-moeprune-fallback": str(prompts[0].choice.fell_back).lower()}
    view = _View(service, req, prompts, chat, rid, model_id, info)
    if req.stream:
        return StreamingResponse(view.stream(jobs, events), media_type="text/event-stream", headers=headers)
    try:
        results = await service.collect(request, jobs, events)
    except ClientGone:
        return Response(status_code=499)  # nobody reads it; the metric records the client leaving
    return JSONResponse(view.body(results), headers=headers)


@dataclass
class _View:
    """Builds one request's response body or SSE stream from its sequences' results."""

    service: Service
    req: CompletionRequest | ChatRequest
    prompts: list[Prompt]
    chat: bool
    rid: str
    model_id: str
    info: dict

    def _prompt_of(self, index: int) -> Prompt:
        return self.prompts[index // self.req.n]

    def body(self, results: dict[int, Result]) -> dict:
        s = self.service
        usage = s.count_tokens(self.prompts, sum(len(r.token_ids) for r in results.values()))
        ordered = [results[i] for i in sorted(results)]
        created = int(time.time())
        if self.chat:
            return responses.chat_body(self.rid, created, self.model_id, ordered, usage, self.info,
                                       token_text=s.token_text, logprobs=self.req.logprobs)
        echoes = [self._prompt_of(i) for i in sorted(results)] if self.req.echo else None
        return responses.completion_body(self.rid, created, self.model_id, ordered, usage, self.info,
                                         token_text=s.token_text,
                                         echo=[(p.text, p.ids) for p in echoes] if echoes else None)

    async def stream(self, jobs: list[Job], events: asyncio.Queue):
        s, req = self.service, self.req
        created = int(time.time())
        want_lp = req.logprobs if self.chat else req.params.logprobs is not None
        texts = {j.index: responses.TextStream(s.decode, req.params.stop) for j in jobs}
        pending: dict[int, list[TokenLogprob]] = {j.index: [] for j in jobs}  # logprobs whose text is held back
        sent = {j.index: 0 for j in jobs}  # characters of each choice sent: text offsets count from here
        started: set[int] = set()  # choices whose first chunk (chat role, echoed prompt) has gone out

        def chunk(index: int, text: str, finish: str | None = None, prompt_lp=None) -> str:
            lps, pending[index] = pending[index], []
            first = index not in started
            started.add(index)
            if self.chat:
                data = responses.chat_chunk(self.rid, created, self.model_id, index, text, finish, self.info,
                                            first=first, logprobs=lps if want_lp else None, token_text=s.token_text)
            elif prompt_lp is not None:
                data = responses.completion_chunk(self.rid, created, self.model_id, index, text, None, self.info,
                                                  logprobs=prompt_lp, token_text=s.token_text, offset=0,
                                                  token_ids=self._prompt_of(index).ids)
            else:
                data = responses.completion_chunk(self.rid, created, self.model_id, index, text, finish, self.info,
                                                  logprobs=lps if want_lp else None, token_text=s.token_text,
                                                  offset=sent[index])
            sent[index] += len(text)
            return responses.sse(data)

        def opening(index: int, prompt_lp=None) -> list[str]:
            """A choice's first chunk: the echoed prompt (completions), or the role (chat)."""
            if index in started:
                return []
            if self.chat:
                return [chunk(index, "")]
            if req.echo:
                return [chunk(index, self._prompt_of(index).text, prompt_lp=prompt_lp)]
            return []

        finished, completion = 0, 0
        try:
            while finished < len(jobs):
                index, kind, payload = await events.get()
                if kind == "prompt":
                    for line in opening(index, payload if want_lp else None):
                        yield line
                elif kind == "token":
                    for line in opening(index):
                        yield line
                    token_id, lp = payload
                    if lp is not None:
                        pending[index].append(lp)
                    text = texts[index].feed(token_id)
                    if text:
                        yield chunk(index, text)
                elif kind == "done":
                    result: Result = payload
                    for line in opening(index, result.prompt_logprobs if want_lp else None):
                        yield line
                    completion += len(result.token_ids)
                    rest = texts[index].finish(result.text)
                    if rest:
                        yield chunk(index, rest)
                    yield chunk(index, "", result.finish_reason)
                    finished += 1
                else:
                    yield responses.sse_error(f"generation failed: {payload}")
                    return
            usage = s.count_tokens(self.prompts, completion)
            if req.include_usage:
                yield responses.sse(responses.usage_chunk(self.rid, created, self.model_id, usage, chat=self.chat))
            yield responses.SSE_DONE
        finally:
            for job in jobs:
                job.cancelled.set()  # a client that went away frees its sequences at their next token


# ---------------------------------------------------------------------------------------------- start-up
def check_port(port: object) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise MoepruneError(f"the port must be an integer from 1 to 65535, got {port!r}")
    return port


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_budget_fits(store, budget: int | float, num_experts: int) -> int:
    """The budget as a count per layer; refuses one that a stored pattern does not fit in."""
    count = resolve_count(budget, num_experts, "the expert budget")
    for name in store.names():
        pattern = store.find(name)
        if pattern is None:
            continue
        layer, need = max(pattern.counts.items(), key=lambda kv: kv[1])
        if need > count:
            raise MoepruneError(f"the expert budget ({count} per layer) is smaller than stored pattern {name!r} "
                                f"({need} experts in layer {layer}): raise --expert-budget to at least {need}")
    return count


def serve(model: str, store_path: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          expert_budget: float | int = 1.0, max_batch: int = 8, max_queue: int = 64, dtype=None,
          log_level: str = "info") -> None:
    """Load the pool and the store and run the server until Ctrl-C (which drains in-flight requests)."""
    import uvicorn

    from ..store import PatternStore

    check_port(port)
    api_key = api_key or os.environ.get("MOEPRUNE_API_KEY")
    name = os.path.basename(os.path.normpath(str(model))) or "model"
    config = ServeConfig(model_name=name, api_key=api_key, max_batch=max_batch, max_queue=max_queue)
    store = PatternStore(store_path, on_corrupt="skip")
    store.info()  # fail fast on a missing or broken store
    check_budget_fits(store, expert_budget, store.manifest["num_experts"])
    if not is_loopback(host) and not api_key:
        print(f"moeprune: warning: serving on {host} without an API key: anyone who can reach this address can "
              f"use the server (set --api-key or MOEPRUNE_API_KEY)", file=sys.stderr)
    pool = ExpertPool(model, expert_budget, dtype=dtype)
    if pool.fingerprint != store.manifest["fingerprint"]:
        raise MoepruneError(f"the store {store_path} holds patterns of another model")
    app = create_app(pool, store, config)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=30)
