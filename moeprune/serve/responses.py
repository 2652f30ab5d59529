"""Building OpenAI response bodies and server-sent events from finished or streaming sequences.

Plain functions, no web framework. Each piece is built as the `openai` package's own type (so a
wrong shape fails here, not in a client) and dumped with only the fields set, plus the server's
"moeprune" details at the top level. Two things OpenAI's API sends are outside its Python types,
and are built unvalidated: a streamed completion chunk's null `finish_reason` before the last
chunk, and the null logprob of the first prompt token under `echo`. The `openai` client parses both.

Token strings come from a `token_text(id) -> str` callable (the tokenizer decoding one id), so
tests need no tokenizer.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence

from openai.types import Completion, CompletionChoice, CompletionUsage
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessage
from openai.types.chat import chat_completion as chat_full
from openai.types.chat import chat_completion_chunk as chat_stream
from openai.types.chat.chat_completion_token_logprob import ChatCompletionTokenLogprob, TopLogprob
from openai.types.completion_choice import Logprobs

from .params import Result, TokenLogprob

TokenText = Callable[[int], str]

SSE_DONE = "data: [DONE]\n\n"
_FLOOR = -9999.0  # OpenAI's logprob for "very unlikely"; JSON has no -Infinity


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    """OpenAI's usage object."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


# ---------------------------------------------------------------------------------------------- logprobs
def completion_logprobs(token_ids: Sequence[int], entries: Sequence[TokenLogprob | None], token_text: TokenText,
                        offset: int = 0) -> Logprobs:
    """The legacy completions logprobs of some tokens: `entries[i]` is token i's logprob (None for the
    first prompt token, which has nothing before it); text offsets count from `offset`."""
    if len(token_ids) != len(entries):
        raise ValueError(f"{len(token_ids)} tokens but {len(entries)} logprob entries")
    tokens, logprobs, tops, offsets = [], [], [], []
    for t, e in zip(token_ids, entries, strict=True):
        text = token_text(t)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        if e is None:
            logprobs.append(None)
            tops.append(None)
            continue
        if e.token_id != t:
            raise ValueError(f"logprob entry of token {e.token_id} given for token {t}")
        logprobs.append(_finite(e.logprob))
        top: dict[str, float] = {}
        for alt, lp in e.top:
            # distinct ids can decode to the same string: keep the likelier, so a dict may hold fewer than k
            key, lp = token_text(alt), _finite(lp)
            top[key] = max(lp, top.get(key, lp))
        tops.append(top)
    fields = dict(tokens=tokens, token_logprobs=logprobs, top_logprobs=tops, text_offset=offsets)
    if any(e is None for e in entries):
        return Logprobs.model_construct(**fields)  # OpenAI sends null here; its type does not allow it
    return Logprobs(**fields)


