"""What one generation is asked for and what it gives back: shared by the request parser, the engine
and the response builders, so each can be tested alone."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingParams:
    """Settings of one generated sequence (one choice of one prompt)."""

    max_tokens: int  # 0: no generation (a completions `echo` + `logprobs` scoring request)
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None  # the sequence's own generator: the same tokens alone or batched
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # None: no logprobs; k >= 0: each token's logprob and its top-k alternatives
    prompt_logprobs: bool = False  # also score the prompt tokens (completions `echo` with `logprobs`)


@dataclass(frozen=True)
class TokenLogprob:
    """One token with its log-probability under the served (pattern-restricted) model, before any
    temperature, top-p or penalty, and the `top` most likely alternatives at its position."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Result:
    """A finished sequence."""

    # generated tokens, end-of-sequence excluded; with a stop string, those up to and including the one
    # that completed it (a token can hold text on both sides of the cut)
    token_ids: list[int]
    text: str  # decoded, cut before the first stop string
    finish_reason: str  # "stop" (end of sequence, stop string, or cancelled) or "length" (max_tokens)
    logprobs: list[TokenLogprob] | None = None  # one per token of `token_ids` when asked for
    prompt_logprobs: list[TokenLogprob | None] | None = None  # one per prompt token, the first None
