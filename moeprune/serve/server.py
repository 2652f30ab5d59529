"""OpenAI-compatible HTTP server that answers every request with only the experts its task needs.

Request and response shapes are the `openai` package's own types (as in `transformers serve`);
what is new here is the per-request retrieval, the expert pool and the masks.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from ..errors import MoepruneError
from ..pattern import Pattern
from ..prompts import render
from .engine import Engine, Job, QueueFull, cut_at_stop
from .residency import ExpertPool


@dataclass
class ServeConfig:
    model_name: str
    api_key: str | None = None
    max_batch: int = 8
    max_queue: int = 64
    max_prompt_tokens: int = 2048
    max_tokens_cap: int = 512
    default_max_tokens: int = 64


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param


def _error_response(e: APIError):
    return JSONResponse({"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}},
                        status_code=e.status)


def _metrics():
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    reg = CollectorRegistry()
    return {
        "registry": reg,
        "requests": Counter("moeprune_requests", "HTTP requests", ["endpoint", "status"], registry=reg),
        "tokens": Counter("moeprune_tokens", "Tokens processed", ["kind"], registry=reg),
        "retrievals": Counter("moeprune_retrievals", "Patterns chosen per request", ["pattern", "fell_back"],
                              registry=reg),
        "loads": Gauge("moeprune_expert_loads", "Experts loaded into the pool since start", registry=reg),
        "evictions": Gauge("moeprune_expert_evictions", "Experts evicted from the pool since start", registry=reg),
        "bytes": Gauge("moeprune_expert_bytes_read", "Expert bytes read from the checkpoint", registry=reg),
        "resident": Gauge("moeprune_resident_experts", "Experts resident in the pool", registry=reg),
        "queue": Gauge("moeprune_queue_depth", "Requests waiting or running", registry=reg),
        "latency": Histogram("moeprune_request_latency_seconds", "Request latency", ["endpoint"], registry=reg),
        "batch": Gauge("moeprune_mean_batch_size", "Mean requests per generate call (last 1000)", registry=reg),
        "stopped": Gauge("moeprune_generations_stopped_early",
                         "Generations cut short because the client went away", registry=reg),
    }


def create_app(pool: ExpertPool, store, config: ServeConfig):
    """The FastAPI application over an expert pool and a pattern store."""
    from contextlib import asynccontextmanager

    from prometheus_client import generate_latest

    tok = pool.tokenizer
    if tok is None:
        raise MoepruneError(f"{pool.path} has no tokenizer: the server needs one")
    engine = Engine(pool, tok, max_batch=config.max_batch, max_queue=config.max_queue)
    metrics = _metrics()
    base = config.model_name

    @asynccontextmanager
    async def lifespan(app):
        yield
        await run_in_threadpool(engine.shutdown)  # drain: queued and running requests finish

    app = FastAPI(title="moeprune", lifespan=lifespan)
    app.state.engine, app.state.pool, app.state.store = engine, pool, store

    @app.middleware("http")
    async def auth(request: Request, call_next):
        if config.api_key and request.url.path != "/health":
            header = request.headers.get("authorization", "")
            if header != f"Bearer {config.api_key}":
                e = APIError(401, "missing or wrong API key (send Authorization: Bearer <key>)",
                             "authentication_error", "invalid_api_key")
                metrics["requests"].labels(request.url.path, "401").inc()
                return _error_response(e)
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok", "queue": engine.depth}

    @app.get("/v1/models")
    async def models():
        now = int(time.time())
        data = [{"id": base, "object": "model", "created": now, "owned_by": "moeprune"},
                {"id": f"{base}:full", "object": "model", "created": now, "owned_by": "moeprune"}]
        data += [{"id": f"{base}:{n}", "object": "model", "created": now, "owned_by": "moeprune"}
                 for n in store.names()]
        return {"object": "list", "data": data}

    @app.get("/metrics")
    async def metrics_route():
        s = pool.stats
        metrics["loads"].set(s["loads"])
        metrics["evictions"].set(s["evictions"])
        metrics["bytes"].set(s["bytes_read"])
        metrics["resident"].set(sum(s["resident"].values()))
        metrics["queue"].set(engine.depth)
        sizes = engine.batch_sizes
        metrics["batch"].set(sum(sizes) / len(sizes) if sizes else 0)
        metrics["stopped"].set(engine.stopped_early)
        return PlainTextResponse(generate_latest(metrics["registry"]).decode(),
                                 media_type="text/plain; version=0.0.4")

    def choose_pattern(model_field: str | None, query: str) -> tuple[Pattern, str, bool, dict]:
        """(pattern, name, fell_back, details) for a request: pinned, full, or retrieved."""
        if model_field and model_field not in (base,) and ":" not in model_field:
            raise APIError(404, f"unknown model {model_field!r}; see GET /v1/models", code="model_not_found",
                           param="model")
        if model_field and ":" in model_field:
            head, name = model_field.split(":", 1)
            if head != base:
                raise APIError(404, f"unknown model {head!r}; this server serves {base!r}", code="model_not_found",
                               param="model")
            if name == "full":
                if pool.budget < pool.num_experts:
                    raise APIError(400, f"the full model needs {pool.num_experts} experts per layer, the expert "
                                   f"budget is {pool.budget}", param="model")
                full = Pattern({layer: list(range(pool.num_experts)) for layer in pool.layers},
                               {"num_experts": pool.num_experts, "fingerprint": pool.fingerprint})
                return full, "full", False, {"reason": "requested"}
            pinned = store.find(name)
            if pinned is None:
                raise APIError(404, f"no stored pattern {name!r}; see GET /v1/models", code="model_not_found",
                               param="model")
            return pinned, name, False, {"reason": "pinned"}
        match = store.search(query, pool.model, tok, expert_budget=pool.budget)
        pattern, name = match.pattern, match.name or ("union" if match.fell_back else "?")
        if max(pattern.counts.values()) > pool.budget:  # all experts do not fit: serve the nearest pattern
            name = max(match.votes, key=match.votes.get)
            pattern = store.find(name) or store.get(name).pattern  # get() names a vanished entry
            reason = match.reason + f"; all experts exceed the budget of {pool.budget}, serving {name}"
        else:
            reason = match.reason
        details = {"reason": reason, "score": round(match.score, 4), "confidence": round(match.confidence, 4),
                   "runner_up": match.runner_up}
        return pattern, name, match.fell_back, details

    def parse_common(body: dict) -> dict:
        max_tokens = body.get("max_tokens", body.get("max_completion_tokens")) or config.default_max_tokens
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise APIError(400, "max_tokens must be a positive integer", param="max_tokens")
        if max_tokens > config.max_tokens_cap:
            raise APIError(400, f"max_tokens {max_tokens} exceeds this server's cap of {config.max_tokens_cap}",
                           param="max_tokens")
        temperature = body.get("temperature", 1.0)
        top_p = body.get("top_p", 1.0)
        if temperature is None:
            temperature = 1.0
        if top_p is None:
            top_p = 1.0
        if not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
            raise APIError(400, "temperature must be between 0 and 2", param="temperature")
        if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
            raise APIError(400, "top_p must be in (0, 1]", param="top_p")
        stop = body.get("stop") or ()
        if isinstance(stop, str):
            stop = (stop,)
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
            raise APIError(400, "stop must be a string or a list of up to 4 strings", param="stop")
        seed = body.get("seed")
        if seed is not None and not isinstance(seed, int):
            raise APIError(400, "seed must be an integer", param="seed")
        if body.get("n", 1) not in (1, None):
            raise APIError(400, "only n=1 is supported", param="n")
        return {"max_tokens": max_tokens, "temperature": float(temperature), "top_p": float(top_p),
                "stop": tuple(stop), "seed": seed, "stream": bool(body.get("stream", False))}

    async def read_body(request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        return body

    def encode(text: str) -> list[int]:
        ids = tok(text, add_special_tokens=True, verbose=False)["input_ids"]
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        if len(ids) > config.max_prompt_tokens:
            raise APIError(400, f"the prompt has {len(ids)} tokens, more than this server's limit of "
                           f"{config.max_prompt_tokens}", code="context_length_exceeded")
        return ids

    async def run(endpoint: str, request: Request, chat: bool):
        t0 = time.perf_counter()
        status = "200"
        engine.arrive(+1)
        arriving = True
        try:
            body = await read_body(request)
            params = parse_common(body)
            if chat:
                messages = body.get("messages")
                if not isinstance(messages, list) or not messages or not all(
                        isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") for m in messages):
                    raise APIError(400, "messages must be a non-empty list of {role, content} objects",
                                   param="messages")
                if getattr(tok, "chat_template", None):
                    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                else:
                    text = render(messages, tok) + "\nassistant:"
                users = [m["content"] for m in messages if m["role"] == "user"]
                # retrieve from the latest user turn, with the turn before it as context
                query = "\n".join(m["content"] for m in messages[-2:]) if not users else \
                    "\n".join([*([messages[-2]["content"]] if len(messages) > 1 else []), users[-1]])
            else:
                prompt = body.get("prompt")
                if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                    prompt = prompt[0]
                if not isinstance(prompt, str):
                    raise APIError(400, "prompt must be a string", param="prompt")
                text = query = prompt
            if not query.strip():
                raise APIError(400, "the prompt is empty", param="prompt")
            ids = encode(text)
            pattern, name, fell_back, details = await run_in_threadpool(choose_pattern, body.get("model"), query)
            metrics["retrievals"].labels(name, str(fell_back).lower()).inc()
            loop = asyncio.get_running_loop()
            job = Job(pattern, ids, params["max_tokens"], params["temperature"], params["top_p"], params["stop"],
                      params["seed"], params["stream"], loop, asyncio.Queue())
            try:
                engine.submit(job)
                engine.arrive(-1)
                arriving = False
            except QueueFull as e:
                raise APIError(429, str(e), "rate_limit_error", "queue_full") from None
            except MoepruneError as e:
                raise APIError(503, str(e), "server_error", "shutting_down") from None
            info = {"pattern": name, "fell_back": fell_back, **details}
            headers = {"x-moeprune-pattern": name, "x-moeprune-fallback": str(fell_back).lower()}
            rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
            model_id = body.get("model") or base
            metrics["tokens"].labels("prompt").inc(len(ids))
            if params["stream"]:
                gen = stream(job, rid, model_id, chat, info)
                return StreamingResponse(gen, media_type="text/event-stream", headers=headers)
            try:
                kind, payload = await job.events.get()
                while kind == "token":
                    kind, payload = await job.events.get()
            except asyncio.CancelledError:
                job.cancelled.set()
                raise
            if kind == "error":
                raise APIError(500, f"generation failed: {payload}", "server_error")
            text_out, new_ids, finish = payload
            metrics["tokens"].labels("completion").inc(len(new_ids))
            usage = {"prompt_tokens": len(ids), "completion_tokens": len(new_ids),
                     "total_tokens": len(ids) + len(new_ids)}
            return JSONResponse(full_response(rid, model_id, chat, text_out, finish, usage, info), headers=headers)
        except APIError as e:
            status = str(e.status)
            return _error_response(e)
        finally:
            if arriving:
                engine.arrive(-1)
            metrics["requests"].labels(endpoint, status).inc()
            metrics["latency"].labels(endpoint).observe(time.perf_counter() - t0)

    def full_response(rid, model_id, chat, text, finish, usage, info) -> dict:
        from openai.types import Completion, CompletionChoice, CompletionUsage
        from openai.types.chat import ChatCompletion
        from openai.types.chat.chat_completion import Choice
        from openai.types.chat.chat_completion_message import ChatCompletionMessage

        now = int(time.time())
        if chat:
            obj = ChatCompletion(id=rid, created=now, model=model_id, object="chat.completion", choices=[Choice(
                index=0, finish_reason=finish, message=ChatCompletionMessage(role="assistant", content=text))],
                usage=CompletionUsage(**usage))
        else:
            obj = Completion(id=rid, created=now, model=model_id, object="text_completion", choices=[
                CompletionChoice(index=0, text=text, finish_reason=finish)], usage=CompletionUsage(**usage))
        return {**obj.model_dump(exclude_none=True), "moeprune": info}

    async def stream(job: Job, rid: str, model_id: str, chat: bool, info: dict):
        from openai.types import Completion, CompletionChoice
        from openai.types.chat import ChatCompletionChunk
        from openai.types.chat.chat_completion_chunk import Choice, ChoiceDelta

        now = int(time.time())
        hold = max((len(s) for s in job.stop), default=1) - 1  # text that could still start a stop string

        def chunk(text: str, finish: str | None) -> str:
            if chat:
                obj = ChatCompletionChunk(id=rid, created=now, model=model_id, object="chat.completion.chunk",
                                          choices=[Choice(index=0, delta=ChoiceDelta(content=text, role="assistant"),
                                                          finish_reason=finish)])
            else:
                # streamed completion chunks carry finish_reason null until the last, which the
                # (non-streaming) type does not allow: build it without validation
                choice = CompletionChoice.model_construct(index=0, text=text, finish_reason=finish, logprobs=None)
                obj = Completion.model_construct(id=rid, created=now, model=model_id, object="text_completion",
                                                 choices=[choice])
            data = obj.model_dump(exclude_none=True, warnings=False)
            if not chat:
                data["choices"][0]["finish_reason"] = finish
            return f"data: {json.dumps({**data, 'moeprune': info})}\n\n"

        generated: list[int] = []
        sent = ""
        try:
            while True:
                kind, payload = await job.events.get()
                if kind == "token":
                    generated += payload
                    eos = tok.eos_token_id
                    shown = [t for t in generated if t != eos]
                    text = tok.decode(shown, skip_special_tokens=True)
                    text, stopped = cut_at_stop(text, job.stop)
                    ready = text if stopped else text[: max(len(sent), len(text) - hold)]
                    if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
                        continue
                    if len(ready) > len(sent):
                        yield chunk(ready[len(sent):], None)
                        sent = ready
                    if stopped:
                        job.cancelled.set()
                elif kind == "done":
                    text, new_ids, finish = payload
                    if len(text) > len(sent):
                        yield chunk(text[len(sent):], None)
                    metrics["tokens"].labels("completion").inc(len(new_ids))
                    yield chunk("", finish)
                    yield "data: [DONE]\n\n"
                    return
                else:
                    yield f"data: {json.dumps({'error': {'message': str(payload), 'type': 'server_error'}})}\n\n"
                    return
        finally:
            job.cancelled.set()  # a client that went away frees its slot at the next token

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await run("/v1/completions", request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await run("/v1/chat/completions", request, chat=True)

    return app


def serve(model: str, store_path: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          expert_budget: float | int = 1.0, max_batch: int = 8, max_queue: int = 64, dtype=None,
          log_level: str = "info") -> None:
    """Load the pool and the store and run the server until Ctrl-C (which drains in-flight requests)."""
    import uvicorn

    from ..store import PatternStore

    store = PatternStore(store_path)
    store.info()  # fail fast on a missing or broken store
    pool = ExpertPool(model, expert_budget, dtype=dtype)
    if pool.fingerprint != store.manifest["fingerprint"]:
        raise MoepruneError(f"the store {store_path} holds patterns of another model")
    name = os.path.basename(os.path.normpath(str(model))) or "model"
    app = create_app(pool, store, ServeConfig(model_name=name, api_key=api_key or os.environ.get("MOEPRUNE_API_KEY"),
                                              max_batch=max_batch, max_queue=max_queue))
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=30)
