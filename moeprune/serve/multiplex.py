"""A pool of N swappable engines behind `moeprune route`: every stored pattern is servable on one.

Each engine (a vLLM server with the `moeprune.serve.vllm_ext.ExpertSwap` worker extension) holds
one pattern's experts at a time, in a fixed number of slots per layer, and can be swapped in place
to any stored pattern with the same per-layer counts. The scheduling policy:

- a request goes to an engine that holds its pattern and is not being drained (fewest in flight);
- else, if an engine is already draining or swapping to its pattern, it queues behind that swap
  (one swap per pattern, however many requests wait for it);
- else the request claims a victim: the least recently used idle engine (unknown residents first),
  or when none is idle the least recently used engine not already claimed. A claimed engine admits
  nothing new; once its in-flight requests have finished it is swapped, then admits its waiters.
- waiters for a resident pattern are admitted before any engine is claimed for another (what is
  queued is batched); claims go first come first served; at most `max_queue` wait (then 429), none longer than
  `queue_timeout` (then 503; a claim nobody waits for any more is dropped). A failed swap takes its
  engine out of service (unknown resident, not resumed) and answers the requests that waited for
  it with a 503 naming the engine; the health checker asks it again what it holds, so an engine
  restarted on an export comes back.
- a stored pattern whose per-layer expert counts differ from the engines' slots is never swapped in:
  pinned, a 400 naming pattern and layer; retrieved, the fallback (a 503 without one).

The scheduler runs on the event loop only (no locks); its decisions are pure functions of the
engines' state, so tests drive it with a fake `EngineControl` and asyncio events.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from dataclasses import dataclass, field
from typing import Protocol

import httpx2 as httpx

from .protocol import APIError
from .route import Upstream

SWAP_METHOD = "moeprune_swap"
RESIDENT_METHOD = "moeprune_resident"


class ControlError(Exception):
    """An engine's control endpoint failed or answered something unusable."""


class EngineControl(Protocol):
    async def resident(self) -> dict:
        """{"digest": str | None (None: workers disagree), "slots": {layer: count}, "name": str | None}"""

    async def swap(self, name: str, pattern) -> dict:
        """Swap the engine's experts to `pattern`; {"bytes_read", "seconds", "experts_written"} or ControlError."""

    async def resume(self) -> None:
        """Let the engine take requests again (after a failed swap left it paused)."""


