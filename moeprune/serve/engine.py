"""The generation worker: a bounded queue of requests, batched by pattern, run on one thread.

Requests that share a pattern and generation settings are batched into one `generate` call;
each batch runs inside `ExpertPool.serve(pattern)`, so only that pattern's experts can be chosen
and the pool loads only the experts it lacks. Streaming requests push their row's tokens to
their client as they come; a client that goes away sets `cancelled` and its row stops at the
next token.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from ..errors import MoepruneError
from ..pattern import Pattern
from .residency import ExpertPool


class QueueFull(MoepruneError):
    """The server is at its queue limit."""


@dataclass
class Job:
    pattern: Pattern
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    seed: int | None
    stream: bool
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue  # ("token", ids) ... then ("done", (text, ids, finish_reason)) or ("error", message)
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued: float = field(default_factory=time.perf_counter)

    def key(self) -> tuple:
        return (tuple(map(tuple, self.pattern.kept.values())), self.max_tokens,
                self.temperature, self.top_p, self.stop, self.seed)

    def emit(self, kind: str, payload) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))


class _Cancelled(StoppingCriteria):
    def __init__(self, jobs: list[Job]):
        self.jobs = jobs

    def __call__(self, input_ids, scores, **kwargs):
        done = torch.tensor([j.cancelled.is_set() for j in self.jobs], device=input_ids.device)
        return done


class _Streamer:
    """transformers' streamer protocol: the first put() is the prompts, later ones one new token per row;
    each streaming request of the batch gets its row's tokens."""

    def __init__(self, jobs: list[Job]):
        self.jobs, self.first = jobs, True

    def put(self, value: torch.Tensor) -> None:
        if self.first:
            self.first = False
            return
        tokens = value.reshape(len(self.jobs), -1).tolist()
        for job, row in zip(self.jobs, tokens, strict=True):
            if job.stream and not job.cancelled.is_set():
                job.emit("token", row)

    def end(self) -> None:
        pass


def cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    cuts = [text.find(s) for s in stop if s and s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


class Engine:
    def __init__(self, pool: ExpertPool, tokenizer, max_batch: int = 8, max_queue: int = 64,
                 batch_wait: float = 0.02):
        self.pool, self.tokenizer = pool, tokenizer
        # After the first request, wait up to this long for requests still being parsed to join its batch;
        # with none on the way (a lone client) there is no wait at all.
        self.batch_wait = batch_wait
        self.arriving = 0
        self.max_batch, self.max_queue = max_batch, max_queue
        self._queue: queue.Queue[Job] = queue.Queue()
        self._pending: list[Job] = []
        self._lock = threading.Lock()
        self._accepting = True
        self._busy = 0
        self._stop = threading.Event()
        self.batch_sizes: list[int] = []  # recent batch sizes, for /metrics
        self.stopped_early = 0  # generations cut short because their client went away, for /metrics
        self._thread = threading.Thread(target=self._run, name="moeprune-generate", daemon=True)
        self._thread.start()
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (tokenizer.eos_token_id or 0)

    # -------------------------------------------------------------- submission
    @property
    def depth(self) -> int:
        return self._queue.qsize() + len(self._pending) + self._busy

    def arrive(self, delta: int) -> None:
        """The HTTP layer counts requests it has accepted but not yet submitted (or refused)."""
        with self._lock:
            self.arriving += delta

    def submit(self, job: Job) -> None:
        with self._lock:
            if not self._accepting:
                raise MoepruneError("the server is shutting down")
            if self._queue.qsize() + len(self._pending) >= self.max_queue:
                raise QueueFull(f"the request queue is full ({self.max_queue} waiting); retry later")
            self._queue.put(job)

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop taking requests, let the queued and running ones finish, stop the worker."""
        with self._lock:
            self._accepting = False
        deadline = time.monotonic() + timeout
        while self.depth and time.monotonic() < deadline:
            time.sleep(0.05)
        self._stop.set()
        self._thread.join(timeout=5)

    # -------------------------------------------------------------- worker
    def _next_batch(self) -> list[Job]:
        while not self._pending:
            try:
                self._pending.append(self._queue.get(timeout=0.1))
            except queue.Empty:
                if self._stop.is_set():
                    return []
        deadline = time.monotonic() + self.batch_wait
        while len(self._pending) < self.max_batch:  # take what is waiting, and what is on its way
            try:
                self._pending.append(self._queue.get_nowait())
                continue
            except queue.Empty:
                pass
            if self.arriving <= 0 or time.monotonic() >= deadline:
                break
            time.sleep(0.0005)
        first = self._pending.pop(0)
        batch = [first]
        for job in list(self._pending):
            if len(batch) >= self.max_batch:
                break
            if job.key() == first.key():
                batch.append(job)
                self._pending.remove(job)
        return batch

    def _run(self) -> None:
        while not self._stop.is_set():
            batch = self._next_batch()
            if not batch:
                continue
            batch = [j for j in batch if not j.cancelled.is_set()]
            if not batch:
                continue
            self._busy = len(batch)
            self.batch_sizes = (self.batch_sizes + [len(batch)])[-1000:]
            try:
                self._generate(batch)
            except Exception as e:  # report to every client of the batch; keep serving
                for job in batch:
                    job.emit("error", str(e).splitlines()[0] if str(e) else type(e).__name__)
            finally:
                self._busy = 0

    def _generate(self, batch: list[Job]) -> None:
        job0 = batch[0]
        width = max(len(j.prompt_ids) for j in batch)
        ids = torch.tensor([[self.pad_id] * (width - len(j.prompt_ids)) + j.prompt_ids for j in batch])
        mask = torch.tensor([[0] * (width - len(j.prompt_ids)) + [1] * len(j.prompt_ids) for j in batch])
        device = next(self.pool.model.parameters()).device
        kwargs = dict(max_new_tokens=job0.max_tokens, pad_token_id=self.pad_id,
                      stopping_criteria=StoppingCriteriaList([_Cancelled(batch)]))
        if job0.temperature > 0:
            kwargs.update(do_sample=True, temperature=job0.temperature, top_p=job0.top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if job0.stop:
            kwargs.update(stop_strings=list(job0.stop), tokenizer=self.tokenizer)
        if any(j.stream for j in batch):
            kwargs["streamer"] = _Streamer(batch)
        if job0.seed is not None:
            torch.manual_seed(job0.seed)
        with self.pool.serve(job0.pattern), torch.no_grad():
            out = self.pool.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
        eos = self.tokenizer.eos_token_id
        for row, job in enumerate(batch):
            new = out[row, width:].tolist()
            if job.cancelled.is_set() and len(new) < job.max_tokens and (eos is None or eos not in new):
                self.stopped_early += 1
            if eos is not None and eos in new:
                new, finish = new[: new.index(eos)], "stop"
            else:
                finish = "length" if len(new) >= job.max_tokens else "stop"
            text = self.tokenizer.decode(new, skip_special_tokens=True)
            text, stopped = cut_at_stop(text, job.stop)
            if stopped:
                finish = "stop"
            job.emit("done", (text, new, finish))
