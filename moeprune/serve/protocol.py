"""Reading OpenAI-style requests: every field checked, normalised into plain dataclasses.

Plain functions, no web framework, so each rule has a unit test. Every refusal is an `APIError`
(HTTP 400, "invalid_request_error") whose `param` is the field at fault ("messages[1].content"
for a nested one) and whose message says what was expected and what was given.

Types are strict, unlike Python's: a bool is never a number (`true` is not 1), a string is never a
bool ("false" is refused), a float is never an integer (2.0 is not 2). An optional field sent as
null means its default, as with OpenAI.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from typing import Any

from .params import SamplingParams

_MISSING: Any = object()
_SHOW = 40  # characters of a refused value echoed back in the message
_INT64 = (-(2**63), 2**63 - 1)

# Known OpenAI fields this server does not implement. Sent as null they mean "not used" and are
# accepted (some clients send every field); any other value is refused, with the reason.
_UNSUPPORTED = {
    "tools": "no tool calling",
    "tool_choice": "no tool calling",
    "parallel_tool_calls": "no tool calling",
    "functions": "no function calling",
    "function_call": "no function calling",
    "response_format": "no structured output",
    "logit_bias": "no logit bias",
    "suffix": "no insertion",
    "modalities": "text output only",
    "audio": "no audio output",
    "reasoning_effort": "no reasoning-effort setting",
}
_SAMPLING = {"model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop", "seed",
             "presence_penalty", "frequency_penalty", "user"}
_COMPLETION_FIELDS = _SAMPLING | {"prompt", "logprobs", "echo", "best_of"}
_CHAT_FIELDS = _SAMPLING | {"messages", "max_completion_tokens", "logprobs", "top_logprobs"}

_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# Keys an assistant message carries when a client sends a parsed response back as history;
# null they say nothing, anything else asks for a feature this server lacks.
_NULL_ONLY_MESSAGE_KEYS = {"tool_calls", "function_call", "refusal", "audio", "annotations"}


class APIError(Exception):
    """An error the client sees: an HTTP status and OpenAI's error object."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param

    def body(self) -> dict:
        """OpenAI's error body: {"error": {message, type, param, code}}."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True, kw_only=True)
class Limits:
    """What this server accepts; `context_length` is the model's number of positions."""

    context_length: int
    max_tokens_cap: int = 512
    default_max_tokens: int = 64
    max_prompt_tokens: int = 2048
    max_n: int = 8
    max_prompts: int = 8
    max_logprobs: int = 20
    max_stop: int = 4

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if not _is_int(value) or value < (0 if f.name == "max_logprobs" else 1):
                raise ValueError(f"Limits.{f.name} must be a positive integer, got {value!r}")
        if self.default_max_tokens > self.max_tokens_cap:
            raise ValueError(f"Limits.default_max_tokens ({self.default_max_tokens}) exceeds max_tokens_cap "
                             f"({self.max_tokens_cap})")


@dataclass(frozen=True)
class CompletionRequest:
    """A checked /v1/completions request. `prompts` holds texts and token-id lists; their choices are
    numbered prompt-major (prompt i, choice j is index i * n + j)."""

    model: str | None  # None: the server's own name
    prompts: list[str | list[int]]
    n: int
    stream: bool
    include_usage: bool
    echo: bool
    params: SamplingParams
    max_tokens_given: bool = True  # False: params.max_tokens is the default, which the server may shorten


@dataclass(frozen=True)
class ChatRequest:
    """A checked /v1/chat/completions request; `messages` are {role, content[, name]} with string content
    and "developer" read as "system"."""

    model: str | None
    messages: list[dict]
    n: int
    stream: bool
    include_usage: bool
    logprobs: bool
    top_logprobs: int
    params: SamplingParams
    max_tokens_given: bool = True  # False: params.max_tokens is the default, which the server may shorten