class HTTPEngineControl:
    """The control routes of vLLM in dev mode (VLLM_SERVER_DEV_MODE=1): a swap is POST /pause?mode=wait,
    /collective_rpc moeprune_swap (the ExpertSwap worker extension), /reset_prefix_cache, /resume."""

    def __init__(self, url: str, client: httpx.AsyncClient, source: str | None, timeout: float = 600.0,
                 headers: dict | None = None, prefix_retries: int = 5):
        self.root = url.rstrip("/").removesuffix("/v1")
        self.client, self.source, self.timeout = client, source, timeout
        self.headers, self.prefix_retries = headers or {}, prefix_retries

    async def _post(self, path: str, body: dict | None = None) -> httpx.Response:
        try:
            return await self.client.post(self.root + path, json=body, headers=self.headers,
                                          timeout=self.timeout + 30)
        except httpx.HTTPError as e:
            raise ControlError(f"POST {path}: {type(e).__name__}{f': {e}' if str(e) else ''}") from None

    async def _rpc(self, method: str, args: list, timeout: float | None = None) -> list:
        body = {"method": method, "args": args, **({"timeout": timeout} if timeout else {})}
        r = await self._post("/collective_rpc", body)
        if r.status_code != 200:
            raise ControlError(f"{method} answered {r.status_code}: {r.text[:300]}")
        try:
            results = r.json()["results"]
        except (ValueError, KeyError, TypeError):
            raise ControlError(f"{method} answered without a results list") from None
        if not isinstance(results, list) or not results:
            raise ControlError(f"{method} answered without a results list")
        for i, res in enumerate(results):
            if not isinstance(res, dict):
                raise ControlError(f"{method}: worker {i} answered {str(res)[:300]}")
            if "error" in res:
                raise ControlError(f"{method}: worker {i}: {str(res['error'])[:300]}")
        return results

    async def resident(self) -> dict:
        results = await self._rpc(RESIDENT_METHOD, [])
        try:
            slots = [{int(layer): len(ids) for layer, ids in res["kept"].items()} for res in results]
        except (KeyError, AttributeError, TypeError, ValueError):
            raise ControlError(f"{RESIDENT_METHOD} answered without kept experts per layer") from None
        digests = {res.get("digest") for res in results}
        if any(s != slots[0] for s in slots):
            raise ControlError(f"{RESIDENT_METHOD}: the workers hold different numbers of experts")
        same = len(digests) == 1  # workers that disagree: the resident is unknown, swapped on first use
        return {"digest": digests.pop() if same else None, "slots": slots[0],
                "name": results[0].get("name") if same else None}

    async def swap(self, name: str, pattern) -> dict:
        t0 = time.perf_counter()
        r = await self._post("/pause?mode=wait")
        if r.status_code != 200:
            raise ControlError(f"POST /pause answered {r.status_code}: {r.text[:300]}")
        arg = json.dumps({"name": name, "pattern": pattern.to_dict(), "source": self.source})
        results = await self._rpc(SWAP_METHOD, [arg], self.timeout)
        for _ in range(self.prefix_retries):
            r = await self._post("/reset_prefix_cache")
            if r.status_code == 200 and _success(r):
                break
            await asyncio.sleep(0.2)  # a cache still in use by a finishing step: retry shortly
        else:  # cached KV computed with the old experts would give wrong answers
            raise ControlError("POST /reset_prefix_cache did not succeed")
        await self.resume()
        return {"bytes_read": sum(int(x.get("bytes_read") or 0) for x in results),
                "experts_written": sum(int(x.get("experts_written") or 0) for x in results),
                "seconds": time.perf_counter() - t0}


    async def resume(self) -> None:
        r = await self._post("/resume")
        if r.status_code != 200:
            raise ControlError(f"POST /resume answered {r.status_code}: {r.text[:300]}")


def _success(r: httpx.Response) -> bool:
    try:
        data = r.json()
    except ValueError:
        return False
    return not isinstance(data, dict) or data.get("success", True) is True


@dataclass(eq=False)
class Engine(Upstream):
    """One swappable engine: an upstream (health-checked by the front) plus the scheduler's state."""

    index: int = 0
    control: EngineControl | None = None
    state: str = "starting"  # starting: resident not read yet; ready; failed (a swap failed: out of service)
    resident: str | None = None  # the stored pattern it holds; None: unknown
    digest: str | None = None
    slots: dict[int, int] | None = None
    target: str | None = None  # the pattern it was claimed for (draining, then swapping)
    swapping: bool = False
    in_flight: int = 0
    used: int = 0  # LRU tick

    @property
    def usable(self) -> bool:
        return self.state == "ready" and self.healthy

    def status(self) -> dict:
        return {"resident": self.resident, "digest": self.digest, "state": self.state, "in_flight": self.in_flight,
                **({"swapping_to" if self.swapping else "draining_for": self.target} if self.target else {})}


@dataclass(eq=False)
class _Waiter:
    name: str
    future: asyncio.Future
    t0: float = field(default_factory=time.perf_counter)
    swapped: bool = False


@dataclass
class Lease:
    """An admission to `engine`; `release()` (idempotent) when the proxied request has ended."""

    engine: Engine
    pool: Multiplexer
    waited: float
    swapped: bool
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.pool._release(self.engine)

    def info(self) -> dict:
        return {"queued_s": round(self.waited, 4), "swapped": self.swapped}


