"""Response bodies and server-sent events (moeprune.serve.responses), checked against the `openai`
package's types and its client; a byte-level fake tokenizer stands in for a model's."""

import json
import random

import httpx2
import openai
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from moeprune.serve.params import Result, TokenLogprob
from moeprune.serve.responses import (
    SSE_DONE,
    TextStream,
    chat_body,
    chat_choice,
    chat_chunk,
    chat_logprobs,
    completion_body,
    completion_choice,
    completion_chunk,
    completion_logprobs,
    sse,
    sse_error,
    usage,
    usage_chunk,
)

# token id -> bytes: whole words, and characters split across tokens (é = c3 a9, € = e2 82 ac, 😀 = f0 9f 98 80)
VOCAB = [b"Hel", b"lo", b" wor", b"ld", b"\n", b"\xc3", b"\xa9", b"\xe2\x82", b"\xac", b"\xf0\x9f", b"\x98\x80",
         b"EN", b"D", b"a", b"b", b" ", b"<s>", b"A", b"\xc3\xa9"]
HEL, LO, WOR, LD, NL, E1, E2, EURO1, EURO2, EMOJI1, EMOJI2, EN, D, A, B, SPACE, BOS, CAP_A, EACUTE = range(len(VOCAB))


def decode(ids) -> str:
    return b"".join(VOCAB[i] for i in ids).decode("utf-8", errors="replace")


def token_text(i: int) -> str:
    return decode([i])


def lp(token_id, logprob, *top):
    return TokenLogprob(token_id, logprob, tuple(top))


RID, CREATED, MODEL = "cmpl-1", 1700000000, "demo_model"
INFO = {"pattern": "python", "fell_back": False}


# ---------------------------------------------------------------------------------------------- logprobs
def test_completion_logprobs_format():
    entries = [lp(HEL, -0.5, (HEL, -0.5), (A, -1.5)), lp(LO, -0.25, (LO, -0.25), (D, -3.0))]
    got = completion_logprobs([HEL, LO], entries, token_text)
    assert got.tokens == ["Hel", "lo"]
    assert got.token_logprobs == [-0.5, -0.25]
    assert got.top_logprobs == [{"Hel": -0.5, "a": -1.5}, {"lo": -0.25, "D": -3.0}]
    assert got.text_offset == [0, 3]
    assert completion_logprobs([HEL, LO], entries, token_text, offset=10).text_offset == [10, 13]


def test_top_logprobs_collide_to_fewer_entries():
    # two ids decoding to the same string ("\ufffd" for two lone partial characters): the likelier stays
    got = completion_logprobs([A], [lp(A, -0.1, (A, -0.1), (EURO1, -1.0), (E1, -2.0))], token_text)
    assert got.top_logprobs == [{"a": -0.1, "\ufffd": -1.0}]


def test_logprob_entries_must_match_tokens():
    with pytest.raises(ValueError, match="entries"):
        completion_logprobs([A, B], [lp(A, -1.0)], token_text)
    with pytest.raises(ValueError, match="token 14"):
        completion_logprobs([B], [lp(A, -1.0)], token_text)


def test_infinite_logprob_is_floored():
    got = completion_logprobs([A], [lp(A, float("-inf"), (A, float("-inf")))], token_text)
    assert got.token_logprobs == [-9999.0] and got.top_logprobs == [{"a": -9999.0}]
    event = sse(completion_chunk(RID, CREATED, MODEL, 0, "a", logprobs=[lp(A, float("-inf"))], token_text=token_text))
    assert "Infinity" not in event and json.loads(event[6:])


def test_chat_logprobs_format():
    got = chat_logprobs([lp(EACUTE, -0.1, (EACUTE, -0.1), (A, -2.5)), lp(A, -1.0)], token_text)
    dumped = [g.model_dump() for g in got]
    assert dumped == [
        {"token": "é", "logprob": -0.1, "bytes": [0xC3, 0xA9],
         "top_logprobs": [{"token": "é", "logprob": -0.1, "bytes": [0xC3, 0xA9]},
                          {"token": "a", "logprob": -2.5, "bytes": [97]}]},
        {"token": "a", "logprob": -1.0, "bytes": [97], "top_logprobs": []},
    ]


