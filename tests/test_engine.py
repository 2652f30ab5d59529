"""Engine: our decode loop over an ExpertPool, checked against the pattern's slim model."""

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from tiny import char_tokenizer, save_tiny

from moeprune import MoepruneError, Pattern, load_slim
from moeprune.serve import ExpertPool
from moeprune.serve.engine import Engine, Job, QueueFull
from moeprune.serve.params import Result, SamplingParams, TokenLogprob

FAMILIES = ["qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss"]
# deepseek_v3 routes by groups of 4 experts: keep as many of each group
KEPT = {"deepseek_v3": [0, 1, 4, 5]}
# a window shorter than the prompts: its layers' KV cache is cut, and left padding must not shift it
OVERRIDES = {"gpt_oss": dict(sliding_window=6)}
PROMPTS = ["def f(x):", "Let there be light", "#include", "x"]


def _build(folder, model_type: str) -> SimpleNamespace:
    save_tiny(model_type, folder, **OVERRIDES.get(model_type, {}))
    pool = ExpertPool(folder, 6)
    pattern = Pattern({layer: KEPT.get(model_type, [0, 2, 5, 7]) for layer in pool.layers},
                      {"num_experts": 8, "fingerprint": pool.fingerprint})
    return SimpleNamespace(folder=folder, pool=pool, pattern=pattern, slim=load_slim(folder, pattern),
                           tok=char_tokenizer())


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """model_type -> its checkpoint, pool, subset pattern and slim model; each built once, when first asked."""
    # Tiny models on busy cores: a second intra-op thread only waits for a core (ops took ms, not us).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    built: dict[str, SimpleNamespace] = {}

    def get(model_type: str) -> SimpleNamespace:
        if model_type not in built:
            built[model_type] = _build(tmp_path_factory.mktemp(model_type), model_type)
        return built[model_type]

    yield get
    for m in built.values():
        m.pool.close()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def m(models):
    return models("qwen3_moe")


class Sink:
    """Records every event, per choice index."""

    def __init__(self, on_token=None):
        self.events: dict[int, list] = defaultdict(list)
        self.on_token = on_token

    def __call__(self, index: int, kind: str, payload) -> None:
        self.events[index].append((kind, payload))
        if kind == "token" and self.on_token:
            self.on_token(index, len(self.tokens(index)))

    def end(self, index: int) -> tuple[str, object]:
        """The job's one terminal event, which must come last."""
        ends = [e for e in self.events[index] if e[0] in ("done", "error")]
        assert len(ends) == 1 and self.events[index][-1] == ends[0], self.events[index]
        return ends[0]

    def result(self, index: int) -> Result:
        kind, payload = self.end(index)
        assert kind == "done", payload
        return payload

    def tokens(self, index: int) -> list:
        return [p for k, p in self.events[index] if k == "token"]


def ids_of(m, text: str) -> list[int]:
    return m.tok(text)["input_ids"]


def make_jobs(m, specs, sink) -> list[Job]:
    """specs: (prompt ids or text, SamplingParams[, stream]) per job; index = position."""
    jobs = []
    for i, (prompt, params, *stream) in enumerate(specs):
        prompt = ids_of(m, prompt) if isinstance(prompt, str) else prompt
        jobs.append(Job(m.pattern, prompt, params, i, sink, stream=bool(stream and stream[0])))
    return jobs


def run(m, specs, sink=None, eos=None, **engine_kw) -> tuple[Engine, Sink, list[Job]]:
    """Queue every job on a stopped engine (so they form one batch), start it, and drain it.

    `eos`: replaces the end-of-sequence ids; the tiny random models often end a sequence at once,
    so tests that need tokens pass an empty set.
    """
    sink = sink or Sink()
    engine = Engine(m.pool, m.tok, start=False, **engine_kw)
    if eos is not None:
        engine.eos = eos
    jobs = make_jobs(m, specs, sink)
    engine.submit(jobs)
    engine.start()
    engine.shutdown()
    return engine, sink, jobs


def ref_logprobs(m, ids: list[int]) -> torch.Tensor:
    """log_softmax of the slim model's logits at every position of `ids`."""
    with torch.no_grad():
        return torch.log_softmax(m.slim(torch.tensor([ids])).logits[0].float(), dim=-1)