# ---------------------------------------------------------------------------------------------- entry points
def parse_json(raw: bytes) -> dict:
    """The request body as a JSON object; 400 for anything else."""
    if not raw.strip():
        raise APIError(400, "the request body is empty; send a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"the request body is not UTF-8 (bad byte at position {e.start})") from None
    try:
        body = json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    except json.JSONDecodeError as e:
        raise APIError(400, f"the request body is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") \
            from None
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply") from None
    except ValueError as e:  # an integer of thousands of digits (Python's int-from-string limit)
        raise APIError(400, f"the request body holds a number that is too long: {str(e)[:80]}") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {_json_type(body)}")
    _check_surrogates(body)
    return body


def _check_surrogates(body: dict) -> None:
    """400 for a string holding an unpaired surrogate escape ("\\ud800"): valid JSON, but not text,
    and the tokenizer would fail on it later with a server error."""
    stack: list[Any] = [body]
    while stack:  # not recursive: the body may be nested as deeply as the JSON parser allows
        value = stack.pop()
        if isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise APIError(400, f"the request body holds the string {_show(value)}, which has an unpaired "
                               f"surrogate escape and is not text") from None


def parse_completion(body: object, limits: Limits) -> CompletionRequest:
    """A /v1/completions body, checked and normalised."""
    body = _object(body)
    _check_fields(body, _COMPLETION_FIELDS)
    prompts = _prompts(body.get("prompt", _MISSING), limits)
    echo = _bool(body, "echo", False)
    n = _int(body, "n", 1, 1, limits.max_n)
    best_of = _int(body, "best_of", None, 1, None)
    if best_of is not None and best_of != n:
        raise APIError(400, f"best_of ({best_of}) must equal n ({n}): this server returns every sequence it "
                       f"generates" if best_of > n else f"best_of ({best_of}) must be at least n ({n})",
                       param="best_of")
    max_tokens = _int(body, "max_tokens", limits.default_max_tokens, 0, None)
    if max_tokens == 0 and not echo:
        raise APIError(400, "max_tokens 0 generates nothing; it is only allowed with echo: true (to score the "
                       "prompt)", param="max_tokens")
    _check_cap(max_tokens, "max_tokens", limits)
    stream, include_usage = _stream(body)
    logprobs = _int(body, "logprobs", None, 0, limits.max_logprobs)
    params = _sampling(body, limits, max_tokens, logprobs, prompt_logprobs=echo and logprobs is not None)
    _optional_str(body, "user")
    return CompletionRequest(model=_model(body), prompts=prompts, n=n, stream=stream, include_usage=include_usage,
                             echo=echo, params=params, max_tokens_given=body.get("max_tokens") is not None)


def parse_chat(body: object, limits: Limits) -> ChatRequest:
    """A /v1/chat/completions body, checked and normalised."""
    body = _object(body)
    _check_fields(body, _CHAT_FIELDS)
    messages = _messages(body.get("messages", _MISSING))
    n = _int(body, "n", 1, 1, limits.max_n)
    max_tokens = _int(body, "max_tokens", None, 1, None)
    max_completion = _int(body, "max_completion_tokens", None, 1, None)
    if max_tokens is not None and max_completion is not None and max_tokens != max_completion:
        raise APIError(400, f"max_tokens ({max_tokens}) and max_completion_tokens ({max_completion}) differ; "
                       f"send one of them", param="max_completion_tokens")
    which = "max_completion_tokens" if max_completion is not None else "max_tokens"
    chosen = max_completion if max_completion is not None else max_tokens
    given = chosen is not None
    if chosen is None:
        chosen = limits.default_max_tokens
    _check_cap(chosen, which, limits)
    stream, include_usage = _stream(body)
    logprobs = _bool(body, "logprobs", False)
    top = _int(body, "top_logprobs", None, 0, limits.max_logprobs)
    if top is not None and not logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    top = top or 0
    params = _sampling(body, limits, chosen, top if logprobs else None, prompt_logprobs=False)
    _optional_str(body, "user")
    return ChatRequest(model=_model(body), messages=messages, n=n, stream=stream, include_usage=include_usage,
                       logprobs=logprobs, top_logprobs=top, params=params, max_tokens_given=given)


def retrieval_query(messages: list[dict]) -> str:
    """The text pattern retrieval searches with: the latest user turn, with the turn before it as context
    (without a user turn, the last two turns)."""
    users = [m["content"] for m in messages if m["role"] == "user"]
    if not users:
        return "\n".join(m["content"] for m in messages[-2:])
    # messages[-2], not the turn before the latest user turn: the server has always searched this way,
    # and the stored patterns' retrieval tests were made with it
    before = [messages[-2]["content"]] if len(messages) > 1 else []
    return "\n".join([*before, users[-1]])


def check_length(n_prompt_tokens: int, max_tokens: int, limits: Limits, param: str = "prompt") -> None:
    """400 "context_length_exceeded" when a tokenised prompt is over the server's limit or leaves no room
    for `max_tokens` in the model's context."""
    if n_prompt_tokens > limits.max_prompt_tokens:
        raise APIError(400, f"the prompt has {n_prompt_tokens} tokens, more than this server's limit of "
                       f"{limits.max_prompt_tokens}", code="context_length_exceeded", param=param)
    if n_prompt_tokens + max_tokens > limits.context_length:
        raise APIError(400, f"the prompt ({n_prompt_tokens} tokens) plus max_tokens ({max_tokens}) is "
                       f"{n_prompt_tokens + max_tokens} tokens, more than the model's context of "
                       f"{limits.context_length}; shorten the prompt or lower max_tokens",
                       code="context_length_exceeded", param=param)


def check_token_ids(prompts: list[str | list[int]], vocab_size: int) -> None:
    """400 when a token-id prompt holds an id outside the model's vocabulary."""
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            continue
        for j, t in enumerate(p):
            if t >= vocab_size:
                where = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
                raise APIError(400, f"{where}[{j}] is token id {t}, outside the vocabulary (0 to {vocab_size - 1})",
                               param=where)


# ---------------------------------------------------------------------------------------------- fields
def _object(body: object) -> dict:
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {_json_type(body)}")
    return body


def _check_fields(body: dict, known: set[str]) -> None:
    for name, value in body.items():  # in the client's order, so the first offender is named
        if name in known:
            continue
        if name in _UNSUPPORTED:
            if value is None:
                continue
            raise APIError(400, f"{name} is not supported by this server ({_UNSUPPORTED[name]})", param=name)
        raise APIError(400, f"unrecognised request argument {name!r}", param=name)


def _model(body: dict) -> str | None:
    return _optional_str(body, "model") or None  # "" means the server's own name, as today


def _prompts(value: Any, limits: Limits) -> list[str | list[int]]:
    if value is _MISSING or value is None:
        raise APIError(400, "prompt is required: a string, a list of strings, a list of token ids or a list of "
                       "token-id lists", param="prompt")
    # a list holding no string and no list is one prompt of token ids, so [1, 2.5] names its bad id
    if isinstance(value, str) or (isinstance(value, list) and value
                                  and not any(isinstance(p, (str, list)) for p in value)):
        items, single = [value], True
    elif isinstance(value, list):
        items, single = value, False
    else:
        raise _expected("prompt", "a string, a list of strings, a list of token ids or a list of token-id lists",
                        value)
    if not items:
        raise APIError(400, "prompt is an empty list", param="prompt")
    if len(items) > limits.max_prompts:
        raise APIError(400, f"prompt holds {len(items)} prompts, more than this server's limit of "
                       f"{limits.max_prompts}", param="prompt")
    out: list[str | list[int]] = []
    for i, p in enumerate(items):
        where = "prompt" if single else f"prompt[{i}]"
        if isinstance(p, str):
            if not p.strip():  # retrieval has nothing to search with
                raise APIError(400, f"{where} is empty", param=where)
            out.append(p)
        elif isinstance(p, list):
            if not p:
                raise APIError(400, f"{where} is an empty list of token ids", param=where)
            for j, t in enumerate(p):
                if not _is_int(t) or t < 0:
                    raise _expected(f"{where}[{j}]", "a token id (an integer >= 0)", t, param=where)
            out.append(list(p))
        else:
            raise _expected(where, "a string or a list of token ids", p)
    return out


def _messages(value: Any) -> list[dict]:
    if value is _MISSING or value is None:
        raise APIError(400, "messages is required: a non-empty list of {role, content} objects",
                       param="messages")
    if not isinstance(value, list) or not value:
        raise _expected("messages", "a non-empty list of {role, content} objects", value)
    out = [_message(m, f"messages[{i}]") for i, m in enumerate(value)]
    if not any(m["content"].strip() for m in out):
        raise APIError(400, "the messages hold no text", param="messages")
    if not retrieval_query(out).strip():
        raise APIError(400, "messages: the latest user message and the one before it are empty, so there is "
                       "nothing to answer",
                       param="messages")
    return out


def _message(m: Any, where: str) -> dict:
    if not isinstance(m, dict):
        raise _expected(where, "an object with role and content", m)
    role = m.get("role", _MISSING)
    if role is _MISSING or role is None:
        raise APIError(400, f"{where}.role is required", param=f"{where}.role")
    if not isinstance(role, str):
        raise _expected(f"{where}.role", "one of system, developer, user, assistant", role)
    if role in ("tool", "function"):
        raise APIError(400, f"{where}.role {role!r}: tool and function messages are not supported by this server",
                       param=f"{where}.role")
    if role not in _ROLES:
        raise _expected(f"{where}.role", "one of system, developer, user, assistant", role)
    for key, v in m.items():
        if key in ("role", "content", "name") or (key in _NULL_ONLY_MESSAGE_KEYS and v is None):
            continue
        if key in _NULL_ONLY_MESSAGE_KEYS:
            raise APIError(400, f"{where}.{key} is not supported by this server", param=f"{where}.{key}")
        raise APIError(400, f"{where}: unrecognised key {key!r}", param=f"{where}.{key}")
    content = m.get("content", _MISSING)
    if content is _MISSING or content is None:
        if role != "assistant":  # an assistant turn may be empty (OpenAI sends null with tool calls)
            raise APIError(400, f"{where}.content is required for a {role} message", param=f"{where}.content")
        content = ""
    elif isinstance(content, list):
        content = _text_parts(content, f"{where}.content")
    elif not isinstance(content, str):
        raise _expected(f"{where}.content", "a string or a list of text parts", content)
    out = {"role": _ROLES[role], "content": content}
    name = m.get("name")
    if name is not None:
        if not isinstance(name, str):
            raise _expected(f"{where}.name", "a string", name)
        out["name"] = name
    return out


def _text_parts(parts: list, where: str) -> str:
    """Text parts joined with newlines (as vLLM does): parts are separate blocks, and gluing them
    without a separator would merge the last word of one with the first of the next."""
    texts = []
    for j, part in enumerate(parts):
        at = f"{where}[{j}]"
        if not isinstance(part, dict):
            raise _expected(at, 'a content part {"type": "text", "text": ...}', part)
        kind = part.get("type")
        if kind != "text":
            if isinstance(kind, str):
                raise APIError(400, f"{at} is a {kind!r} part; this server takes text parts only",
                               param=f"{at}.type")
            raise _expected(f"{at}.type", '"text"', kind)
        for key in part:
            if key not in ("type", "text"):
                raise APIError(400, f"{at}: unrecognised key {key!r}", param=f"{at}.{key}")
        text = part.get("text")
        if not isinstance(text, str):
            raise _expected(f"{at}.text", "a string", text)
        texts.append(text)
    return "\n".join(texts)


def _stream(body: dict) -> tuple[bool, bool]:
    stream = _bool(body, "stream", False)
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not stream:
        raise APIError(400, "stream_options is only allowed with stream: true", param="stream_options")
    if not isinstance(options, dict):
        raise _expected("stream_options", "an object such as {\"include_usage\": true}", options)
    for key in options:
        # include_obfuscation pads chunks against side channels; this server sends none, so either value holds
        if key not in ("include_usage", "include_obfuscation"):
            raise APIError(400, f"stream_options: unrecognised key {key!r}", param=f"stream_options.{key}")
    _bool(options, "include_obfuscation", True, param="stream_options.include_obfuscation")
    return stream, _bool(options, "include_usage", False, param="stream_options.include_usage")


def _sampling(body: dict, limits: Limits, max_tokens: int, logprobs: int | None,
              prompt_logprobs: bool) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0, "a number from 0 to 2"),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, "a number above 0 and at most 1", low_open=True),
        stop=_stop(body.get("stop"), limits),
        seed=_int(body, "seed", None, *_INT64),
        presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0, "a number from -2 to 2"),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0, "a number from -2 to 2"),
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
    )