# ---------------------------------------------------------------------------------------------- full bodies
def result(ids, finish="stop", logprobs=False, prompt_logprobs=None):
    entries = [lp(t, -0.5 - i, (t, -0.5 - i), (A, -4.0)) for i, t in enumerate(ids)] if logprobs else None
    return Result(token_ids=list(ids), text=decode(ids), finish_reason=finish, logprobs=entries,
                  prompt_logprobs=prompt_logprobs)


def test_completion_body_validates():
    results = [result([WOR, LD], "length"), result([A])]
    body = completion_body(RID, CREATED, MODEL, results, usage(3, 3), INFO, token_text=token_text)
    Completion.model_validate(body)
    assert body["object"] == "text_completion" and body["moeprune"] == INFO
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    assert body["choices"] == [{"index": 0, "text": " world", "finish_reason": "length", "logprobs": None},
                               {"index": 1, "text": "a", "finish_reason": "stop", "logprobs": None}]
    assert "moeprune" not in completion_body(RID, CREATED, MODEL, results, None, token_text=token_text)


def test_completion_body_with_logprobs_validates():
    body = completion_body(RID, CREATED, MODEL, [result([WOR, LD], logprobs=True)], usage(2, 2), INFO,
                           token_text=token_text)
    Completion.model_validate(body)
    got = body["choices"][0]["logprobs"]
    assert got == {"tokens": [" wor", "ld"], "token_logprobs": [-0.5, -1.5],
                   "top_logprobs": [{" wor": -0.5, "a": -4.0}, {"ld": -1.5, "a": -4.0}], "text_offset": [0, 4]}


PROMPT = [BOS, HEL, LO]  # "<s>" is in the ids, not in the echoed text: offsets must still index the text
PROMPT_LOGPROBS = [None, lp(HEL, -7.0, (A, -1.0)), lp(LO, -0.5, (LO, -0.5))]


def test_echo_with_logprobs():
    r = result([WOR, LD], logprobs=True, prompt_logprobs=PROMPT_LOGPROBS)
    body = completion_body(RID, CREATED, MODEL, [r], usage(3, 2), token_text=token_text, echo=[("Hello", PROMPT)])
    choice = body["choices"][0]
    assert choice["text"] == "Hello world"
    got = choice["logprobs"]
    assert got["tokens"] == ["<s>", "Hel", "lo", " wor", "ld"]
    assert got["token_logprobs"] == [None, -7.0, -0.5, -0.5, -1.5]
    assert got["top_logprobs"] == [None, {"a": -1.0}, {"lo": -0.5}, {" wor": -0.5, "a": -4.0}, {"ld": -1.5, "a": -4.0}]
    assert got["text_offset"][3:] == [5, 9]  # the completion's offsets count from the end of the returned prompt
    assert choice["text"][5:].startswith(" wor")
    # OpenAI's API sends null for the first prompt token; its Python type does not allow it, its client parses it
    with pytest.raises(ValueError):
        Completion.model_validate(body)
    parsed = client(json.dumps(body), "application/json").completions.create(model=MODEL, prompt="Hello")
    assert parsed.choices[0].logprobs.token_logprobs[:2] == [None, -7.0]
    fixed = json.loads(json.dumps(body))
    fixed["choices"][0]["logprobs"]["token_logprobs"][0] = 0.0
    fixed["choices"][0]["logprobs"]["top_logprobs"][0] = {}
    Completion.model_validate(fixed)  # everything else fits the type


def test_echo_scoring_only_the_prompt():
    r = Result(token_ids=[], text="", finish_reason="length", logprobs=[], prompt_logprobs=PROMPT_LOGPROBS)
    choice = completion_choice(0, r, token_text, prompt="Hello", prompt_ids=PROMPT).model_dump()
    assert choice["text"] == "Hello"
    assert choice["logprobs"]["tokens"] == ["<s>", "Hel", "lo"]
    assert choice["logprobs"]["token_logprobs"] == [None, -7.0, -0.5]
    assert choice["logprobs"]["text_offset"] == [0, 3, 6]


def test_echo_without_logprobs():
    body = completion_body(RID, CREATED, MODEL, [result([WOR]), result([LD])], usage(6, 2), token_text=token_text,
                           echo=[("Hello", PROMPT), ("Hi", [HEL])])
    Completion.model_validate(body)
    assert [c["text"] for c in body["choices"]] == ["Hello wor", "Hild"]
    assert all(c["logprobs"] is None for c in body["choices"])