def check_entry(entry: TokenLogprob, token: int, ref: torch.Tensor, k: int) -> None:
    assert entry.token_id == token
    assert abs(entry.logprob - ref[token].item()) <= 1e-4
    assert len(entry.top) == k
    values = [v for _, v in entry.top]
    assert values == sorted(values, reverse=True)
    for (t, v), want in zip(entry.top, torch.topk(ref, k).values.tolist(), strict=True):
        assert abs(v - ref[t].item()) <= 1e-4 and abs(v - want) <= 1e-4


def check_logprobs(m, prompt: list[int], r: Result, k: int) -> None:
    ref = ref_logprobs(m, prompt + r.token_ids)
    assert r.logprobs is not None and len(r.logprobs) == len(r.token_ids)
    for j, (token, entry) in enumerate(zip(r.token_ids, r.logprobs, strict=True)):
        check_entry(entry, token, ref[len(prompt) - 1 + j], k)


# ---------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("model_type", FAMILIES)
def test_logprobs_equal_the_slim_model(models, model_type):
    """Generated and prompt logprobs are the slim model's raw log-softmax, in a left-padded batch."""
    m = models(model_type)
    # different lengths: rows leave the batch (and its KV cache) at different steps
    specs = [
        ("Let there be light", SamplingParams(10, temperature=0, logprobs=3, prompt_logprobs=True)),
        ("x", SamplingParams(4, temperature=0.7, top_p=0.9, seed=1, logprobs=2)),  # padded the most
        ("#include", SamplingParams(7, temperature=1.3, seed=2, logprobs=0, presence_penalty=0.5)),
        ("def f(x):", SamplingParams(9, temperature=0, logprobs=1, frequency_penalty=1.0)),
    ]
    engine, sink, jobs = run(m, specs, eos=set())
    assert engine.batch_sizes == [4]
    for i, (job, (_, params)) in enumerate(zip(jobs, specs, strict=True)):
        r = sink.result(i)
        assert len(r.token_ids) == params.max_tokens and r.finish_reason == "length"
        check_logprobs(m, job.prompt_ids, r, params.logprobs)
        if params.prompt_logprobs:
            ref = ref_logprobs(m, job.prompt_ids)
            assert len(r.prompt_logprobs) == len(job.prompt_ids) and r.prompt_logprobs[0] is None
            for j, entry in enumerate(r.prompt_logprobs[1:], start=1):
                check_entry(entry, job.prompt_ids[j], ref[j - 1], params.logprobs)
        else:
            assert r.prompt_logprobs is None
    assert m.pool.stats["active_leases"] == 0


def test_seeded_row_is_the_same_alone_or_batched(m):
    a = ("Let there", SamplingParams(16, temperature=0.9, top_p=0.95, seed=1234))
    _, alone, _ = run(m, [a], eos=set())
    _, again, _ = run(m, [a], eos=set())
    want = alone.result(0).token_ids
    assert len(want) == 16 and again.result(0).token_ids == want
    other = Pattern({layer: [1, 3, 4, 6] for layer in m.pool.layers}, m.pattern.meta)
    specs = [
        ("def f(x): return x", SamplingParams(5, temperature=0, logprobs=2)),  # longest prompt: A is padded
        a,
        ("x", SamplingParams(20, temperature=1.5, seed=7, frequency_penalty=0.5, stop=("q",))),
        ("#incl", SamplingParams(9, temperature=0.6, top_p=0.5)),  # unseeded
    ]
    sink = Sink()
    engine = Engine(m.pool, m.tok, start=False)
    engine.eos = set()
    jobs = make_jobs(m, specs, sink)
    odd = Job(other, ids_of(m, "x"), SamplingParams(3, temperature=0), 4, sink)  # other experts: own batch
    engine.submit(jobs[:2])
    engine.submit([odd])
    engine.submit(jobs[2:])
    engine.start()
    engine.shutdown()
    assert engine.batch_sizes == [4, 1]
    assert sink.result(1).token_ids == want
    for i in (0, 2, 3, 4):
        sink.result(i)
    # unseeded rows draw from fresh seeds: 16 tokens from ~128 equal-ish choices never repeat by chance
    unseeded = ("Let there", SamplingParams(16, temperature=0.9, top_p=0.95))
    _, s1, _ = run(m, [unseeded, unseeded], eos=set())
    assert s1.result(0).token_ids != s1.result(1).token_ids


