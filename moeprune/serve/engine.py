"""The generation worker: a bounded queue of sequences, batched by pattern, decoded on one thread.

Sequences whose patterns keep the same experts share a batch whatever their sampling settings:
every row samples with its own `SamplingParams` and its own `torch.Generator`, so a seeded
sequence gives the same tokens alone or batched. A batch runs inside `ExpertPool.serve(pattern)`,
so only the pattern's experts can be chosen and the pool loads only the experts it lacks.

The decode loop is ours rather than transformers' `generate`: prompts are left-padded, positions
come from the attention mask, the prompt is prefilled once and then every live row feeds one token
per step through the model's KV cache. Rows that finish (end of sequence, stop string, max_tokens,
or cancelled by their client) get their result at once and leave the batch (their cache rows are
dropped), so they neither cost compute nor affect the rows still running.

Events, called on the worker thread as `job.sink(job.index, kind, payload)`:
  "prompt" [TokenLogprob | None, ...]     streaming jobs with prompt_logprobs, after the prompt is read
  "token" (token_id, TokenLogprob | None)   streaming jobs, once per token of the final `token_ids`
  "done"  Result                           exactly one of "done" / "error" per job, at its end
  "error" message                          the job was refused, or its batch failed
A sink that raises is treated as a client gone away: its job is cancelled, the others go on.
"""

from __future__ import annotations

import inspect
import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from .._io import SERVE_KERNEL_CACHE, bound_kernel_caches
from ..errors import MoepruneError
from ..pattern import Pattern
from .params import Result, SamplingParams, TokenLogprob
from .residency import ExpertPool

log = logging.getLogger("moeprune")

# Below this a temperature divides the logits into overflow: such rows are decoded greedily.
_MIN_TEMPERATURE = 1e-5


class QueueFull(MoepruneError):
    """The server is at its queue limit."""


@dataclass
class Job:
    """One sequence to generate (one choice of one prompt of an HTTP request)."""

    pattern: Pattern
    prompt_ids: list[int]
    params: SamplingParams
    index: int  # choice index inside its HTTP request, passed back to `sink`
    sink: Callable[[int, str, object], None]  # sink(index, kind, payload), called from the worker thread
    stream: bool = False
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued: float = field(default_factory=time.perf_counter)


def _batch_key(job: Job) -> tuple:
    # Same experts (and the same model, which the pool checks once per batch) share a batch.
    return tuple((layer, tuple(ids)) for layer, ids in job.pattern.kept.items()), job.pattern.fingerprint


def _emit(job: Job, kind: str, payload: object) -> bool:
    """Send one event; False (and the job cancelled) when its sink fails, so one broken client stops alone."""
    try:
        job.sink(job.index, kind, payload)
        return True
    except Exception:
        log.exception("the event sink of sequence %d failed; cancelling it", job.index)
        job.cancelled.set()
        return False


def _eos_ids(tokenizer, model) -> set[int]:
    """Every id that ends a sequence: the tokenizer's, and the config's and generation config's (int or list)."""
    ids = {tokenizer.eos_token_id}
    for config in (model.config, getattr(model, "generation_config", None)):
        value = getattr(config, "eos_token_id", None)
        ids.update(value if isinstance(value, (list, tuple)) else [value])
    return {int(i) for i in ids if i is not None}


def _top(logprobs: torch.Tensor, k: int) -> tuple[tuple[int, float], ...]:
    """The k most likely (token id, logprob) of one position, most likely first."""
    k = min(k, logprobs.shape[-1])
    if k <= 0:
        return ()
    values, ids = torch.topk(logprobs, k)
    return tuple(zip(ids.tolist(), values.tolist(), strict=True))