def test_echo_needs_one_prompt_per_choice_and_its_ids():
    with pytest.raises(ValueError, match="echoed prompts"):
        completion_body(RID, CREATED, MODEL, [result([A]), result([B])], None, token_text=token_text,
                        echo=[("Hello", PROMPT)])
    r = result([WOR], logprobs=True, prompt_logprobs=PROMPT_LOGPROBS)
    with pytest.raises(ValueError, match="prompt's token ids"):
        completion_choice(0, r, token_text, prompt="Hello")


def test_chat_body_validates():
    results = [result([HEL, LO]), result([A], "length", logprobs=True)]
    body = chat_body("chatcmpl-1", CREATED, MODEL, results, usage(5, 3), INFO, token_text=token_text, logprobs=False)
    ChatCompletion.model_validate(body)
    assert body["object"] == "chat.completion" and body["moeprune"] == INFO
    assert body["choices"][0] == {"index": 0, "finish_reason": "stop", "logprobs": None,
                                  "message": {"role": "assistant", "content": "Hello", "refusal": None}}
    assert body["choices"][1]["finish_reason"] == "length" and body["choices"][1]["logprobs"] is None
    assert [c["index"] for c in body["choices"]] == [0, 1]


def test_chat_body_with_logprobs_validates():
    body = chat_body("chatcmpl-1", CREATED, MODEL, [result([A], logprobs=True)], usage(5, 1), token_text=token_text,
                     logprobs=True)
    ChatCompletion.model_validate(body)
    assert body["choices"][0]["logprobs"] == {"refusal": None, "content": [
        {"token": "a", "logprob": -0.5, "bytes": [97], "top_logprobs": [
            {"token": "a", "logprob": -0.5, "bytes": [97]}, {"token": "a", "logprob": -4.0, "bytes": [97]}]}]}
    with pytest.raises(ValueError, match="engine gave none"):
        chat_body("chatcmpl-1", CREATED, MODEL, [result([A])], None, token_text=token_text, logprobs=True)


def test_bad_finish_reason_fails_at_build_time():
    with pytest.raises(ValueError):
        completion_choice(0, result([A], finish="eos"), token_text)
    with pytest.raises(ValueError):
        chat_choice(0, result([A], finish="eos"), token_text)


# ---------------------------------------------------------------------------------------------- events
def test_completion_chunks():
    first = completion_chunk(RID, CREATED, MODEL, 1, "Hel", None, INFO)
    assert first["choices"] == [{"index": 1, "text": "Hel", "finish_reason": None, "logprobs": None}]
    assert first["moeprune"] == INFO and first["object"] == "text_completion"
    with pytest.raises(ValueError):  # why these are built unvalidated: the type has no null finish_reason
        Completion.model_validate(first)
    last = completion_chunk(RID, CREATED, MODEL, 1, "", "length")
    Completion.model_validate(last)
    assert last["choices"][0]["finish_reason"] == "length"
    with_lp = completion_chunk(RID, CREATED, MODEL, 0, "lo", "stop", logprobs=[lp(LO, -0.2)], token_text=token_text,
                               offset=3)
    Completion.model_validate(with_lp)
    assert with_lp["choices"][0]["logprobs"] == {"tokens": ["lo"], "token_logprobs": [-0.2], "top_logprobs": [{}],
                                                 "text_offset": [3]}
    held = completion_chunk(RID, CREATED, MODEL, 0, "", "stop", logprobs=[], token_text=token_text)
    assert held["choices"][0]["logprobs"] == {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                              "text_offset": []}
    with pytest.raises(ValueError, match="token_text"):
        completion_chunk(RID, CREATED, MODEL, 0, "lo", logprobs=[lp(LO, -0.2)])