def test_greedy_is_the_slim_models_argmax(m):
    prompt = ids_of(m, "x = 1")
    specs = [(prompt, SamplingParams(16, temperature=0)),
             ("def f(x): return", SamplingParams(4, temperature=0))]  # makes row 0 padded, and leaves first
    _, sink, _ = run(m, specs)
    got = sink.result(0)
    # one forward of the whole sequence gives every step's logits (the model is causal)
    steps = ref_logprobs(m, prompt + got.token_ids)[len(prompt) - 1: -1]
    assert steps.argmax(-1).tolist() == got.token_ids
    assert got.finish_reason == "length" and len(got.token_ids) == 16
    want = m.slim.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False)[0, len(prompt):]
    assert want.tolist() == got.token_ids


def greedy_with_penalties(m, prompt: list[int], got: list[int], frequency: float, presence: float) -> list[int]:
    """At every step of `got`, the greedy choice by the OpenAI formula applied by hand to the slim model's logits."""
    with torch.no_grad():
        steps = m.slim(torch.tensor([prompt + got])).logits[0, len(prompt) - 1: -1].float()
    want = []
    for j, logits in enumerate(steps):
        counts = torch.bincount(torch.tensor(got[:j], dtype=torch.long), minlength=logits.shape[-1]).float()
        want.append(int((logits - counts * frequency - (counts > 0).float() * presence).argmax()))
    return want


def test_penalties(m):
    prompt = ids_of(m, "Let there be light")
    n = 24
    p = lambda **kw: SamplingParams(n, temperature=0, logprobs=1, **kw)  # noqa: E731
    specs = [(prompt, p()),
             (prompt, p(frequency_penalty=100.0)),
             (prompt, p(presence_penalty=100.0)),
             (prompt, p(frequency_penalty=-100.0)),
             (prompt, p(frequency_penalty=0.02)),  # small: the logits of this model span ~0.6
             (prompt, p(presence_penalty=0.02))]
    _, sink, _ = run(m, specs)
    plain, freq, pres, neg, small_freq, small_pres = (sink.result(i) for i in range(6))
    assert len(set(plain.token_ids)) < len(plain.token_ids)  # unpenalised greedy repeats itself
    for r in (freq, pres):  # a huge penalty forbids any repeat
        assert len(r.token_ids) == n and len(set(r.token_ids)) == n
    assert neg.token_ids == [neg.token_ids[0]] * n  # a negative one favours repetition
    # the exact formula: count * frequency + (count > 0) * presence
    assert len(small_freq.token_ids) == len(small_pres.token_ids) == n
    assert small_freq.token_ids == greedy_with_penalties(m, prompt, small_freq.token_ids, 0.02, 0.0)
    assert small_pres.token_ids == greedy_with_penalties(m, prompt, small_pres.token_ids, 0.0, 0.02)
    assert len({tuple(r.token_ids) for r in (plain, small_freq, small_pres)}) == 3
    for r in (freq, pres, neg, small_freq, small_pres):  # logprobs are the model's, never penalised
        check_logprobs(m, prompt, r, 1)


def test_top_p_and_temperature(m):
    prompt = ids_of(m, "#include")
    specs = [(prompt, SamplingParams(12, temperature=0)),
             (prompt, SamplingParams(12, temperature=1.0, top_p=1e-6, seed=3, logprobs=0)),
             (prompt, SamplingParams(12, temperature=1e-9, seed=3))]
    _, sink, _ = run(m, specs)
    greedy = sink.result(0).token_ids
    assert sink.result(1).token_ids == greedy  # a tiny nucleus holds only the most likely token
    assert sink.result(2).token_ids == greedy
    check_logprobs(m, prompt, sink.result(1), 0)