def _stop(value: Any, limits: Limits) -> tuple[str, ...]:
    expected = f"a non-empty string or a list of 1 to {limits.max_stop} non-empty strings"
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not 1 <= len(items) <= limits.max_stop:
        raise _expected("stop", expected, value)
    for s in items:
        if not isinstance(s, str) or not s:  # "" would stop before the first token
            raise _expected("stop", expected, value)
    return tuple(items)


def _check_cap(max_tokens: int, param: str, limits: Limits) -> None:
    if max_tokens > limits.max_tokens_cap:
        raise APIError(400, f"{param} {max_tokens} exceeds this server's cap of {limits.max_tokens_cap}",
                       param=param)


# ---------------------------------------------------------------------------------------------- typed getters
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int(body: dict, name: str, default: int | None, low: int | None, high: int | None,
         param: str | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if low is not None and high is not None:
        expected = f"an integer from {low} to {high}"
    elif low is not None:
        expected = f"an integer >= {low}"
    else:
        expected = "an integer"
    if not _is_int(value) or (low is not None and value < low) or (high is not None and value > high):
        raise _expected(param or name, expected, value)
    return value


def _number(body: dict, name: str, default: float, low: float, high: float, expected: str,
            low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        and (value > low if low_open else value >= low) and value <= high
    if not ok:
        raise _expected(name, expected, value)
    return float(value)


def _bool(body: dict, name: str, default: bool, param: str | None = None) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _expected(param or name, "true or false", value)
    return value


def _optional_str(body: dict, name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise _expected(name, "a string", value)
    return value


def _expected(where: str, expected: str, value: Any, param: str | None = None) -> APIError:
    return APIError(400, f"{where} must be {expected}; got {_show(value)}", param=param or where)


def _show(value: Any) -> str:
    """The refused value as the client wrote it (JSON), cut short."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    text = text if len(text) <= _SHOW else text[: _SHOW - 3] + "..."
    # an unpaired surrogate would make the error body itself unencodable
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _no_constant(name: str):
    raise APIError(400, f"the request body is not valid JSON: {name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 parses to infinity
        raise APIError(400, f"the request body holds the number {text[:_SHOW]}, which is out of range")
    return value