def test_chat_chunks():
    first = chat_chunk(RID, CREATED, MODEL, 0, "", None, INFO, first=True)
    first_with_text = chat_chunk(RID, CREATED, MODEL, 0, "Hel", first=True)
    middle = chat_chunk(RID, CREATED, MODEL, 2, "lo", logprobs=[lp(LO, -0.2, (LO, -0.2))], token_text=token_text)
    last = chat_chunk(RID, CREATED, MODEL, 0, "", "stop")
    for c in (first, first_with_text, middle, last):
        ChatCompletionChunk.model_validate(c)
        assert c["object"] == "chat.completion.chunk"
    assert first["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                                 "logprobs": None}]
    assert first["moeprune"] == INFO
    assert first_with_text["choices"][0]["delta"] == {"role": "assistant", "content": "Hel"}
    assert middle["choices"][0]["delta"] == {"content": "lo"} and middle["choices"][0]["index"] == 2
    assert middle["choices"][0]["logprobs"]["content"][0]["token"] == "lo"
    assert last["choices"] == [{"index": 0, "delta": {}, "finish_reason": "stop", "logprobs": None}]
    with pytest.raises(ValueError, match="token_text"):
        chat_chunk(RID, CREATED, MODEL, 0, "lo", logprobs=[])


@pytest.mark.parametrize("chat", [False, True])
def test_usage_chunk(chat):
    body = usage_chunk(RID, CREATED, MODEL, usage(4, 6), chat=chat, extra=INFO)
    (ChatCompletionChunk if chat else Completion).model_validate(body)
    assert body["choices"] == [] and body["usage"]["total_tokens"] == 10 and body["moeprune"] == INFO


def test_sse_framing():
    event = sse({"a": "é\n"})
    assert event.startswith("data: ") and event.endswith("\n\n") and event.count("\n") == 2
    assert json.loads(event[len("data: "):]) == {"a": "é\n"}
    assert SSE_DONE == "data: [DONE]\n\n"
    assert json.loads(sse_error("boom")[6:]) == {"error": {"message": "boom", "type": "server_error", "param": None,
                                                           "code": None}}
    with pytest.raises(ValueError):
        sse({"x": float("nan")})  # never send invalid JSON


# ---------------------------------------------------------------------------------------------- the openai client
def client(body: str, content_type: str) -> openai.OpenAI:
    def handler(request):
        return httpx2.Response(200, headers={"content-type": content_type}, content=body.encode())
    http = httpx2.Client(transport=httpx2.MockTransport(handler))
    return openai.OpenAI(api_key="k", base_url="http://test/v1", http_client=http, max_retries=0)


def test_openai_client_reads_a_completion_stream():
    tt = dict(token_text=token_text)
    events = [completion_chunk(RID, CREATED, MODEL, 0, "Hel", None, INFO, logprobs=[lp(HEL, -0.1)], **tt),
              completion_chunk(RID, CREATED, MODEL, 1, "A", logprobs=[lp(CAP_A, -0.2)], **tt),
              completion_chunk(RID, CREATED, MODEL, 0, "lo", "stop", logprobs=[lp(LO, -0.3)], offset=3, **tt),
              completion_chunk(RID, CREATED, MODEL, 1, "", "length", logprobs=[], offset=1, **tt),
              usage_chunk(RID, CREATED, MODEL, usage(2, 3), chat=False)]
    stream = client("".join(map(sse, events)) + SSE_DONE, "text/event-stream").completions.create(
        model=MODEL, prompt="x", stream=True, n=2, logprobs=0, stream_options={"include_usage": True})
    chunks = list(stream)
    assert len(chunks) == 5
    text = {0: "", 1: ""}
    for c in chunks[:4]:
        text[c.choices[0].index] += c.choices[0].text
    assert text == {0: "Hello", 1: "A"}
    assert [c.choices[0].finish_reason for c in chunks[:4]] == [None, None, "stop", "length"]
    assert chunks[2].choices[0].logprobs.tokens == ["lo"] and chunks[2].choices[0].logprobs.text_offset == [3]
    assert chunks[0].model_extra["moeprune"] == INFO
    assert chunks[4].choices == [] and chunks[4].usage.total_tokens == 5


def test_openai_client_reads_a_chat_stream():
    events = [chat_chunk(RID, CREATED, MODEL, 0, "", first=True),
              chat_chunk(RID, CREATED, MODEL, 0, "Hel", logprobs=[lp(HEL, -0.3)], token_text=token_text),
              chat_chunk(RID, CREATED, MODEL, 0, "lo"),
              chat_chunk(RID, CREATED, MODEL, 0, "", "length"),
              usage_chunk(RID, CREATED, MODEL, usage(2, 2), chat=True)]
    stream = client("".join(map(sse, events)) + SSE_DONE, "text/event-stream").chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:4]) == "Hello"
    assert chunks[1].choices[0].logprobs.content[0].logprob == -0.3
    assert chunks[3].choices[0].finish_reason == "length" and chunks[4].usage.completion_tokens == 2


def test_openai_client_raises_an_error_event():
    events = sse(completion_chunk(RID, CREATED, MODEL, 0, "Hel")) + sse_error("generation failed: out of memory")
    stream = client(events, "text/event-stream").completions.create(model=MODEL, prompt="x", stream=True)
    with pytest.raises(openai.APIError, match="out of memory"):
        list(stream)