def test_cancel(m):
    k = 3

    def on_token(index, count):
        if count == {0: k, 2: 6}.get(index):
            jobs[index].cancelled.set()

    sink = Sink(on_token)
    specs = [("Let there be light", SamplingParams(20, temperature=0.8, seed=5, logprobs=1), True),
             ("x", SamplingParams(10, temperature=0), True),
             ("#include", SamplingParams(6, temperature=0), True),  # cancelled on its last token: not cut short
             ("def", SamplingParams(6, temperature=0), True)]
    engine = Engine(m.pool, m.tok, start=False)
    jobs = make_jobs(m, specs, sink)

    def broken(index, kind, payload):  # a client whose connection fails: its sink raises
        sink(index, kind, payload)
        if kind == "token":
            raise OSError("connection reset")

    jobs.append(Job(m.pattern, ids_of(m, "abc"), SamplingParams(8, temperature=0), 4, broken, stream=True))
    engine.submit(jobs)
    jobs[3].cancelled.set()  # gone before its batch ran
    engine.start()
    engine.shutdown()
    cut = sink.result(0)
    assert len(cut.token_ids) == k and cut.finish_reason == "stop" and len(cut.logprobs) == k
    assert [t for t, _ in sink.tokens(0)] == cut.token_ids
    assert [lp for _, lp in sink.tokens(0)] == cut.logprobs
    assert len(sink.result(1).token_ids) == 10 and sink.result(1).finish_reason == "length"
    assert sink.result(2).finish_reason == "length" and len(sink.result(2).token_ids) == 6
    assert sink.result(3).token_ids == [] and sink.tokens(3) == []
    assert len(sink.result(4).token_ids) == 1  # cancelled by its failing sink, the others unharmed
    assert engine.stopped_early == 3
    assert engine.batch_sizes == [4]


def test_stop_strings_length_and_scoring(m):
    prompt = ids_of(m, "Let there be light")
    _, sink, _ = run(m, [(prompt, SamplingParams(16, temperature=0, logprobs=1))])
    full = sink.result(0)
    text = m.tok.decode(full.token_ids, skip_special_tokens=True)
    assert full.finish_reason == "length" and full.text == text and len(full.token_ids) == 16
    # A stop string spanning three tokens, ending with a character new to the text; that character is a
    # stop string too: both complete on the same token, and the text is cut before the one starting first.
    end = next(j for j in range(9, len(text)) if text[j] != " " and text.index(text[j]) == j)
    stop = text[end - 4: end + 1]
    completed = next(n for n in range(1, 17) if stop in m.tok.decode(full.token_ids[:n]))
    assert 3 <= completed < 16
    eos = full.token_ids[7]
    first_eos = full.token_ids.index(eos)
    specs = [(prompt, SamplingParams(16, temperature=0, logprobs=1, stop=(text[end], "never", stop)), True),
             (prompt, SamplingParams(16, temperature=0, stop=("",))),  # ignored, not "stop at once"
             (prompt, SamplingParams(5, temperature=0)),
             (prompt, SamplingParams(0, temperature=0, logprobs=2, prompt_logprobs=True)),
             (prompt, SamplingParams(16, temperature=0), True)]  # its end of sequence is made `eos` below
    engine = Engine(m.pool, m.tok, start=False)
    sink = Sink()
    engine.submit(make_jobs(m, specs[:4], sink))
    engine.start()
    engine.shutdown()
    r = sink.result(0)
    assert r.finish_reason == "stop" and r.text == text[: end - 4] == text[: text.index(stop)]
    assert r.token_ids == full.token_ids[:completed]
    check_logprobs(m, prompt, r, 1)
    assert [t for t, _ in sink.tokens(0)] == r.token_ids
    assert sink.result(1).token_ids == full.token_ids and sink.result(1).finish_reason == "length"
    assert sink.result(2).token_ids == full.token_ids[:5] and sink.result(2).finish_reason == "length"
    scored = sink.result(3)
    assert scored.token_ids == [] and scored.text == "" and scored.finish_reason == "length"
    assert scored.logprobs == [] and len(scored.prompt_logprobs) == len(prompt)
    assert scored.prompt_logprobs[0] is None
    ref = ref_logprobs(m, prompt)
    for j, entry in enumerate(scored.prompt_logprobs[1:], start=1):
        check_entry(entry, prompt[j], ref[j - 1], 2)

    engine = Engine(m.pool, m.tok, start=False)
    engine.eos = {eos}
    sink = Sink()
    engine.submit(make_jobs(m, specs[4:], sink))
    engine.start()
    engine.shutdown()
    r = sink.result(0)
    assert r.finish_reason == "stop" and r.token_ids == full.token_ids[:first_eos]  # the eos itself left out
    assert [t for t, _ in sink.tokens(0)] == r.token_ids


