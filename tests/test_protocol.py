"""Request parsing (moeprune.serve.protocol): every supported field accepted and normalised, every
refused one named in a 400; no model, no server."""

import json

import pytest

from moeprune.serve.params import SamplingParams
from moeprune.serve.protocol import (
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

LIMITS = Limits(context_length=1024)
DROP = object()  # removes a field from the base body
USER = [{"role": "user", "content": "hi"}]


def completion(**kw) -> dict:
    return {k: v for k, v in {"prompt": "hi", **kw}.items() if v is not DROP}


def chat(**kw) -> dict:
    return {k: v for k, v in {"messages": USER, **kw}.items() if v is not DROP}


PARSERS = {"completion": (parse_completion, completion), "chat": (parse_chat, chat)}


def refused(parse, body, param, *fragments):
    with pytest.raises(APIError) as info:
        parse(body, LIMITS)
    e = info.value
    assert (e.status, e.type, e.param) == (400, "invalid_request_error", param), e.message
    field = param.split("[")[0].split(".")[0]
    assert field in e.message, e.message
    for f in fragments:
        assert f in e.message, e.message
    assert e.body() == {"error": {"message": e.message, "type": "invalid_request_error", "param": param,
                                  "code": None}}
    return e


# ---------------------------------------------------------------------------------------------- both endpoints
SAMPLING_OK = [
    ({}, dict(max_tokens=64, temperature=1.0, top_p=1.0, stop=(), seed=None, presence_penalty=0.0,
              frequency_penalty=0.0, logprobs=None, prompt_logprobs=False)),
    (dict(max_tokens=None), dict(max_tokens=64)),
    (dict(max_tokens=512), dict(max_tokens=512)),
    (dict(temperature=0), dict(temperature=0.0)),
    (dict(temperature=2), dict(temperature=2.0)),
    (dict(temperature=0.7), dict(temperature=0.7)),
    (dict(temperature=None), dict(temperature=1.0)),
    (dict(top_p=1), dict(top_p=1.0)),
    (dict(top_p=0.01), dict(top_p=0.01)),
    (dict(top_p=None), dict(top_p=1.0)),
    (dict(stop="\n"), dict(stop=("\n",))),
    (dict(stop=["a", "b", "c", "d"]), dict(stop=("a", "b", "c", "d"))),
    (dict(stop=None), dict(stop=())),
    (dict(seed=0), dict(seed=0)),
    (dict(seed=2**63 - 1), dict(seed=2**63 - 1)),
    (dict(seed=-(2**63)), dict(seed=-(2**63))),
    (dict(seed=None), dict(seed=None)),
    (dict(presence_penalty=-2, frequency_penalty=2), dict(presence_penalty=-2.0, frequency_penalty=2.0)),
    (dict(presence_penalty=0.5, frequency_penalty=None), dict(presence_penalty=0.5, frequency_penalty=0.0)),
]


@pytest.mark.parametrize("endpoint", PARSERS)
@pytest.mark.parametrize("fields,expected", SAMPLING_OK)
def test_sampling_fields_accepted_and_normalised(endpoint, fields, expected):
    parse, base = PARSERS[endpoint]
    params = parse(base(**fields), LIMITS).params
    assert isinstance(params, SamplingParams)
    for name, value in expected.items():
        got = getattr(params, name)
        assert got == value and type(got) is type(value), (name, got)


@pytest.mark.parametrize("endpoint", PARSERS)
@pytest.mark.parametrize("fields,expected", [
    ({}, dict(n=1, stream=False, include_usage=False, model=None)),
    (dict(n=8), dict(n=8)),
    (dict(n=None), dict(n=1)),
    (dict(stream=True), dict(stream=True, include_usage=False)),
    (dict(stream=None), dict(stream=False)),
    (dict(stream=True, stream_options={"include_usage": True}), dict(stream=True, include_usage=True)),
    (dict(stream=True, stream_options={"include_usage": False, "include_obfuscation": False}),
     dict(include_usage=False)),
    (dict(stream=True, stream_options=None), dict(include_usage=False)),
    (dict(stream=False, stream_options=None), dict(stream=False)),
    (dict(model="demo_model:python"), dict(model="demo_model:python")),
    (dict(model=""), dict(model=None)),
    (dict(user="someone"), {}),
    (dict(user=None), {}),
])
def test_request_fields_accepted(endpoint, fields, expected):
    parse, base = PARSERS[endpoint]
    req = parse(base(**fields), LIMITS)
    for name, value in expected.items():
        assert getattr(req, name) == value, name


SAMPLING_BAD = [
    (dict(temperature=True), "temperature", "got true"),  # a bool is not a number
    (dict(temperature="1"), "temperature", 'got "1"'),
    (dict(temperature=2.5), "temperature", "from 0 to 2"),
    (dict(temperature=-0.1), "temperature", "got -0.1"),
    (dict(top_p=0), "top_p", "above 0"),
    (dict(top_p=1.5), "top_p", "got 1.5"),
    (dict(top_p=False), "top_p", "got false"),
    (dict(n=True), "n", "got true"),  # True is not 1
    (dict(n=1.0), "n", "an integer"),
    (dict(n=0), "n", "from 1 to 8"),
    (dict(n=9), "n", "got 9"),
    (dict(n="2"), "n", 'got "2"'),
    (dict(stream="false"), "stream", 'got "false"'),  # a string is never a bool
    (dict(stream=0), "stream", "true or false"),
    (dict(stream_options={"include_usage": True}), "stream_options", "stream: true"),
    (dict(stream=False, stream_options={"include_usage": True}), "stream_options", "stream: true"),
    (dict(stream=True, stream_options={"include_usage": "yes"}), "stream_options.include_usage", 'got "yes"'),
    (dict(stream=True, stream_options={"include_usage": 1}), "stream_options.include_usage", "got 1"),
    (dict(stream=True, stream_options={"extra": True}), "stream_options.extra", "extra"),
    (dict(stream=True, stream_options=[True]), "stream_options", "got [true]"),
    (dict(stop=""), "stop", 'got ""'),
    (dict(stop=[""]), "stop", "non-empty"),
    (dict(stop=["a", ""]), "stop", "non-empty"),
    (dict(stop=[]), "stop", "got []"),
    (dict(stop=["a", "b", "c", "d", "e"]), "stop", "1 to 4"),
    (dict(stop=[1]), "stop", "got [1]"),
    (dict(stop=5), "stop", "got 5"),
    (dict(seed=2**70), "seed", str(2**70)),
    (dict(seed=2**63), "seed", "got"),
    (dict(seed=-(2**63) - 1), "seed", "got"),
    (dict(seed=1.5), "seed", "got 1.5"),
    (dict(seed=True), "seed", "got true"),
    (dict(seed="7"), "seed", 'got "7"'),
    (dict(presence_penalty=-3), "presence_penalty", "got -3"),
    (dict(presence_penalty=2.01), "presence_penalty", "from -2 to 2"),
    (dict(frequency_penalty=-3), "frequency_penalty", "got -3"),
    (dict(frequency_penalty=True), "frequency_penalty", "got true"),
    (dict(max_tokens=513), "max_tokens", "cap of 512"),
    (dict(max_tokens=-1), "max_tokens", "got -1"),
    (dict(max_tokens=True), "max_tokens", "got true"),
    (dict(max_tokens="10"), "max_tokens", 'got "10"'),
    (dict(max_tokens=10.0), "max_tokens", "got 10.0"),
    (dict(model=5), "model", "got 5"),
    (dict(user=5), "user", "got 5"),
    (dict(foo=1), "foo", "unrecognised"),
    (dict(foo=None), "foo", "unrecognised"),  # unknown fields are refused even when null
]


@pytest.mark.parametrize("endpoint", PARSERS)
@pytest.mark.parametrize("fields,param,fragment", SAMPLING_BAD)
def test_sampling_fields_refused(endpoint, fields, param, fragment):
    parse, base = PARSERS[endpoint]
    refused(parse, base(**fields), param, fragment)


UNSUPPORTED = {
    "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "auto", "functions": [{"name": "f"}],
    "function_call": "auto", "response_format": {"type": "json_object"}, "logit_bias": {"50256": -100},
    "suffix": "end", "parallel_tool_calls": True, "modalities": ["text", "audio"], "audio": {"voice": "x"},
    "reasoning_effort": "low",
}


@pytest.mark.parametrize("endpoint", PARSERS)
@pytest.mark.parametrize("field", UNSUPPORTED)
def test_unsupported_fields_named(endpoint, field):
    parse, base = PARSERS[endpoint]
    refused(parse, base(**{field: UNSUPPORTED[field]}), field, "not supported")
    parse(base(**{field: None}), LIMITS)  # null: not asked for, as clients that send every field do


def test_first_offending_field_is_named():
    refused(parse_completion, completion(foo=1, tools=[{}]), "foo")
    refused(parse_completion, completion(tools=[{}], foo=1), "tools")


def test_long_refused_value_is_cut_short():
    e = refused(parse_completion, completion(temperature="x" * 500), "temperature", "...")
    assert len(e.message) < 120


@pytest.mark.parametrize("body", [None, [], "prompt", 5])
def test_body_must_be_an_object(body):
    for parse in (parse_completion, parse_chat):
        with pytest.raises(APIError) as e:
            parse(body, LIMITS)
        assert e.value.status == 400 and "JSON object" in e.value.message


# ---------------------------------------------------------------------------------------------- completions
@pytest.mark.parametrize("prompt,expected", [
    ("hello", ["hello"]),
    (["hello"], ["hello"]),
    (["a", "b", "c"], ["a", "b", "c"]),
    ([1, 2, 3], [[1, 2, 3]]),
    ([0], [[0]]),
    ([[1, 2], [3]], [[1, 2], [3]]),
    (["a", [4, 5]], ["a", [4, 5]]),
    (["p"] * 8, ["p"] * 8),
])
def test_prompt_forms(prompt, expected):
    assert parse_completion(completion(prompt=prompt), LIMITS).prompts == expected


@pytest.mark.parametrize("prompt,param,fragment", [
    (DROP, "prompt", "required"),
    (None, "prompt", "required"),
    ("", "prompt", "empty"),
    ("  \n", "prompt", "empty"),
    ([], "prompt", "empty"),
    ([""], "prompt[0]", "empty"),
    (["a", ""], "prompt[1]", "empty"),
    ([[]], "prompt[0]", "empty"),
    ([-1], "prompt", "got -1"),
    ([1, 2.5], "prompt", "prompt[1] must be a token id"),  # no string or list in it: one token-id prompt
    ([True, False], "prompt", "got true"),
    ([None], "prompt", "got null"),
    ([[1, True]], "prompt[0]", "got true"),
    ([[1, -2]], "prompt[0]", "got -2"),
    ([[1, "a"]], "prompt[0]", 'got "a"'),
    (["a", 1], "prompt[1]", "got 1"),
    (["p"] * 9, "prompt", "limit of 8"),
    ({"text": "a"}, "prompt", "got {"),
    (5, "prompt", "got 5"),
])
def test_prompt_refused(prompt, param, fragment):
    refused(parse_completion, completion(prompt=prompt), param, fragment)


def test_completion_defaults():
    req = parse_completion({"prompt": "hi"}, LIMITS)
    assert req == CompletionRequest(model=None, prompts=["hi"], n=1, stream=False, include_usage=False, echo=False,
                                    params=SamplingParams(max_tokens=64), max_tokens_given=False)
    assert parse_completion({"prompt": "hi", "max_tokens": 64}, LIMITS).max_tokens_given


@pytest.mark.parametrize("fields,logprobs,prompt_logprobs,echo", [
    (dict(logprobs=None), None, False, False),
    (dict(logprobs=0), 0, False, False),
    (dict(logprobs=20), 20, False, False),
    (dict(logprobs=5, echo=True), 5, True, True),
    (dict(logprobs=0, echo=True), 0, True, True),
    (dict(echo=True), None, False, True),
    (dict(echo=None), None, False, False),
])
def test_completion_logprobs_and_echo(fields, logprobs, prompt_logprobs, echo):
    req = parse_completion(completion(**fields), LIMITS)
    assert (req.params.logprobs, req.params.prompt_logprobs, req.echo) == (logprobs, prompt_logprobs, echo)


@pytest.mark.parametrize("fields,param,fragment", [
    (dict(logprobs=True), "logprobs", "got true"),
    (dict(logprobs=21), "logprobs", "from 0 to 20"),
    (dict(logprobs=-1), "logprobs", "got -1"),
    (dict(echo="true"), "echo", 'got "true"'),
    (dict(echo=1), "echo", "got 1"),
    (dict(max_tokens=0), "max_tokens", "echo"),
    (dict(max_tokens=0, echo=False), "max_tokens", "echo"),
    (dict(best_of=3, n=2), "best_of", "must equal n"),
    (dict(best_of=2), "best_of", "must equal n"),
    (dict(best_of=1, n=2), "best_of", "at least n"),
    (dict(best_of=True), "best_of", "got true"),
    (dict(max_completion_tokens=5), "max_completion_tokens", "unrecognised"),  # chat's name only
    (dict(messages=USER), "messages", "unrecognised"),
    (dict(top_logprobs=2), "top_logprobs", "unrecognised"),
])
def test_completion_fields_refused(fields, param, fragment):
    refused(parse_completion, completion(**fields), param, fragment)


def test_max_tokens_zero_only_with_echo():
    req = parse_completion(completion(max_tokens=0, echo=True, logprobs=1), LIMITS)
    assert req.params.max_tokens == 0 and req.params.prompt_logprobs
    refused(parse_completion, completion(max_tokens=0), "max_tokens", "echo")


def test_best_of_equal_to_n_is_accepted():
    assert parse_completion(completion(best_of=2, n=2), LIMITS).n == 2
    assert parse_completion(completion(best_of=None, n=3), LIMITS).n == 3


def test_token_ids_checked_against_the_vocabulary():
    check_token_ids(["text", [0, 8191]], 8192)
    with pytest.raises(APIError) as e:
        check_token_ids([[1, 8192]], 8192)
    assert e.value.param == "prompt" and "8192" in e.value.message and "8191" in e.value.message
    with pytest.raises(APIError) as e:
        check_token_ids(["a", [1], [9999]], 8192)
    assert e.value.param == "prompt[2]"


# ---------------------------------------------------------------------------------------------- chat
@pytest.mark.parametrize("messages,expected", [
    (USER, [{"role": "user", "content": "hi"}]),
    ([{"role": "developer", "content": "be brief"}, *USER],
     [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]),
    ([{"role": "system", "content": "s"}, *USER], [{"role": "system", "content": "s"}, *USER]),
    ([{"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]}],
     [{"role": "user", "content": "one\ntwo"}]),
    ([*USER, {"role": "assistant", "content": None}, {"role": "user", "content": "more"}],
     [*USER, {"role": "assistant", "content": ""}, {"role": "user", "content": "more"}]),
    ([*USER, {"role": "assistant"}, {"role": "user", "content": "more"}],
     [*USER, {"role": "assistant", "content": ""}, {"role": "user", "content": "more"}]),
    ([{"role": "user", "content": "hi", "name": "ann"}], [{"role": "user", "content": "hi", "name": "ann"}]),
    ([{"role": "user", "content": "hi", "name": None}], USER),
    # a response's message sent back as history carries these as null
    ([*USER, {"role": "assistant", "content": "yo", "refusal": None, "tool_calls": None, "function_call": None,
              "audio": None, "annotations": None}, {"role": "user", "content": "and?"}],
     [*USER, {"role": "assistant", "content": "yo"}, {"role": "user", "content": "and?"}]),
    ([{"role": "system", "content": ""}, *USER], [{"role": "system", "content": ""}, *USER]),
    ([{"role": "system", "content": "context"}, {"role": "user", "content": ""}],
     [{"role": "system", "content": "context"}, {"role": "user", "content": ""}]),
])
def test_messages_normalised(messages, expected):
    assert parse_chat(chat(messages=messages), LIMITS).messages == expected


@pytest.mark.parametrize("messages,param,fragment", [
    (DROP, "messages", "required"),
    (None, "messages", "required"),
    ([], "messages", "got []"),
    ("hi", "messages", 'got "hi"'),
    ([5], "messages[0]", "got 5"),
    ([{"content": "hi"}], "messages[0].role", "required"),
    ([{"role": "tool", "content": "x", "tool_call_id": "1"}], "messages[0].role", "tool and function messages are not"),
    ([{"role": "function", "content": "x", "name": "f"}], "messages[0].role", "tool and function messages are not"),
    ([{"role": "robot", "content": "x"}], "messages[0].role", 'got "robot"'),
    ([{"role": 1, "content": "x"}], "messages[0].role", "got 1"),
    ([{"role": "user"}], "messages[0].content", "required"),
    ([{"role": "user", "content": None}], "messages[0].content", "required"),
    ([{"role": "system", "content": None}, *USER], "messages[0].content", "required"),
    ([{"role": "user", "content": 5}], "messages[0].content", "got 5"),
    ([{"role": "user", "content": [{"type": "text", "text": "a"},
                                   {"type": "image_url", "image_url": {"url": "http://x"}}]}],
     "messages[0].content[1].type", "image_url"),
    ([{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}],
     "messages[0].content[0].type", "input_audio"),
    ([{"role": "user", "content": [{"type": "text"}]}], "messages[0].content[0].text", "got null"),
    ([{"role": "user", "content": [{"text": "a"}]}], "messages[0].content[0].type", "got null"),
    ([{"role": "user", "content": ["a"]}], "messages[0].content[0]", 'got "a"'),
    ([{"role": "user", "content": [{"type": "text", "text": "a", "cache_control": {}}]}],
     "messages[0].content[0].cache_control", "cache_control"),
    ([{"role": "user", "content": "hi", "foo": 1}], "messages[0].foo", "foo"),
    ([*USER, {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}],
     "messages[1].tool_calls", "not supported"),
    ([{"role": "user", "content": "hi", "name": 5}], "messages[0].name", "got 5"),
    ([{"role": "user", "content": ""}], "messages", "no text"),
    ([{"role": "user", "content": " "}, {"role": "assistant", "content": None}], "messages", "no text"),
    ([{"role": "user", "content": []}], "messages", "no text"),
    # text far back, but the latest user turn and the one before it are empty: nothing to retrieve with
    ([{"role": "user", "content": "old"}, {"role": "assistant", "content": ""}, {"role": "user", "content": ""}],
     "messages", "nothing to answer"),
])
def test_messages_refused(messages, param, fragment):
    refused(parse_chat, chat(messages=messages), param, fragment)


def test_chat_defaults():
    req = parse_chat({"messages": USER}, LIMITS)
    assert req == ChatRequest(model=None, messages=USER, n=1, stream=False, include_usage=False, logprobs=False,
                              top_logprobs=0, params=SamplingParams(max_tokens=64), max_tokens_given=False)
    assert parse_chat({"messages": USER, "max_completion_tokens": 9}, LIMITS).max_tokens_given


@pytest.mark.parametrize("fields,max_tokens", [
    (dict(max_tokens=10), 10),
    (dict(max_completion_tokens=10), 10),
    (dict(max_tokens=10, max_completion_tokens=10), 10),
    (dict(max_tokens=None, max_completion_tokens=12), 12),
    (dict(max_tokens=12, max_completion_tokens=None), 12),
    (dict(max_completion_tokens=512), 512),
])
def test_chat_max_tokens(fields, max_tokens):
    assert parse_chat(chat(**fields), LIMITS).params.max_tokens == max_tokens


@pytest.mark.parametrize("fields,logprobs,top,params_logprobs", [
    (dict(logprobs=True), True, 0, 0),
    (dict(logprobs=True, top_logprobs=5), True, 5, 5),
    (dict(logprobs=True, top_logprobs=20), True, 20, 20),
    (dict(logprobs=True, top_logprobs=None), True, 0, 0),
    (dict(logprobs=False), False, 0, None),
    (dict(logprobs=False, top_logprobs=None), False, 0, None),
    (dict(logprobs=None), False, 0, None),
])
def test_chat_logprobs(fields, logprobs, top, params_logprobs):
    req = parse_chat(chat(**fields), LIMITS)
    assert (req.logprobs, req.top_logprobs, req.params.logprobs, req.params.prompt_logprobs) == \
        (logprobs, top, params_logprobs, False)


@pytest.mark.parametrize("fields,param,fragment", [
    (dict(max_tokens=10, max_completion_tokens=20), "max_completion_tokens", "differ"),
    (dict(max_tokens=0), "max_tokens", "got 0"),
    (dict(max_completion_tokens=0), "max_completion_tokens", "got 0"),
    (dict(max_completion_tokens=600), "max_completion_tokens", "cap of 512"),
    (dict(max_completion_tokens=True), "max_completion_tokens", "got true"),
    (dict(logprobs="true"), "logprobs", 'got "true"'),
    (dict(logprobs=1), "logprobs", "got 1"),  # chat's logprobs is a bool, not a count
    (dict(top_logprobs=5), "top_logprobs", "logprobs: true"),
    (dict(logprobs=False, top_logprobs=2), "top_logprobs", "logprobs: true"),
    (dict(logprobs=True, top_logprobs=21), "top_logprobs", "from 0 to 20"),
    (dict(logprobs=True, top_logprobs=True), "top_logprobs", "got true"),
    (dict(prompt="hi"), "prompt", "unrecognised"),
    (dict(echo=True), "echo", "unrecognised"),
    (dict(best_of=1), "best_of", "unrecognised"),
])
def test_chat_fields_refused(fields, param, fragment):
    refused(parse_chat, chat(**fields), param, fragment)


@pytest.mark.parametrize("messages,query", [
    (USER, "hi"),
    ([{"role": "system", "content": "sys"}, *USER], "sys\nhi"),
    ([{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"}],
     "a1\nq2"),
    ([{"role": "system", "content": "a"}, {"role": "system", "content": "b"}, {"role": "system", "content": "c"}],
     "b\nc"),
    # the server's behaviour kept as is: after an assistant prefill, messages[-2] is the user turn itself
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "partial"}], "q\nq"),
])
def test_retrieval_query(messages, query):
    assert retrieval_query(messages) == query


# ---------------------------------------------------------------------------------------------- lengths, JSON
def test_check_length():
    check_length(1000, 24, LIMITS)  # exactly the context
    with pytest.raises(APIError) as e:
        check_length(1000, 25, LIMITS)
    assert (e.value.status, e.value.code, e.value.param) == (400, "context_length_exceeded", "prompt")
    assert all(s in e.value.message for s in ("1000", "25", "1025", "1024"))
    with pytest.raises(APIError) as e:
        check_length(2049, 0, Limits(context_length=4096), param="messages")
    assert e.value.code == "context_length_exceeded" and e.value.param == "messages"
    assert "2049" in e.value.message and "2048" in e.value.message


def test_limits():
    with pytest.raises(TypeError):
        Limits()  # the model's context has no sensible default
    with pytest.raises(ValueError, match="default_max_tokens"):
        Limits(context_length=1024, default_max_tokens=600)
    with pytest.raises(ValueError, match="max_n"):
        Limits(context_length=1024, max_n=0)
    small = Limits(context_length=128, max_n=2, max_stop=1, max_logprobs=0, max_tokens_cap=16, default_max_tokens=8)
    assert parse_completion(completion(), small).params.max_tokens == 8
    with pytest.raises(APIError, match="from 1 to 2"):
        parse_completion(completion(n=3), small)
    with pytest.raises(APIError, match="1 to 1"):
        parse_completion(completion(stop=["a", "b"]), small)
    with pytest.raises(APIError, match="from 0 to 0"):
        parse_completion(completion(logprobs=1), small)


def test_parse_json():
    assert parse_json(b'{"prompt": "h\xc3\xa9"}') == {"prompt": "hé"}
    assert parse_json(b' {"a": 1.5} \n') == {"a": 1.5}
    assert parse_json(b'{"p": "\\ud83d\\ude00"}') == {"p": "\U0001f600"}  # a surrogate pair is one character


@pytest.mark.parametrize("raw,fragment", [
    (b"", "empty"),
    (b"  \n", "empty"),
    (b"{", "not valid JSON"),
    (b"{'a': 1}", "not valid JSON"),
    (b"[1, 2]", "an array"),
    (b'"text"', "a string"),
    (b"null", "null"),
    (b"3", "a number"),
    (b'{"prompt": "\xff"}', "not UTF-8"),
    (b'\xef\xbb\xbf{"a": 1}', "not valid JSON"),
    (b'{"temperature": NaN}', "NaN"),
    (b'{"temperature": -Infinity}', "Infinity"),
    (b'{"temperature": 1e999}', "out of range"),
    pytest.param(b"[" * 100_000 + b"]" * 100_000, "nested too deeply", id="deep"),
    pytest.param(b'{"seed": ' + b"1" * 5000 + b"}", "too long", id="5000-digits"),
    (b'{"prompt": "a\\ud800b"}', "unpaired surrogate"),
    (b'{"messages": [{"\\udc00": 1}]}', "unpaired surrogate"),
])
def test_parse_json_refused(raw, fragment):
    with pytest.raises(APIError) as e:
        parse_json(raw)
    assert e.value.status == 400 and e.value.type == "invalid_request_error", e.value.message
    assert fragment in e.value.message, e.value.message
    json.dumps(e.value.body(), ensure_ascii=False).encode("utf-8")  # as the server will send it


def test_api_error_body():
    e = APIError(429, "busy", "rate_limit_error", "queue_full")
    assert (e.status, e.message, e.type, e.code, e.param, str(e)) == (429, "busy", "rate_limit_error", "queue_full",
                                                                      None, "busy")
    assert e.body() == {"error": {"message": "busy", "type": "rate_limit_error", "param": None, "code": "queue_full"}}