def test_openai_client_reads_full_bodies():
    body = completion_body(RID, CREATED, MODEL, [result([WOR], logprobs=True)], usage(1, 1), INFO,
                           token_text=token_text)
    got = client(json.dumps(body), "application/json").completions.create(model=MODEL, prompt="x", logprobs=1)
    assert got.choices[0].text == " wor" and got.choices[0].logprobs.tokens == [" wor"]
    body = chat_body(RID, CREATED, MODEL, [result([HEL, LO])], usage(1, 2), token_text=token_text)
    got = client(json.dumps(body), "application/json").chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}])
    assert got.choices[0].message.content == "Hello"


# ---------------------------------------------------------------------------------------------- TextStream
def run(ids, stop=()):
    """Feed `ids`; the pieces sent, and the stream."""
    ts = TextStream(decode, stop)
    return [ts.feed(t) for t in ids], ts


def test_plain_tokens_pass_through():
    pieces, ts = run([HEL, LO, WOR, LD])
    assert pieces == ["Hel", "lo", " wor", "ld"] and not ts.stopped
    assert ts.finish("Hello world") == ""


@pytest.mark.parametrize("ids,char", [([E1, E2], "é"), ([EURO1, EURO2], "€"), ([EMOJI1, EMOJI2], "😀")])
def test_multibyte_character_split_across_tokens(ids, char):
    pieces, ts = run([A, *ids, B])
    assert pieces == ["a", "", char, "b"]
    assert "\ufffd" not in "".join(pieces)


def test_incomplete_character_at_the_end_goes_out_with_finish():
    pieces, ts = run([A, E1])
    assert pieces == ["a", ""]
    assert ts.finish(decode([A, E1])) == "\ufffd"  # what the engine's final text holds


def test_stop_string_split_across_tokens_is_never_sent():
    pieces, ts = run([HEL, LO, EN, D, WOR], stop=("END",))
    assert pieces == ["Hel", "lo", "", "", ""]
    assert ts.stopped and ts.finish("Hello") == ""


def test_stop_prefix_that_is_not_a_stop_is_released():
    pieces, ts = run([A, EN, A], stop=("END",))
    assert pieces == ["a", "", "ENa"] and not ts.stopped
    pieces, ts = run([A, EN], stop=("END",))
    assert ts.finish("aEN") == "EN"  # the sequence ended on the prefix


def test_stop_inside_a_token_cuts_the_token():
    pieces, ts = run([HEL, LO, WOR, LD], stop=("o w",))
    assert pieces == ["Hel", "l", "", ""] and ts.stopped


def test_earliest_stop_string_wins():
    pieces, ts = run([HEL, LO, WOR, LD], stop=("ld", "wor"))
    assert "".join(pieces) == "Hello " and ts.stopped
    pieces, ts = run([A, HEL], stop=("l", "He"))  # both appear with one token: cut at the earlier
    assert pieces == ["a", ""] and ts.stopped


def test_stop_string_at_the_first_token():
    pieces, ts = run([HEL, LO], stop=("He",))
    assert pieces == ["", ""] and ts.stopped and ts.finish("") == ""


def test_stop_after_a_multibyte_character():
    pieces, ts = run([A, E1, E2, NL, NL, B], stop=("é\n\n",))
    assert "".join(pieces) == "a" and ts.stopped


def test_stream_matches_final_text_fuzz():
    """Random sequences and stops: what is sent is always a prefix of the engine's final text, and
    sent + finish() is exactly that text."""
    rng = random.Random(0)
    stops = ["END", "\n\n", "é", "lo w", "a", "😀b", "b b"]
    for _ in range(500):
        ids = [rng.randrange(len(VOCAB)) for _ in range(rng.randrange(1, 12))]
        stop = tuple(rng.sample(stops, rng.randrange(0, 3)))
        ts = TextStream(decode, stop)
        sent, used = "", 0
        for t in ids:
            sent += ts.feed(t)
            used += 1
            if ts.stopped:
                break  # the engine stops here too
        text = decode(ids[:used])
        cuts = [text.find(s) for s in stop if s in text]
        final = text[: min(cuts)] if cuts else text
        assert final.startswith(sent), (ids, stop, sent, final)
        assert not any(s in sent for s in stop)
        assert sent + ts.finish(final) == final, (ids, stop)