def test_refused_jobs_get_an_error_and_spare_the_batch(m):
    ok = ("x", SamplingParams(3, temperature=0))
    too_long = ([5] * 120, SamplingParams(9, temperature=0))  # 129 > 128 positions
    outside = ([5, 500], SamplingParams(3, temperature=0))
    engine, sink, _ = run(m, [too_long, ok, outside, ([], SamplingParams(3))])
    assert engine.context_length == 128
    assert sink.end(0) == ("error", "the prompt (120 tokens) plus max_tokens (9) exceed the model's context "
                                    "of 128 tokens")
    assert sink.end(2)[0] == "error" and "vocabulary" in sink.end(2)[1]
    assert sink.end(3)[0] == "error"
    assert len(sink.result(1).token_ids) == 3
    assert engine.batch_sizes == [1]
    _, sink, _ = run(m, [([5] * 120, SamplingParams(8, temperature=0))])  # exactly the context: fine
    assert len(sink.result(0).token_ids) == 8


def test_failing_batch_errors_every_job_and_the_worker_goes_on(m, monkeypatch):
    calls = {"n": 0, "fail_at": 1}
    forward = m.pool.model.forward

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == calls["fail_at"]:
            raise RuntimeError("boom\nsecond line")
        return forward(*args, **kwargs)

    monkeypatch.setattr(m.pool.model, "forward", flaky)
    sink = Sink()
    engine = Engine(m.pool, m.tok, start=False)
    engine.submit(make_jobs(m, [("x", SamplingParams(4, temperature=0)),
                                ("def", SamplingParams(4, temperature=0.5), True)], sink))
    engine.start()
    engine.shutdown()
    assert [sink.end(i) for i in (0, 1)] == [("error", "boom")] * 2
    assert m.pool.stats["active_leases"] == 0

    # fails mid-decode: the row that already finished keeps its "done", the other gets the "error"
    calls.update(n=0, fail_at=3)
    engine, sink, _ = run(m, [("x", SamplingParams(1, temperature=0)),
                              ("def", SamplingParams(6, temperature=0), True)])
    assert len(sink.result(0).token_ids) == 1
    assert sink.end(1) == ("error", "boom") and len(sink.tokens(1)) == 2

    calls.update(n=0, fail_at=-1)
    engine, sink, _ = run(m, [("x", SamplingParams(4, temperature=0))])
    assert len(sink.result(0).token_ids) == 4


def test_queue_is_bounded_and_admits_requests_whole(m):
    sink = Sink()
    engine = Engine(m.pool, m.tok, max_batch=3, max_queue=4, start=False)
    job = lambda i: Job(m.pattern, ids_of(m, "x"), SamplingParams(2, temperature=0), i, sink)  # noqa: E731
    engine.submit([job(0), job(1), job(2)])
    with pytest.raises(QueueFull):
        engine.submit([job(3), job(4)])
    assert engine.depth == 3
    engine.submit([job(5)])
    assert engine.depth == 4
    with pytest.raises(QueueFull):
        engine.submit([job(6)])
    engine.start()
    engine.shutdown()
    assert sorted(sink.events) == [0, 1, 2, 5]  # the refused requests never ran
    assert all(sink.result(i).finish_reason == "length" for i in (0, 1, 2, 5))
    assert engine.batch_sizes == [3, 1] and engine.depth == 0
    with pytest.raises(MoepruneError, match="shutting down") as e:
        engine.submit([job(7)])
    assert not isinstance(e.value, QueueFull)


def test_shutdown_of_an_unstarted_engine_fails_its_queue(m):
    sink = Sink()
    engine = Engine(m.pool, m.tok, start=False)
    engine.submit([Job(m.pattern, ids_of(m, "x"), SamplingParams(2), 0, sink)])
    engine.shutdown(timeout=0)
    assert sink.end(0) == ("error", "the server is shutting down")