class _Row:
    """The decoding state of one job in a batch."""

    def __init__(self, job: Job, device: torch.device):
        p = job.params
        self.job, self.params = job, p
        self.ids: list[int] = []
        self.logprobs: list[TokenLogprob] | None = [] if p.logprobs is not None else None
        self.prompt_logprobs: list[TokenLogprob | None] | None = None
        self.stops = tuple(s for s in p.stop if s)  # an empty stop string would match everywhere: ignored
        self.longest_stop = max((len(s) for s in self.stops), default=0)
        self.text: str | None = None  # set when a stop string cut it
        self.prev_text = ""  # the generated text at the last stop check
        self.checked = 0  # length of prev_text's settled prefix (see _check_stop)
        self.finish: str | None = None
        self.reported = False  # its "done" or "error" was sent
        self.penalised = p.presence_penalty != 0 or p.frequency_penalty != 0
        self.counts: torch.Tensor | None = None  # per vocabulary entry, sized by the first logits
        self.generator = torch.Generator(device=device)
        if p.seed is not None:
            self.generator.manual_seed(p.seed % 2**64)  # any int: negative or huge seeds must not fail the batch
        else:
            self.generator.seed()  # a fresh non-deterministic seed, without touching torch's global one
        self.greedy = p.temperature < _MIN_TEMPERATURE

    # ---------------------------------------------------------- sampling
    def choose(self, raw: torch.Tensor) -> tuple[int, TokenLogprob | None]:
        """The next token from this row's float32 logits, and its logprob under the raw logits."""
        p = self.params
        logits = raw
        if self.penalised and self.counts is None:
            self.counts = torch.zeros_like(raw)
        if self.counts is not None:  # OpenAI: logit -= count * frequency + (count > 0) * presence
            logits = logits - self.counts * p.frequency_penalty - (self.counts > 0).float() * p.presence_penalty
        if self.greedy:
            token = int(torch.argmax(logits))
        else:
            probs = torch.softmax(logits / p.temperature, dim=-1)
            if p.top_p < 1.0:
                sorted_probs, order = torch.sort(probs, descending=True, stable=True)
                # keep the smallest prefix whose mass reaches top_p: drop a token once the mass before it does
                sorted_probs[(torch.cumsum(sorted_probs, 0) - sorted_probs) >= p.top_p] = 0.0
                token = int(order[torch.multinomial(sorted_probs, 1, generator=self.generator)])
            else:
                token = int(torch.multinomial(probs, 1, generator=self.generator))
        info = None
        if p.logprobs is not None:  # of the served model itself: before penalties, temperature and top-p
            logprobs = torch.log_softmax(raw, dim=-1)
            info = TokenLogprob(token, float(logprobs[token]), _top(logprobs, p.logprobs))
        return token, info

    def accept(self, token: int, info: TokenLogprob | None, eos: set[int], tokenizer) -> bool:
        """Record a sampled token; True when it belongs to the output (not an end of sequence)."""
        if token in eos:
            self.finish = "stop"
            return False
        self.ids.append(token)
        if self.logprobs is not None:
            self.logprobs.append(info)
        if self.counts is not None:
            self.counts[token] += 1
        if self.stops and self._check_stop(tokenizer):
            self.finish = "stop"
        elif len(self.ids) >= self.params.max_tokens:
            self.finish = "length"
        return True

    def _check_stop(self, tokenizer) -> bool:
        """Whether the generated text now contains a stop string; if so, cut the text before the first one.

        Only the end of the text can hold a new match: the text checked before is a prefix of the new
        one except for trailing replacement characters (a character split across tokens), so the
        search starts `longest stop - 1` characters before the end of that stable prefix.
        """
        text = tokenizer.decode(self.ids, skip_special_tokens=True)
        start = max(0, self.checked - self.longest_stop + 1)
        if not text.startswith(self.prev_text[: self.checked]):
            start = 0  # the tokenizer rewrote earlier text (rare clean-ups): search it all again
        hits = [i for i in (text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            self.text = text[: min(hits)]
            return True
        self.prev_text = text
        self.checked = len(text.rstrip("\ufffd"))
        return False

    def result(self, tokenizer) -> Result:
        text = self.text if self.text is not None else tokenizer.decode(self.ids, skip_special_tokens=True)
        return Result(list(self.ids), text, self.finish or "stop", self.logprobs, self.prompt_logprobs)


class Engine:
    """Runs jobs on one worker thread, in batches of jobs whose patterns keep the same experts.

    `max_batch`: rows decoded together; `max_queue`: sequences waiting (not yet in a batch) at most;
    `batch_wait`: after the first job, how long to wait for jobs the HTTP layer has announced
    (`arrive(+1)`) but not yet submitted; with none announced there is no wait. `start=False`
    leaves the worker stopped until `start()` (tests queue jobs first to see a batch form).

    Attributes the HTTP layer reads: `context_length` (the model's positions), `depth`,
    `batch_sizes` (the last 1000), `stopped_early`; `eos` is the set of ids that end a sequence.
    Temperatures below 1e-5 decode greedily, as 0 does.

    A cancelled job stops before its next decode step and gets a "done" whose finish_reason is
    "stop" (its client is gone, and OpenAI has no reason for that); it counts in `stopped_early`
    if it was cut short (not if it had already finished). A stop string ends a row with finish "stop": its text is
    cut before the first stop string, and its `token_ids` / `logprobs` keep the tokens up to and
    including the one that completed the match (a token can hold text on both sides of the cut).
    An end-of-sequence token ends a row with "stop" and is not part of its output. A row that
    reaches `max_tokens` (0 included: prompt scoring only) ends with "length".
    """

    def __init__(self, pool: ExpertPool, tokenizer, max_batch: int = 8, max_queue: int = 64,
                 batch_wait: float = 0.02, start: bool = True):
        if tokenizer is None:
            raise MoepruneError("the engine needs a tokenizer to decode text and find stop strings")
        bound_kernel_caches(SERVE_KERNEL_CACHE)  # a server runs for days on new token counts per expert
        self.pool, self.tokenizer = pool, tokenizer
        self.max_batch, self.max_queue, self.batch_wait = max(1, max_batch), max_queue, batch_wait
        model = pool.model
        self.device = next(model.parameters()).device
        self.vocab = model.get_input_embeddings().num_embeddings
        self.context_length: int = getattr(model.config, "max_position_embeddings", None) or sys.maxsize
        self.eos = _eos_ids(tokenizer, model)
        # transformers 5.x renamed the forward's `past_key_values` to `cache`: pass the cache by the name it takes
        self._cache_arg = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (tokenizer.eos_token_id or 0)

        self.arriving = 0  # requests the HTTP layer has accepted but not yet submitted
        self.batch_sizes: list[int] = []  # recent batch sizes (rows decoded), for /metrics
        self.stopped_early = 0  # sequences cut short because their client went away, for /metrics
        self._cond = threading.Condition()
        self._pending: list[Job] = []  # admitted, not yet in a batch; FIFO
        self._busy = 0
        self._accepting = True
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="moeprune-generate", daemon=True)
        if start:
            self.start()

    # -------------------------------------------------------------- submission
    def start(self) -> None:
        """Start the worker thread (once; later calls do nothing)."""
        with self._cond:
            if self._thread.ident is None:
                self._thread.start()

    @property
    def depth(self) -> int:
        """Sequences queued or being decoded."""
        with self._cond:
            return len(self._pending) + self._busy

    def arrive(self, delta: int) -> None:
        """The HTTP layer counts requests it has accepted but not yet submitted (or refused)."""
        with self._cond:
            self.arriving += delta
            self._cond.notify_all()

    def submit(self, jobs: list[Job]) -> None:
        """Queue a request's sequences: all of them, or none (QueueFull; MoepruneError when shutting down)."""
        with self._cond:
            if not self._accepting:
                raise MoepruneError("the server is shutting down")
            if len(self._pending) + len(jobs) > self.max_queue:
                raise QueueFull(f"the request queue is full ({len(self._pending)} of {self.max_queue} sequences "
                                f"waiting, this request adds {len(jobs)}); retry later")
            self._pending.extend(jobs)
            self._cond.notify_all()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop taking jobs, let the queued and running ones finish (up to `timeout`), stop the worker.

        Jobs still queued after that (or queued on an engine never started) get an "error".
        """
        with self._cond:
            self._accepting = False
            if self._thread.ident is not None:
                self._cond.wait_for(lambda: not self._pending and not self._busy, timeout)
            self._stopping = True
            left, self._pending = self._pending, []
            self._cond.notify_all()
        for job in left:
            _emit(job, "error", "the server is shutting down")
        if self._thread.ident is not None:
            self._thread.join(timeout=5)

    # -------------------------------------------------------------- worker
    def _next_batch(self) -> list[Job] | None:
        """The oldest job and up to max_batch - 1 queued jobs with the same experts; None when stopping."""
        with self._cond:
            self._cond.wait_for(lambda: self._pending or self._stopping)
            if self._stopping:
                return None
            key = _batch_key(self._pending[0])
            deadline = time.monotonic() + self.batch_wait
            # Requests still being parsed may join this batch: wait for them, but never longer than batch_wait.
            while self.arriving > 0 and sum(_batch_key(j) == key for j in self._pending) < self.max_batch:
                left = deadline - time.monotonic()
                if left <= 0 or self._stopping:
                    break
                self._cond.wait(left)
            batch = [j for j in self._pending if _batch_key(j) == key][: self.max_batch]
            chosen = set(map(id, batch))
            self._pending = [j for j in self._pending if id(j) not in chosen]
            self._busy = len(batch)
            return batch

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._serve(batch)
            except BaseException:  # pragma: no cover - _serve reports its own failures
                log.exception("the generation worker failed")
            finally:
                with self._cond:
                    self._busy = 0
                    self._cond.notify_all()

    def _refusal(self, job: Job) -> str | None:
        """Why a job cannot run (the HTTP layer checks first: this is defence), or None."""
        p, n = job.params, len(job.prompt_ids)
        if n == 0:
            return "the prompt is empty"
        if p.max_tokens < 0:
            return f"max_tokens must be >= 0, got {p.max_tokens}"
        if n + p.max_tokens > self.context_length:
            return (f"the prompt ({n} tokens) plus max_tokens ({p.max_tokens}) exceed the model's context of "
                    f"{self.context_length} tokens")
        if not p.temperature >= 0 or not 0 < p.top_p <= 1:
            return f"temperature must be >= 0 and top_p in (0, 1], got {p.temperature} and {p.top_p}"
        if p.logprobs is not None and p.logprobs < 0:
            return f"logprobs must be >= 0, got {p.logprobs}"
        if any(not 0 <= t < self.vocab for t in job.prompt_ids):
            return f"the prompt has token ids outside the vocabulary (0..{self.vocab - 1})"
        return None

    def _serve(self, batch: list[Job]) -> None:
        rows = []
        for job in batch:
            try:
                problem = self._refusal(job)
                row = None if problem else _Row(job, self.device)
            except Exception as e:  # malformed settings: this job's problem, not its batch's
                problem = f"invalid sampling settings: {e}"
            if problem:
                _emit(job, "error", problem)
            elif job.cancelled.is_set():  # gone before its turn: nothing to compute
                self.stopped_early += 1
                _emit(job, "done", Result([], "", "stop", [] if job.params.logprobs is not None else None))
            else:
                rows.append(row)
        if not rows:
            return
        self.batch_sizes = (self.batch_sizes + [len(rows)])[-1000:]
        try:
            self._decode(rows)
        except Exception as e:  # report to every job of the batch not yet answered; keep serving
            log.exception("a generation batch of %d sequences failed", len(rows))
            message = str(e).splitlines()[0] if str(e) else type(e).__name__
            for row in rows:
                if not row.reported:
                    row.reported = True
                    _emit(row.job, "error", message)

    def _finish(self, row: _Row) -> None:
        row.reported = True
        _emit(row.job, "done", row.result(self.tokenizer))

    def _decode(self, rows: list[_Row]) -> None:
        model, device = self.pool.model, self.device
        lengths = [len(r.job.prompt_ids) for r in rows]
        width = max(lengths)
        ids = torch.tensor([[self.pad_id] * (width - n) + r.job.prompt_ids for r, n in zip(rows, lengths, strict=True)],
                           device=device)
        mask = torch.tensor([[0] * (width - n) + [1] * n for n in lengths], device=device)
        # Left padding: a row's positions count its own tokens only (pads get 0, they are masked anyway).
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        # Logits only where someone reads them: the last position, or every prompt position of the
        # longest prompt whose tokens are scored.
        keep = max([n for r, n in zip(rows, lengths, strict=True) if r.params.prompt_logprobs], default=1)
        cache = DynamicCache(config=model.config)  # ours, filled in place: no need to read it back
        with self.pool.serve(rows[0].job.pattern), torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                        logits_to_keep=keep, **{self._cache_arg: cache})
            for b, (row, n) in enumerate(zip(rows, lengths, strict=True)):
                if row.params.prompt_logprobs:
                    # kept logits start at padded position width - keep; this row's tokens at width - n
                    row.prompt_logprobs = self._score_prompt(out.logits[b, keep - n: keep - 1], row)
                    if row.job.stream:
                        _emit(row.job, "prompt", row.prompt_logprobs)
            logits = out.logits[:, -1].float()
            del out
            next_pos = mask.sum(-1)  # per row: the position of the token fed next
            live = list(rows)  # rows still decoding, in the order of the batch dimension
            for row in live:
                if row.params.max_tokens == 0:
                    row.finish = "length"
            while True:
                for b, row in enumerate(live):
                    if row.finish is None:
                        token, info = row.choose(logits[b])
                        if row.accept(token, info, self.eos, self.tokenizer) and row.job.stream:
                            _emit(row.job, "token", (token, info))
                    # Cancelled (its client went away, possibly while receiving this very token):
                    # stop before the next decode step.
                    if row.finish is None and row.job.cancelled.is_set():
                        row.finish = "stop"
                        self.stopped_early += 1
                    if row.finish is not None:
                        self._finish(row)
                still = [b for b, row in enumerate(live) if row.finish is None]
                if not still:
                    return
                if len(still) < len(live):  # finished rows leave the batch and its cache
                    index = torch.tensor(still, device=device)
                    cache.batch_select_indices(index)
                    mask, next_pos = mask[index], next_pos[index]
                    live = [live[b] for b in still]
                fed = torch.tensor([row.ids[-1] for row in live], device=device)  # a live row's last token is its newest
                mask = torch.cat([mask, mask.new_ones(len(live), 1)], dim=1)
                out = model(input_ids=fed[:, None], attention_mask=mask,
                            position_ids=next_pos[:, None], use_cache=True, **{self._cache_arg: cache})
                logits = out.logits[:, -1].float()
                del out
                next_pos = next_pos + 1

    @staticmethod
    def _score_prompt(logits: torch.Tensor, row: _Row) -> list[TokenLogprob | None]:
        """Logprob of each prompt token given the ones before it (the first has none)."""
        prompt = row.job.prompt_ids
        logprobs = torch.log_softmax(logits.float(), dim=-1)  # [n - 1, V]: position i predicts token i + 1
        targets = torch.tensor(prompt[1:], dtype=torch.long, device=logprobs.device)
        chosen = logprobs.gather(-1, targets[:, None])[:, 0].tolist()
        k = min(row.params.logprobs or 0, logprobs.shape[-1])
        values, ids = torch.topk(logprobs, k, dim=-1)  # all positions at once
        tops = [tuple(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]
        return [None] + [TokenLogprob(t, lp, top) for t, lp, top in zip(prompt[1:], chosen, tops, strict=True)]