class Multiplexer:
    """Assigns requests to engines and swaps engines between stored patterns (policy: module doc)."""

    def __init__(self, engines: list[Engine], store, max_queue: int = 256, queue_timeout: float = 300.0,
                 metrics: dict | None = None):
        if not engines:
            raise ValueError("a pool needs at least one engine")
        self.engines, self.store, self.max_queue, self.queue_timeout = engines, store, max_queue, queue_timeout
        self.metrics = metrics
        self._waiting: list[_Waiter] = []
        self._tick = itertools.count(1)
        self._tasks: set[asyncio.Task] = set()

    # -------------------------------------------------------------- what the pool can serve
    @property
    def slots(self) -> dict[int, int] | None:
        return next((e.slots for e in self.engines if e.slots is not None and e.state != "failed"), None)

    def problem(self, name: str) -> str | None:
        """Why the pool cannot serve stored pattern `name` (its per-layer counts differ), or None."""
        pattern = self.store.find(name)
        if pattern is None:
            return f"the store holds no pattern {name!r}"
        slots = self.slots
        if slots is None:  # no engine has told its slots yet: the swap itself would refuse
            return None
        counts = pattern.counts
        for layer in sorted(set(slots) | set(counts)):
            if counts.get(layer) != slots.get(layer):
                return (f"pattern {name} keeps {counts.get(layer, 0)} experts in layer {layer} but the engines "
                        f"hold {slots.get(layer, 0)}; it cannot be swapped in")
        return None

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    # -------------------------------------------------------------- startup
    async def learn(self) -> None:
        """Read the resident pattern of every engine that has not told it yet, and of every failed one:
        an engine restarted on an export (its extension knows its experts again) returns to service."""
        await asyncio.gather(*(self._learn(e) for e in self.engines
                               if e.state == "starting" or (e.state == "failed" and not e.swapping)))
        self.dispatch()

    async def _learn(self, e: Engine) -> None:
        try:
            info = await e.control.resident()
        except ControlError as err:
            if e.state != "failed":  # a failed engine keeps the reason it failed
                e.problem = f"cannot read its resident pattern: {err}"
            return
        e.slots, e.digest = dict(info["slots"]), info["digest"]
        known = self.slots
        by_digest = {}
        for n in self.store.names():
            p = self.store.find(n)
            if p is not None:
                by_digest[p.digest] = n
        e.resident = by_digest.get(e.digest) if e.digest else None
        if known is not None and known != e.slots:
            layer = next(ly for ly in sorted(set(known) | set(e.slots)) if known.get(ly) != e.slots.get(ly))
            e.state, e.problem = "failed", (f"holds {e.slots.get(layer, 0)} experts in layer {layer}, the other "
                                            f"engines {known.get(layer, 0)}")
            return
        if e.state == "failed":  # it knows its experts again (restarted, or the swap failed before writing)
            try:
                await e.control.resume()  # the failed swap left it paused
            except ControlError as err:
                e.problem = f"{e.problem}; resuming it failed: {err}"
                return
            e.problem = ""
        e.state = "ready"

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for w in self._waiting:
            if not w.future.done():
                w.future.cancel()

    # -------------------------------------------------------------- admission
    async def acquire(self, name: str) -> Lease:
        """Wait for an engine holding stored pattern `name` (swapping one to it if needed)."""
        problem = self.problem(name)
        if problem is not None:
            raise APIError(503, problem, "server_error", "pattern_unservable")
        if not any(e.usable for e in self.engines):
            problems = "; ".join(f"{e.name}: {e.problem or e.state}" for e in self.engines)
            raise APIError(503, f"no engine of the pool can serve a request now ({problems})", "server_error",
                           "no_engine")
        w = _Waiter(name, asyncio.get_running_loop().create_future())
        self._waiting.append(w)
        self.dispatch()
        if not w.future.done() and len(self._waiting) > self.max_queue:
            self._forget(w)
            raise APIError(429, f"{self.max_queue} requests are waiting for an engine, the limit; retry shortly",
                           "rate_limit_error", "too_many_requests")
        try:
            done, _ = await asyncio.wait({w.future}, timeout=self.queue_timeout)
        except BaseException:
            self._forget(w)
            raise
        if not done:
            claimed = next((e for e in self.engines if e.target == name), None)
            why = (f"{claimed.name} is still {'swapping' if claimed.swapping else 'draining'} for it" if claimed
                   else "every engine is busy or being swapped to another pattern")
            self._forget(w)
            raise APIError(503, f"no engine could take pattern {name} within {self.queue_timeout:g} s ({why}); "
                           f"retry later", "server_error", "queue_timeout")
        engine = w.future.result()  # a failed swap raises its APIError here
        waited = time.perf_counter() - w.t0
        if self.metrics is not None:
            self.metrics["queue_wait"].observe(waited)
        return Lease(engine, self, waited, w.swapped)

    def _forget(self, w: _Waiter) -> None:
        """A waiter that gives up: out of the queue; an engine claimed only for it is released."""
        if w in self._waiting:
            self._waiting.remove(w)
        elif w.future.done() and not w.future.cancelled() and w.future.exception() is None:
            self._release(w.future.result())  # admitted just as it gave up
        for e in self.engines:
            if e.target is not None and not e.swapping and not any(x.name == e.target for x in self._waiting):
                e.target = None  # nobody waits for this swap any more: it admits again
        self.dispatch()

    def _release(self, e: Engine) -> None:
        e.in_flight -= 1
        e.used = next(self._tick)
        self._maybe_swap(e)
        self.dispatch()

    def dispatch(self) -> None:
        """Admit every waiter whose pattern an admitting engine holds, then claim victims for the rest,
        first come first served. Admitting first batches the requests already queued for a resident
        pattern before that engine is claimed for another (a swap per request otherwise, in a mixed
        stream); a claim still stops new admissions, so no pattern waits behind an endless stream."""
        for w in list(self._waiting):
            if w.future.done():
                self._waiting.remove(w)
                continue
            holders = [e for e in self.engines if e.usable and e.target is None and e.resident == w.name]
            if holders:
                e = min(holders, key=lambda x: (x.in_flight, x.used, x.index))
                self._waiting.remove(w)
                e.in_flight += 1
                e.used = next(self._tick)
                w.future.set_result(e)
        for w in self._waiting:
            if any(e.target == w.name for e in self.engines):
                continue  # queued behind the swap already under way
            free = [e for e in self.engines if e.usable and e.target is None]
            victims = [e for e in free if e.in_flight == 0] or free
            if not victims:
                continue
            e = min(victims, key=lambda x: (x.resident is not None, x.used, x.index))
            e.target = w.name
            w.swapped = True
            self._maybe_swap(e)
        for w in self._waiting:  # waiters of a pattern being swapped in: they waited for a swap
            w.swapped = w.swapped or any(e.target == w.name for e in self.engines)

    def _maybe_swap(self, e: Engine) -> None:
        if e.target is not None and not e.swapping and e.in_flight == 0:
            e.swapping = True
            task = asyncio.get_running_loop().create_task(self._swap(e))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _swap(self, e: Engine) -> None:
        name = e.target
        t0 = time.perf_counter()
        try:
            pattern = self.store.find(name)
            if pattern is None:
                raise ControlError(f"the store no longer holds pattern {name!r}")
            summary = await e.control.swap(name, pattern)
        except Exception as err:  # noqa: BLE001 - any failure leaves the engine in an unknown state
            text = str(err) or type(err).__name__
            e.state, e.resident, e.digest = "failed", None, None
            e.problem = f"swapping to {name} failed: {text}; out of service until restarted"
            e.target, e.swapping = None, False
            self._count(e, "failed", None, time.perf_counter() - t0)
            error = APIError(503, f"engine {e.name} ({e.url}) failed to swap to pattern {name}: {text}",
                             "server_error", "swap_failed")
            for w in [w for w in self._waiting if w.name == name]:
                self._waiting.remove(w)
                w.future.set_exception(error)
                w.future.exception()  # retrieved here too: a waiter that already left must not warn
            self.dispatch()
            return
        except BaseException:
            e.state, e.resident, e.digest, e.problem = "failed", None, None, "a swap was interrupted"
            e.target, e.swapping = None, False
            raise
        e.resident, e.digest, e.target, e.swapping = name, pattern.digest, None, False
        self._count(e, "ok", summary, time.perf_counter() - t0)
        self.dispatch()

    def _count(self, e: Engine, outcome: str, summary: dict | None, seconds: float) -> None:
        if self.metrics is None:
            return
        self.metrics["swaps"].labels(e.name, outcome).inc()
        if summary is not None:
            self.metrics["swap_bytes"].labels(e.name).inc(summary.get("bytes_read", 0))
            self.metrics["swap_seconds"].labels(e.name).observe(seconds)