def _merge(first: Logprobs, second: Logprobs) -> Logprobs:
    return Logprobs.model_construct(**{k: getattr(first, k) + getattr(second, k)
                                       for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")})


def chat_logprobs(entries: Sequence[TokenLogprob], token_text: TokenText) -> list[ChatCompletionTokenLogprob]:
    """Chat logprobs of some tokens: each token with its bytes and its top alternatives."""
    out = []
    for e in entries:
        text = token_text(e.token_id)
        top = []
        for alt, lp in e.top:
            alt_text = token_text(alt)
            top.append(TopLogprob(token=alt_text, logprob=_finite(lp), bytes=list(alt_text.encode("utf-8"))))
        out.append(ChatCompletionTokenLogprob(token=text, logprob=_finite(e.logprob),
                                              bytes=list(text.encode("utf-8")), top_logprobs=top))
    return out


def _finite(lp: float) -> float:
    return float(lp) if math.isfinite(lp) and lp > _FLOOR else _FLOOR


# ---------------------------------------------------------------------------------------------- full bodies
def completion_choice(index: int, result: Result, token_text: TokenText, *, prompt: str | None = None,
                      prompt_ids: Sequence[int] | None = None) -> CompletionChoice:
    """One completions choice. With `prompt` (echo) the text is prompt + completion; logprobs appear
    when the engine gave them, the prompt's first when it gave `prompt_logprobs` too."""
    echo = prompt is not None
    logprobs = None
    if result.logprobs is not None:
        start = len(prompt) if echo else 0  # offsets index the returned text, the echoed prompt included
        logprobs = completion_logprobs(result.token_ids, result.logprobs, token_text, start)
        if echo and result.prompt_logprobs is not None:
            if prompt_ids is None:
                raise ValueError("echo with logprobs needs the prompt's token ids")
            logprobs = _merge(completion_logprobs(prompt_ids, result.prompt_logprobs, token_text), logprobs)
    text = prompt + result.text if echo else result.text
    return CompletionChoice(index=index, text=text, finish_reason=result.finish_reason, logprobs=logprobs)


def chat_choice(index: int, result: Result, token_text: TokenText, logprobs: bool = False) -> chat_full.Choice:
    """One chat choice, with its tokens' logprobs when `logprobs`."""
    lp = None
    if logprobs:
        if result.logprobs is None:
            raise ValueError("logprobs were asked for but the engine gave none")
        lp = chat_full.ChoiceLogprobs(content=chat_logprobs(result.logprobs, token_text), refusal=None)
    return chat_full.Choice(index=index, finish_reason=result.finish_reason, logprobs=lp,
                            message=ChatCompletionMessage(role="assistant", content=result.text, refusal=None))


def completion_body(rid: str, created: int, model: str, choices: Sequence[Result], usage: dict | None,
                    extra: dict | None = None, *, token_text: TokenText,
                    echo: Sequence[tuple[str, Sequence[int]]] | None = None) -> dict:
    """A /v1/completions response body; `choices[i]` is choice i, and with `echo`, `echo[i]` is the
    (text, token ids) of its prompt. Several prompts with n choices each are numbered prompt-major
    (prompt i, choice j is index i * n + j), as OpenAI does."""
    if echo is not None and len(echo) != len(choices):
        raise ValueError(f"{len(choices)} choices but {len(echo)} echoed prompts")
    built = [completion_choice(i, r, token_text, prompt=echo[i][0] if echo else None,
                               prompt_ids=echo[i][1] if echo else None) for i, r in enumerate(choices)]
    obj = Completion(id=rid, created=created, model=model, object="text_completion", choices=built,
                     **({"usage": CompletionUsage(**usage)} if usage is not None else {}))
    return _dump(obj, extra)


def chat_body(rid: str, created: int, model: str, choices: Sequence[Result], usage: dict | None,
              extra: dict | None = None, *, token_text: TokenText, logprobs: bool = False) -> dict:
    """A /v1/chat/completions response body; `choices[i]` is choice i."""
    built = [chat_choice(i, r, token_text, logprobs) for i, r in enumerate(choices)]
    obj = ChatCompletion(id=rid, created=created, model=model, object="chat.completion", choices=built,
                         **({"usage": CompletionUsage(**usage)} if usage is not None else {}))
    return _dump(obj, extra)


def _dump(obj, extra: dict | None) -> dict:
    # only the fields set: explicit nulls (logprobs, finish_reason) stay, unused optional fields go;
    # warnings off because the unvalidated pieces hold nulls the types do not allow
    data = obj.model_dump(mode="json", exclude_unset=True, warnings=False)
    if extra is not None:
        data["moeprune"] = extra
    return data


# ---------------------------------------------------------------------------------------------- streaming
def completion_chunk(rid: str, created: int, model: str, index: int, text: str, finish_reason: str | None = None,
                     extra: dict | None = None, *, logprobs: Sequence[TokenLogprob | None] | None = None,
                     token_text: TokenText | None = None, offset: int = 0,
                     token_ids: Sequence[int] | None = None) -> dict:
    """One streamed completions event for choice `index`: new text, and when `logprobs` is given (maybe
    empty) the logprobs of the tokens it covers, their text offsets counted from `offset` (the length
    of the choice's text sent before; `token_ids` where an entry is None, as for an echoed prompt's
    first token). `finish_reason` is null until the choice's last chunk."""
    lp = None
    if logprobs is not None:
        if token_text is None:
            raise ValueError("logprobs need token_text")
        ids = [e.token_id for e in logprobs] if token_ids is None else token_ids
        lp = completion_logprobs(ids, logprobs, token_text, offset)
    if finish_reason is None:  # OpenAI's Completion type has no null finish_reason; its client accepts one
        choice = CompletionChoice.model_construct(index=index, text=text, finish_reason=None, logprobs=lp)
    else:
        choice = CompletionChoice(index=index, text=text, finish_reason=finish_reason, logprobs=lp)
    obj = Completion.model_construct(id=rid, created=created, model=model, object="text_completion", choices=[choice])
    return _dump(obj, extra)


def chat_chunk(rid: str, created: int, model: str, index: int, text: str = "", finish_reason: str | None = None,
               extra: dict | None = None, *, first: bool = False, logprobs: Sequence[TokenLogprob] | None = None,
               token_text: TokenText | None = None) -> dict:
    """One streamed chat event for choice `index`. A choice's `first` chunk carries role "assistant"
    and its content even when empty; later ones carry content only when there is some, so the last,
    with `finish_reason`, usually has an empty delta, as OpenAI sends. With `logprobs` (maybe empty),
    the logprobs of the tokens the chunk covers."""
    delta = chat_stream.ChoiceDelta(**({"role": "assistant", "content": text} if first else {}),
                                    **({"content": text} if text and not first else {}))
    lp = None
    if logprobs is not None:
        if token_text is None:
            raise ValueError("logprobs need token_text")
        lp = chat_stream.ChoiceLogprobs(content=chat_logprobs(logprobs, token_text), refusal=None)
    choice = chat_stream.Choice(index=index, delta=delta, finish_reason=finish_reason, logprobs=lp)
    obj = ChatCompletionChunk(id=rid, created=created, model=model, object="chat.completion.chunk", choices=[choice])
    return _dump(obj, extra)


def usage_chunk(rid: str, created: int, model: str, usage: dict, *, chat: bool, extra: dict | None = None) -> dict:
    """The last event before [DONE] under stream_options.include_usage: no choices, the request's usage."""
    if chat:
        obj = ChatCompletionChunk(id=rid, created=created, model=model, object="chat.completion.chunk", choices=[],
                                  usage=CompletionUsage(**usage))
    else:
        obj = Completion(id=rid, created=created, model=model, object="text_completion", choices=[],
                         usage=CompletionUsage(**usage))
    return _dump(obj, extra)


def sse(data: dict) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(data, ensure_ascii=False, allow_nan=False)}\n\n"


def sse_error(message: str, type: str = "server_error", code: str | None = None) -> str:
    """An error event for a failure after the stream began (the status is already 200): the openai
    client raises it as an APIError."""
    return sse({"error": {"message": message, "type": type, "param": None, "code": code}})


class TextStream:
    """Incremental detokenisation of one streamed sequence.

    `feed` returns the text safe to send now: it holds back a trailing incomplete UTF-8 character
    (decoded as "\\ufffd") and any tail that could still become a stop string, and sends nothing
    from the first stop string on. `finish` returns the rest of the engine's final text.
    `decode` should decode as the engine does (special tokens skipped), so the two texts agree.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()):
        self.decode, self.stop = decode, tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.sent = ""
        self.stopped = False  # a stop string has appeared: the caller may stop generating

    def feed(self, token_id: int) -> str:
        """Take one generated token; the text to send now (maybe "")."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        # the whole sequence again, not the new token alone: a token's text can depend on its
        # neighbours (leading-space rules, characters split across tokens); max_tokens bounds the cost
        text = self.decode(self.ids)
        cuts = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if cuts:
            self.stopped = True
            ready = text[: min(cuts)]
        else:
            ready = text.rstrip("\ufffd")
            ready = ready[: len(ready) - self._stop_prefix(ready)]
        return self._send(ready)

    def finish(self, final_text: str) -> str:
        """The rest of the engine's final (stop-cut) text after what was sent."""
        return self._send(final_text)

    def _send(self, ready: str) -> str:
        # text already sent cannot be taken back: if a re-decode changed it (rare tokenizer clean-up),
        # carry on from the same length rather than repeat text
        new = ready[len(self.sent):]
        if new:
            self.sent += new
        return new

    def _stop_prefix(self, text: str) -> int:
        """Length of the longest tail of `text` that a stop string starts with."""
        longest = max((len(s) for s in self.stop), default=1) - 1
        for k in range(min(longest, len(text)), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0
